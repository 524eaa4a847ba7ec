mod attack;
mod capture;
mod cli;
mod server;
