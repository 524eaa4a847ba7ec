//! Interactive sessions (design and threat model in docs/SESSIONS.md):
//! the screen every door attaches to ([`screen`]), the server's side of a
//! sandbox's terminal ([`terminal`]), and the live sessions themselves
//! ([`host`]).

pub mod host;
pub mod screen;
pub mod terminal;
