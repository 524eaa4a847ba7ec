//! All integration tests in one binary (faster to build on small machines).
mod common;
mod suite;
