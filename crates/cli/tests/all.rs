//! All integration tests in one binary (faster to build on small machines).

// A test crate: an unwrap that fails is a failed test (clippy allows it in
// #[test] functions; this covers the helpers too).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod suite;
