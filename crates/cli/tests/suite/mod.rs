mod attack;
mod capture;
mod cli;
