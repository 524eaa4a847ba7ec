//! What the egress proxy reports: one record per decision, and the counts
//! past its record limit.

use serde::{Deserialize, Serialize};

/// How many connections of one proxy are recorded one by one; later ones
/// are still decided by the policy, and only counted ([`Unrecorded`]), so
/// a program that loops on connections cannot grow the records, the audit
/// trail or the proxy's memory without bound.
pub const RECORD_LIMIT: u64 = 10_000;

/// Where a connection's record stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Allowed and connected; the bytes are still moving (sinks only).
    Open,
    /// The decision is final: refused, or the connection has ended.
    Closed,
}

/// One decision of the proxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EgressRecord {
    /// Unix time in milliseconds (of the decision).
    pub ts: u64,
    /// The connection's number within this proxy: an allowed connection's
    /// `open` and `closed` records share it.
    pub conn: u64,
    pub phase: Phase,
    /// CONNECT, GET, POST, ...
    pub method: String,
    pub host: String,
    pub port: u16,
    pub allowed: bool,
    /// Why not, when refused (or why a tunnel ended early).
    pub reason: Option<String>,
    /// The address connected to.
    pub address: Option<String>,
    /// From the sandbox to the destination.
    pub bytes_up: u64,
    /// From the destination to the sandbox.
    pub bytes_down: u64,
}

impl EgressRecord {
    /// `METHOD host:port`, as the audit trail and the CLI show it.
    pub fn target(&self) -> String {
        format!("{} {}:{}", self.method, self.host, self.port)
    }

    /// `allowed`, `allowed (still open when the job ended)` or
    /// `refused: REASON`.
    pub fn outcome(&self) -> String {
        match (self.allowed, self.phase) {
            (true, Phase::Open) => "allowed (still open when the job ended)".into(),
            (true, Phase::Closed) => "allowed".into(),
            (false, _) => format!("refused: {}", self.reason.as_deref().unwrap_or("")),
        }
    }
}

/// Connections past the record limit: counted, not recorded one by one.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Unrecorded {
    pub allowed: u64,
    pub refused: u64,
    /// The limit that was reached.
    pub limit: u64,
}

/// One line of the proxy's log and of the live event pipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum EgressLine {
    Record(EgressRecord),
    Unrecorded { unrecorded: Unrecorded },
}

impl EgressLine {
    /// Parse one line; `None` for anything that is not one of ours.
    pub fn parse(line: &[u8]) -> Option<EgressLine> {
        serde_json::from_slice(line).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_strangers_are_refused() {
        let r = EgressRecord {
            ts: 1,
            conn: 2,
            phase: Phase::Closed,
            method: "CONNECT".into(),
            host: "example.com".into(),
            port: 443,
            allowed: false,
            reason: Some("not in the allowlist".into()),
            address: None,
            bytes_up: 0,
            bytes_down: 0,
        };
        let line = serde_json::to_vec(&EgressLine::Record(r.clone())).unwrap_or_default();
        assert_eq!(EgressLine::parse(&line), Some(EgressLine::Record(r)));
        let u = br#"{"unrecorded":{"allowed":1,"refused":2,"limit":3}}"#;
        assert_eq!(
            EgressLine::parse(u),
            Some(EgressLine::Unrecorded {
                unrecorded: Unrecorded {
                    allowed: 1,
                    refused: 2,
                    limit: 3
                }
            })
        );
        assert_eq!(EgressLine::parse(br#"{"conn":1,"phase":"closed"}"#), None);
        let EgressLine::Record(r) = EgressLine::parse(&line).unwrap() else {
            panic!("a record")
        };
        assert_eq!(r.target(), "CONNECT example.com:443");
        assert_eq!(r.outcome(), "refused: not in the allowlist");
        assert_eq!(EgressLine::parse(b"not json"), None);
    }
}
