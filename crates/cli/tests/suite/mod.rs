mod agents;
mod attack;
mod bounds;
mod capture;
mod cli;
mod egress;
mod newcomer;
mod policy;
pub mod server;
