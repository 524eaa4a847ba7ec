mod agents;
mod attack;
mod capture;
mod cli;
mod egress;
pub mod server;
