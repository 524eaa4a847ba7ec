//! # agentvm-egress: the network wall's one door
//!
//! Owns the allowlist proxy a sandbox reaches through a Unix socket: HTTP
//! CONNECT tunnels and plain-HTTP forwarding. It resolves names itself,
//! refuses IP literals the policy does not name, refuses loopback, private,
//! link-local, unique-local and metadata addresses even when an allowlisted
//! name resolves to them (unless the policy names the address), checks that
//! a tunnel's TLS SNI is the host it allowed, and records every decision with
//! the bytes moved each way.
//!
//! It must never: connect anywhere before the policy said yes; trust a name
//! the client resolved; know about sandboxes, jobs or HTTP APIs.

//! Tunnelled bytes are moved with splice(2), never copied through this
//! process.

pub use agentvm_proto::network as policy;
mod sni;
mod splice;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use agentvm_proto::egress::{
    EgressLine, EgressRecord as Record, Phase, Unrecorded, RECORD_LIMIT,
};
pub use policy::{NetworkMode, Policy};

/// The header a refusal carries.
pub const DENY_HEADER: &str = "X-AgentVM-Egress-Denied";

const HEAD_MAX: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// At most this many connections are handled at once; more are refused
/// (`too-many-connections`).
pub const MAX_ACTIVE: u64 = 256;

/// Whether an accept error is passing (the listener can go on).
fn accept_goes_on(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
        )
    )
}

/// A proxy for one sandbox.
pub struct Proxy {
    policy: Policy,
    records: Mutex<Vec<Record>>,
    sinks: Vec<Mutex<std::fs::File>>,
    conns: AtomicU64,
    limit: u64,
    unrecorded_allowed: AtomicU64,
    unrecorded_refused: AtomicU64,
    announced: AtomicBool,
    /// Connections being handled right now.
    active: AtomicU64,
    idle: tokio::sync::Notify,
}

/// Counts a connection as active while it lives.
struct Active<'a>(&'a Proxy);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Proxy {
    /// `sinks`: files (or pipes) that receive every record as a JSON line,
    /// as it is made: an allowed connection's `open` record when it
    /// connects, and every `closed` one. A write that fails (a full
    /// non-blocking pipe, a reader gone) is dropped for that sink alone.
    pub fn new(policy: Policy, sinks: Vec<std::fs::File>) -> Arc<Proxy> {
        Proxy::with_record_limit(policy, sinks, RECORD_LIMIT)
    }

    /// Like [`Proxy::new`], recording only the first `limit` connections
    /// one by one.
    pub fn with_record_limit(policy: Policy, sinks: Vec<std::fs::File>, limit: u64) -> Arc<Proxy> {
        Arc::new(Proxy {
            policy,
            records: Mutex::new(Vec::new()),
            sinks: sinks.into_iter().map(Mutex::new).collect(),
            conns: AtomicU64::new(0),
            limit,
            unrecorded_allowed: AtomicU64::new(0),
            unrecorded_refused: AtomicU64::new(0),
            announced: AtomicBool::new(false),
            active: AtomicU64::new(0),
            idle: tokio::sync::Notify::new(),
        })
    }

    /// Wait, at most `within`, until no connection is being handled, so
    /// each has written its final record. True when all have.
    pub async fn drain(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let idle = self.idle.notified();
            if self.active.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.active.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// The final (`closed`) records so far.
    pub fn records(&self) -> Vec<Record> {
        match self.records.lock() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The connections past the record limit so far, if any.
    pub fn unrecorded(&self) -> Option<Unrecorded> {
        let u = Unrecorded {
            allowed: self.unrecorded_allowed.load(Ordering::SeqCst),
            refused: self.unrecorded_refused.load(Ordering::SeqCst),
            limit: self.limit,
        };
        (u.allowed + u.refused > 0).then_some(u)
    }

    /// Write `{"unrecorded": {...}}` to the sinks: when the limit is first
    /// passed, and by whoever stops the proxy, with the final counts.
    pub fn write_unrecorded(&self) {
        if let Some(u) = self.unrecorded() {
            self.write_line(&serde_json::json!({ "unrecorded": u }));
        }
    }

    fn emit(&self, r: &Record) {
        if r.conn > self.limit {
            return;
        }
        self.write_line(r);
    }

    fn write_line(&self, v: &impl Serialize) {
        let Ok(mut line) = serde_json::to_vec(v) else {
            return;
        };
        line.push(b'\n');
        for s in &self.sinks {
            if let Ok(mut f) = s.lock() {
                use std::io::Write;
                // one write(2) of a line under PIPE_BUF is atomic on a pipe
                let _ = f.write_all(&line);
            }
        }
    }

    fn record(&self, mut r: Record) {
        if r.conn > self.limit {
            let n = if r.allowed {
                &self.unrecorded_allowed
            } else {
                &self.unrecorded_refused
            };
            n.fetch_add(1, Ordering::SeqCst);
            if !self.announced.swap(true, Ordering::SeqCst) {
                // the first one past the limit says so at once
                self.write_unrecorded();
            }
            return;
        }
        r.phase = Phase::Closed;
        self.emit(&r);
        match self.records.lock() {
            Ok(mut v) => v.push(r),
            Err(p) => p.into_inner().push(r),
        }
    }

    /// Serve connections from a Unix socket until the listener fails.
    pub async fn serve_unix(self: Arc<Self>, l: tokio::net::UnixListener) {
        loop {
            match l.accept().await {
                Ok((s, _)) => self.spawn(s),
                Err(e) if !accept_goes_on(&e) => return,
                // out of descriptors or memory for a moment: the
                // connections that hold them will end
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Serve connections from a TCP listener (tests and benchmarks).
    pub async fn serve_tcp(self: Arc<Self>, l: tokio::net::TcpListener) {
        loop {
            match l.accept().await {
                Ok((s, _)) => self.spawn(s),
                Err(e) if !accept_goes_on(&e) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn spawn<S>(self: &Arc<Self>, s: S)
    where
        S: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + splice::Socket
            + Unpin
            + Send
            + Sync
            + 'static,
    {
        self.active.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        tokio::spawn(async move { me.handle(s).await });
    }

    /// Decide where (if anywhere) `host:port` may be reached.
    async fn decide(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            if self.policy.names_ip(ip, port) {
                return Ok(vec![SocketAddr::new(ip, port)]);
            }
            return Err("ip-literal-not-allowlisted".into());
        }
        if !self.policy.allows_name(host, port) {
            return Err("host-not-allowlisted".into());
        }
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host, port)).await {
            Ok(a) => a.collect(),
            Err(_) => return Err("resolve-failed".into()),
        };
        if addrs.is_empty() {
            return Err("resolve-failed".into());
        }
        // DNS rebinding: an allowlisted name must not lead inside
        for a in &addrs {
            if let Some(why) = policy::forbidden(a.ip()) {
                if !self.policy.names_ip(a.ip(), port) {
                    return Err(format!("resolves-to-{}:{}", why.replace(' ', "-"), a.ip()));
                }
            }
        }
        Ok(addrs)
    }

    async fn handle<S>(&self, mut s: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + splice::Socket + Unpin,
    {
        // counted by the accept loop, uncounted when this returns
        let _active = Active(self);
        let conn = self.conns.fetch_add(1, Ordering::Relaxed) + 1;
        let mut buf = Vec::with_capacity(2048);
        let head_len = loop {
            let mut chunk = [0u8; 4096];
            let n = match tokio::time::timeout(CONNECT_TIMEOUT, s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(n)) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > HEAD_MAX {
                let _ = s.write_all(&refusal(431, "head-too-large")).await;
                return;
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let (method, target) = match req.parse(&buf[..head_len]) {
            Ok(httparse::Status::Complete(_)) => (
                req.method.unwrap_or("").to_string(),
                req.path.unwrap_or("").to_string(),
            ),
            _ => {
                let _ = s.write_all(&refusal(400, "malformed-request")).await;
                return;
            }
        };
        let connect = method.eq_ignore_ascii_case("CONNECT");
        let parsed = if connect {
            split_authority(&target, 443)
        } else {
            split_url(&target)
        };
        let Some((host, port, origin_path)) = parsed else {
            self.record(Record {
                ts: now_ms(),
                conn,
                phase: Phase::Closed,
                method,
                host: target,
                port: 0,
                allowed: false,
                reason: Some("unsupported-target".into()),
                address: None,
                bytes_up: 0,
                bytes_down: 0,
            });
            let _ = s.write_all(&refusal(400, "unsupported-target")).await;
            return;
        };
        let mut rec = Record {
            ts: now_ms(),
            conn,
            phase: Phase::Open,
            method: method.clone(),
            host: host.clone(),
            port,
            allowed: false,
            reason: None,
            address: None,
            bytes_up: 0,
            bytes_down: 0,
        };
        // each open connection holds descriptors and pipe buffers in this
        // process, outside the sandbox's limits
        let decided = if self.active.load(Ordering::SeqCst) > MAX_ACTIVE {
            Err("too-many-connections".to_string())
        } else {
            self.decide(&host, port).await
        };
        let addrs = match decided {
            Ok(a) => a,
            Err(why) => {
                // recorded before the client can see the answer: once it has,
                // the whole sandbox may end at any moment
                let code = if why == "too-many-connections" {
                    429
                } else {
                    403
                };
                let answer = refusal(code, &why);
                rec.reason = Some(why);
                self.record(rec);
                let _ = s.write_all(&answer).await;
                return;
            }
        };
        let mut up = None;
        for a in &addrs {
            if let Ok(Ok(c)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
                rec.address = Some(a.to_string());
                up = Some(c);
                break;
            }
        }
        let Some(mut up) = up else {
            rec.reason = Some("connect-failed".into());
            self.record(rec);
            let _ = s.write_all(&refusal(502, "connect-failed")).await;
            return;
        };
        let _ = up.set_nodelay(true);
        let rest = buf[head_len..].to_vec();
        if connect {
            if s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            // The first bytes of the tunnel: a TLS ClientHello names the
            // server it wants; it must be the host that was allowed.
            let mut first = rest;
            if host.parse::<IpAddr>().is_err() {
                while sni::needs_more(&first) && first.len() < HEAD_MAX {
                    let mut chunk = [0u8; 4096];
                    match tokio::time::timeout(CONNECT_TIMEOUT, s.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => first.extend_from_slice(&chunk[..n]),
                        _ => break,
                    }
                }
                if let Some(name) = sni::server_name(&first) {
                    if !name
                        .trim_end_matches('.')
                        .eq_ignore_ascii_case(host.trim_end_matches('.'))
                    {
                        rec.reason = Some(format!("sni-mismatch:{name}"));
                        self.record(rec);
                        return;
                    }
                }
            }
            rec.allowed = true;
            if up.write_all(&first).await.is_err() {
                self.record(rec);
                return;
            }
            rec.bytes_up = first.len() as u64;
        } else {
            // origin-form request line, no proxy headers, one request per
            // connection
            let mut head = format!("{method} {origin_path} HTTP/1.1\r\n").into_bytes();
            for h in req.headers.iter() {
                let n = h.name.to_ascii_lowercase();
                if n.starts_with("proxy-") || n == "connection" || n == "keep-alive" {
                    continue;
                }
                head.extend_from_slice(h.name.as_bytes());
                head.extend_from_slice(b": ");
                head.extend_from_slice(h.value);
                head.extend_from_slice(b"\r\n");
            }
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            head.extend_from_slice(&rest);
            rec.allowed = true;
            if up.write_all(&head).await.is_err() {
                self.record(rec);
                return;
            }
            rec.bytes_up = head.len() as u64;
        }
        self.emit(&rec);
        let ((a, b), err) = splice::both(&s, &up).await;
        rec.bytes_up += a;
        rec.bytes_down += b;
        if let Some(e) = err {
            rec.reason = Some(format!("tunnel-ended:{}", e.kind()));
        }
        self.record(rec);
    }
}

fn refusal(code: u16, why: &str) -> Vec<u8> {
    let text = match code {
        403 => "Forbidden",
        429 => "Too Many Requests",
        400 => "Bad Request",
        431 => "Request Header Fields Too Large",
        _ => "Bad Gateway",
    };
    let body = format!("agentvm egress: {why}\n");
    format!(
        "HTTP/1.1 {code} {text}\r\n{DENY_HEADER}: {why}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// "host:port" or "[v6]:port" (CONNECT's authority form).
fn split_authority(a: &str, default_port: u16) -> Option<(String, u16, String)> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (a.to_string(), default_port),
        }
    };
    if host.is_empty() || port == 0 || host.contains(['/', '@', ' ']) {
        return None;
    }
    Some((host.to_ascii_lowercase(), port, String::new()))
}

/// "http://host[:port]/path?q" (plain HTTP's absolute form).
fn split_url(u: &str) -> Option<(String, u16, String)> {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("HTTP://"))?;
    let (auth, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.contains('@') {
        return None; // no credentials in proxied URLs
    }
    let (h, p, _) = split_authority(auth, 80)?;
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Some((h, p, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            split_authority("Example.com:443", 443),
            Some(("example.com".into(), 443, String::new()))
        );
        assert_eq!(
            split_authority("[::1]:8080", 443),
            Some(("::1".into(), 8080, String::new()))
        );
        assert_eq!(split_authority("host:0", 443), None);
        assert_eq!(
            split_url("http://h:81/a/b?c"),
            Some(("h".into(), 81, "/a/b?c".into()))
        );
        assert_eq!(
            split_url("http://h?x"),
            Some(("h".into(), 80, "/?x".into()))
        );
        assert_eq!(split_url("http://user:pw@h/"), None);
        assert_eq!(split_url("https://h/"), None);
        assert_eq!(split_url("/relative"), None);
    }

    #[test]
    fn refusal_says_why_in_a_header() {
        let r = String::from_utf8(refusal(403, "host-not-allowlisted")).unwrap_or_default();
        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(r.contains("X-AgentVM-Egress-Denied: host-not-allowlisted\r\n"));
    }
}
