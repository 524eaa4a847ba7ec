//! The service layer: what a caller may do, whichever door it came in by.
//!
//! Every operation takes an authenticated [`Principal`] (who, from where),
//! checks its scope and ownership, validates its input, does the work
//! through the runner and the store, audits the outcome, and returns a
//! typed [`Error`]. The HTTP routes in `api/` parse requests, call one
//! method here and map the error to a status in one place; a WebSocket or
//! SSH door calls the same methods and maps the same errors its own way.
//!
//! It must never: know about HTTP (no status codes, headers or bodies
//! here; [`Error::code`] is the audit trail's vocabulary, which keeps the
//! numbers the HTTP API made familiar).

use std::path::PathBuf;
use std::sync::Arc;

use agentvm_store::{ApiKey, Job, Store};

use crate::auth::{self, Scope};
use crate::config::Config;
use crate::runner::Runner;
use crate::session::host::SessionHost;

mod jobs;
mod keys;
pub mod sessions;
mod streams;
pub mod workspaces;

pub use jobs::{check_repo, Ask, JobFilter};
pub use sessions::{valid_name, Viewer, SHELL};
pub use streams::{Slot, StreamSlots, STREAMS_PER_KEY};

/// A new id: `PREFIX_` and 16 hex digits from the OS's randomness.
pub fn new_id(prefix: &str) -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("{prefix}_{}", hex::encode(b))
}

/// Who is calling: a key that was checked, and the client's address (or
/// another door's name for it).
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: ApiKey,
    pub client: String,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        auth::max_scope(&self.key.scopes) == Some(Scope::Admin)
    }

    /// A job is its creator's; admin keys see every job.
    pub fn owns(&self, j: &Job) -> bool {
        self.is_admin() || j.key_id.as_deref() == Some(self.key.id.as_str())
    }

    /// Refused unless the key has `need`.
    pub fn need(&self, need: Scope) -> Result<()> {
        if auth::max_scope(&self.key.scopes) < Some(need) {
            return Err(Error::Forbidden(format!(
                "This API key lacks the {} scope",
                scope_name(need)
            )));
        }
        Ok(())
    }
}

pub fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Read => "read",
        Scope::Run => "run",
        Scope::Admin => "admin",
    }
}

/// Why an operation was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// One field of the request is wrong: `place` is "body" or "query".
    Invalid {
        place: &'static str,
        field: String,
        msg: String,
    },
    /// The request names something that is not there to use (an agent).
    Unknown(String),
    /// The key may not do this.
    Forbidden(String),
    /// No such thing, or not the caller's (the two look the same).
    NotFound(String),
    /// The thing is not in a state that allows this.
    Conflict(String),
    /// Too much at once (the queue, a key's streams): retry after `retry_s`.
    Busy { msg: String, retry_s: u64 },
    /// The server is going away: retry elsewhere or later.
    Unavailable { msg: String, retry_s: u64 },
    /// Our fault; what is shown says nothing about the internals.
    Internal(String),
}

impl Error {
    pub fn invalid(place: &'static str, field: &str, msg: impl Into<String>) -> Error {
        Error::Invalid {
            place,
            field: field.into(),
            msg: msg.into(),
        }
    }

    /// The number the audit trail records an outcome with ("rejected
    /// 409"): the HTTP status the API answers with, so the trail reads the
    /// same whichever door the call came in by.
    pub fn code(&self) -> u16 {
        match self {
            Error::Invalid { .. } => 422,
            Error::Unknown(_) => 400,
            Error::Forbidden(_) => 403,
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::Busy { .. } => 429,
            Error::Unavailable { .. } => 503,
            Error::Internal(_) => 500,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Invalid { field, msg, .. } => write!(f, "{field}: {msg}"),
            Error::Unknown(m)
            | Error::Forbidden(m)
            | Error::NotFound(m)
            | Error::Conflict(m)
            | Error::Internal(m) => f.write_str(m),
            Error::Busy { msg, .. } | Error::Unavailable { msg, .. } => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {}

impl From<agentvm_store::StoreError> for Error {
    fn from(e: agentvm_store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        Error::Internal("internal error: the database could not be reached".into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What every door shares: the runner, the store, the configuration, the
/// allowed roots and the per-key stream slots.
pub struct Service {
    pub runner: Arc<Runner>,
    pub store: Store,
    pub cfg: Arc<Config>,
    /// Canonical allowed roots.
    pub roots: Vec<PathBuf>,
    pub streams: StreamSlots,
    /// The live sessions.
    pub sessions: Arc<SessionHost>,
}

impl Service {
    pub fn new(runner: Arc<Runner>, store: Store, cfg: Arc<Config>, roots: Vec<PathBuf>) -> Self {
        let sessions = SessionHost::new(runner.clone(), store.clone(), cfg.clone());
        Service {
            sessions,
            runner,
            store,
            cfg,
            roots,
            streams: StreamSlots::new(STREAMS_PER_KEY),
        }
    }

    /// Audit an action. A failure to write is logged, never hidden from
    /// the operator, and does not undo what was done.
    pub async fn audit(
        &self,
        key_id: Option<&str>,
        action: &str,
        target: Option<&str>,
        client: &str,
        outcome: &str,
        detail: Option<&str>,
    ) {
        if let Err(e) = self
            .store
            .audit(key_id, action, target, Some(client), outcome, detail)
            .await
        {
            tracing::error!(error = %e, "writing the audit trail failed");
        }
    }

    /// Audit a call made by `p`.
    pub async fn record(
        &self,
        p: &Principal,
        action: &str,
        target: Option<&str>,
        outcome: &str,
        detail: Option<&str>,
    ) {
        self.audit(Some(&p.key.id), action, target, &p.client, outcome, detail)
            .await
    }

    /// Like [`Principal::need`], for a mutating call: a refusal is audited.
    pub async fn need_mut(
        &self,
        p: &Principal,
        need: Scope,
        action: &str,
        target: Option<&str>,
    ) -> Result<()> {
        if let Err(e) = p.need(need) {
            self.record(p, action, target, &format!("denied {}", e.code()), None)
                .await;
            return Err(e);
        }
        Ok(())
    }

    /// Audit a refusal of `action` and hand the error back.
    async fn rejected<T>(
        &self,
        p: &Principal,
        action: &str,
        target: Option<&str>,
        e: Error,
    ) -> Result<T> {
        self.record(p, action, target, &format!("rejected {}", e.code()), None)
            .await;
        Err(e)
    }

    /// One of `p`'s stream slots (followed output, downloads).
    pub fn slot(&self, p: &Principal) -> Result<Slot> {
        self.streams.take(&p.key.id)
    }
}

/// A page size and cursor as a list request gives them.
pub fn page_params(limit: Option<i64>, cursor: Option<&str>) -> Result<(i64, Option<i64>)> {
    let limit = limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(Error::invalid(
            "query",
            "limit",
            "limit must be between 1 and 200",
        ));
    }
    let cursor = match cursor {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| Error::invalid("query", "cursor", "invalid cursor"))?,
        ),
    };
    Ok((limit, cursor))
}

/// The first `limit` of `items` (fetched with one more) and the cursor of
/// the next page, if there is one.
pub fn paged<T>(
    mut items: Vec<T>,
    limit: i64,
    seq: impl Fn(&T) -> i64,
) -> (Vec<T>, Option<String>) {
    let more = items.len() as i64 > limit;
    items.truncate(limit.max(0) as usize);
    let next = if more {
        items.last().map(|i| seq(i).to_string())
    } else {
        None
    };
    (items, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(scopes: &[&str]) -> Principal {
        Principal {
            key: ApiKey {
                id: "key_a".into(),
                name: "a".into(),
                hash: vec![],
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                source: "api".into(),
                created_at: 0,
                revoked_at: None,
                network: None,
            },
            client: "127.0.0.1".into(),
        }
    }

    #[test]
    fn scopes_are_ordered_and_refusals_name_the_missing_one() {
        let r = principal(&["read"]);
        assert!(r.need(Scope::Read).is_ok());
        let e = r.need(Scope::Run).unwrap_err();
        assert_eq!(e.code(), 403);
        assert!(e.to_string().contains("run scope"), "{e}");
        let a = principal(&["admin"]);
        assert!(a.need(Scope::Run).is_ok() && a.is_admin());
        assert!(principal(&[]).need(Scope::Read).is_err());
    }

    #[test]
    fn pages_hold_the_limit_and_point_past_their_last() {
        let (p, next) = paged(vec![9, 8, 7], 2, |v| *v);
        assert_eq!((p, next.as_deref()), (vec![9, 8], Some("8")));
        let (p, next) = paged(vec![9, 8], 2, |v| *v);
        assert_eq!((p, next), (vec![9, 8], None));
        for bad in [Some(0), Some(201), Some(-1)] {
            assert_eq!(page_params(bad, None).unwrap_err().code(), 422);
        }
        for bad in ["0", "-3", "x", ""] {
            assert!(page_params(None, Some(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(page_params(None, Some("12")).unwrap(), (50, Some(12)));
    }
}
