//! Interactive sessions (issue 10; design and threat model in
//! docs/SESSIONS.md). What exists so far: the screen every door attaches
//! to ([`screen`]).

pub mod screen;
pub mod terminal;
