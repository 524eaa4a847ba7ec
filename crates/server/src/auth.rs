//! API keys: random 256-bit secrets, stored as SHA-256 hashes, compared in
//! constant time, never logged. Scopes: read < run < admin.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key may do. Each scope includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Run,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "run" => Some(Scope::Run),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// The highest scope among `scopes`.
pub fn max_scope(scopes: &[String]) -> Option<Scope> {
    scopes.iter().filter_map(|s| Scope::parse(s)).max()
}

const PREFIX: &str = "avm_";

/// A new secret: "avm_" + 256 random bits, base64url.
pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

/// A short public id for a key.
pub fn new_key_id() -> String {
    let mut b = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("key_{}", hex::encode(b))
}

pub fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Constant-time equality of two hashes.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The WebSocket subprotocol a browser offers with the key (a browser
/// cannot set a header on a WebSocket, and the key must not go in a URL):
/// `new WebSocket(url, ["agentvm", "agentvm.key." + key])`. The server
/// answers choosing `agentvm`, never the entry holding the key.
pub const WS_PROTOCOL: &str = "agentvm";
pub const WS_KEY_PREFIX: &str = "agentvm.key.";

/// The secret a request presents: `X-API-Key`, or `Authorization: Bearer`,
/// or, on a WebSocket upgrade only, a `Sec-WebSocket-Protocol` entry
/// `agentvm.key.SECRET`.
pub fn presented(headers: &axum::http::HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    let upgrade = headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if upgrade {
        let offered = headers
            .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix(WS_KEY_PREFIX).map(str::to_string));
        if offered.is_some() {
            return offered;
        }
    }
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(token.trim().to_string())
    } else {
        None
    }
}

/// At most this many clients are tracked at once (the limiter's memory is
/// bounded whoever connects).
pub const MAX_BUCKETS: usize = 100_000;

/// A token bucket per key: `per_minute` requests, bursts up to a sixth of
/// that (at least 10).
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        RateLimiter {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok(())` or `Err(seconds to wait)`.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let rate = f64::from(self.per_minute) / 60.0;
        let burst = (f64::from(self.per_minute) / 6.0).max(10.0);
        let now = Instant::now();
        let mut b = match self.buckets.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        if b.len() >= MAX_BUCKETS && !b.contains_key(key) {
            // a bucket refilled to its burst says nothing: forget those
            let full = burst / rate;
            b.retain(|_, (_, last)| now.duration_since(*last).as_secs_f64() < full);
            if b.len() >= MAX_BUCKETS {
                // still full of active clients: newcomers wait
                return Err(60);
            }
        }
        let (tokens, last) = b.entry(key.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_prefixed() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(a.starts_with("avm_") && a.len() == 4 + 43, "{a}");
        assert_eq!(hash(&a).len(), 32);
        assert!(same(&hash(&a), &hash(&a)));
        assert!(!same(&hash(&a), &hash(&b)));
    }

    #[test]
    fn scopes_are_ordered() {
        assert_eq!(
            max_scope(&["read".into(), "admin".into()]),
            Some(Scope::Admin)
        );
        assert_eq!(max_scope(&["bogus".into()]), None);
        assert!(Scope::Run > Scope::Read);
    }

    #[test]
    fn rate_limit_refuses_beyond_the_burst() {
        let r = RateLimiter::new(60);
        let ok = (0..30).filter(|_| r.check("k").is_ok()).count();
        assert_eq!(ok, 10);
        assert!(matches!(r.check("k"), Err(w) if w >= 1));
        assert!(r.check("other").is_ok());
    }
}
