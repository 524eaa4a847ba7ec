//! The proxy against real sockets on loopback.

// A test crate: an unwrap that fails is a failed test (clippy allows it in
// #[test] functions; this covers the helpers too).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use agentvm_egress::{Policy, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP server that answers every request with "hello".
async fn http_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = vec![0u8; 4096];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                    )
                    .await;
            });
        }
    });
    port
}

/// A TCP echo server.
async fn echo_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

async fn proxy(policy: &str) -> (u16, Arc<Proxy>) {
    proxy_with(policy, Vec::new()).await
}

async fn proxy_with(policy: &str, sinks: Vec<std::fs::File>) -> (u16, Arc<Proxy>) {
    let p = Proxy::new(Policy::parse(policy).unwrap(), sinks);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(p.clone().serve_tcp(l));
    (port, p)
}

async fn exchange(port: u16, req: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn plain_http_to_an_allowed_address_is_forwarded_and_recorded() {
    let up = http_upstream().await;
    let (pp, p) = proxy(&format!("127.0.0.1:{up}")).await;
    let r = exchange(pp, format!("GET http://127.0.0.1:{up}/x HTTP/1.1\r\nHost: 127.0.0.1:{up}\r\nProxy-Authorization: secret\r\n\r\n").as_bytes()).await;
    assert!(
        r.starts_with("HTTP/1.1 200 OK") && r.ends_with("hello"),
        "{r}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let rec = p.records();
    assert_eq!(rec.len(), 1);
    assert!(rec[0].allowed);
    assert_eq!(rec[0].host, "127.0.0.1");
    assert!(rec[0].bytes_down > 0 && rec[0].bytes_up > 0, "{rec:?}");
}

#[tokio::test]
async fn refusals_are_403_with_a_reason_header() {
    let up = http_upstream().await;
    let (pp, p) = proxy(&format!("127.0.0.1:{up},localhost:{up},api.example.com")).await;
    for (req, why) in [
        (
            "GET http://not-listed.example/ HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            "host-not-allowlisted",
        ),
        (
            format!("GET http://127.0.0.2:{up}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            "ip-literal-not-allowlisted",
        ),
        (
            format!(
                "GET http://127.0.0.1:{}/ HTTP/1.1\r\nHost: x\r\n\r\n",
                up + 1
            ),
            "ip-literal-not-allowlisted",
        ),
        (
            "CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n".to_string(),
            "ip-literal-not-allowlisted",
        ),
        (
            "GET https://api.example.com/ HTTP/1.1\r\n\r\n".to_string(),
            "unsupported-target",
        ),
    ] {
        let r = exchange(pp, req.as_bytes()).await;
        assert!(
            r.starts_with("HTTP/1.1 403") || r.starts_with("HTTP/1.1 400"),
            "{req}: {r}"
        );
        assert!(
            r.contains(&format!("X-AgentVM-Egress-Denied: {why}")),
            "{req}: {r}"
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let rec = p.records();
    assert!(rec.iter().all(|r| !r.allowed), "{rec:?}");
    assert_eq!(rec.len(), 5);
    // an allowlisted name that resolves to loopback (DNS rebinding) is
    // refused unless the address itself is named
    let (pp2, _) = proxy(&format!("localhost:{up}")).await;
    let r = exchange(
        pp2,
        format!("GET http://localhost:{up}/ HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(
        r.contains("X-AgentVM-Egress-Denied: resolves-to-loopback-address"),
        "{r}"
    );
}

fn client_hello(name: &str) -> Vec<u8> {
    let n = name.as_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
    sni.extend_from_slice(n);
    let mut exts = vec![0, 0];
    exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    exts.extend_from_slice(&sni);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[tokio::test]
async fn connect_tunnels_and_checks_the_sni() {
    let up = echo_upstream().await;
    // the name resolves to loopback, so its addresses are named explicitly
    let (pp, p) = proxy(&format!("localhost:{up},127.0.0.1:{up},[::1]:{up}")).await;
    // matching SNI: the tunnel carries bytes both ways
    let mut s = TcpStream::connect(("127.0.0.1", pp)).await.unwrap();
    s.write_all(format!("CONNECT localhost:{up} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 39];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 Connection established\r\n\r\n");
    let hello = client_hello("localhost");
    s.write_all(&hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, hello, "the tunnel did not echo");
    drop(s);
    // another name in the SNI: the tunnel is closed, nothing forwarded
    let mut s = TcpStream::connect(("127.0.0.1", pp)).await.unwrap();
    s.write_all(format!("CONNECT localhost:{up} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s.read_exact(&mut head).await.unwrap();
    s.write_all(&client_hello("evil.example")).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "bytes came back through a refused tunnel");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let rec = p.records();
    assert!(
        rec.iter()
            .any(|r| r.allowed && r.bytes_down >= hello.len() as u64),
        "{rec:?}"
    );
    assert!(
        rec.iter()
            .any(|r| !r.allowed && r.reason.as_deref() == Some("sni-mismatch:evil.example")),
        "{rec:?}"
    );
}

/// A server that answers every request with `size` bytes.
async fn bulk_upstream(size: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = vec![0u8; 4096];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n").as_bytes()).await;
                let chunk = vec![b'z'; 1 << 20];
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    port
}

/// Large transfers through both paths, repeatedly, under a deadline: a
/// stalled relay fails here instead of hanging a download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfers_never_stall() {
    const SIZE: usize = 32 << 20;
    let up = bulk_upstream(SIZE).await;
    let (pp, p) = proxy(&format!("127.0.0.1:{up}")).await;
    for round in 0..6 {
        let connect = round % 2 == 1;
        let fut = async {
            let mut s = TcpStream::connect(("127.0.0.1", pp)).await.unwrap();
            if connect {
                s.write_all(format!("CONNECT 127.0.0.1:{up} HTTP/1.1\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut head = [0u8; 39];
                s.read_exact(&mut head).await.unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .unwrap();
            } else {
                s.write_all(
                    format!("GET http://127.0.0.1:{up}/ HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                )
                .await
                .unwrap();
            }
            let mut n = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            n
        };
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), fut).await;
        let got = got.unwrap_or_else(|_| panic!("round {round} (connect: {connect}) stalled"));
        assert!(got > SIZE, "round {round}: {got} bytes");
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        p.records()
            .iter()
            .all(|r| r.allowed && r.bytes_down > SIZE as u64),
        "{:?}",
        p.records()
    );
}

/// The JSON lines written to `f` so far.
fn lines(f: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(f)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test]
async fn sinks_see_a_connection_open_while_it_lasts_then_closed() {
    let echo = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.jsonl");
    let f = std::fs::File::create(&log).unwrap();
    let (port, p) = proxy_with(&format!("127.0.0.1:{echo}"), vec![f]).await;
    // a refusal is final at once
    let r = exchange(port, b"CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!("CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut b = [0u8; 39];
    s.read_exact(&mut b).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).await.unwrap();
    // the tunnel is still open: the sink already has its decision
    let open = lines(&log);
    assert_eq!(open.len(), 2, "{open:?}");
    assert_eq!(open[0]["phase"], "closed");
    assert_eq!(open[0]["allowed"], false);
    assert_eq!(open[1]["phase"], "open");
    assert_eq!(open[1]["allowed"], true);
    assert_eq!(open[1]["port"], echo);
    assert_ne!(open[0]["conn"], open[1]["conn"]);
    assert_eq!(p.records().len(), 1, "records() holds final decisions only");
    drop(s);
    let mut all = Vec::new();
    for _ in 0..100 {
        all = lines(&log);
        if all.len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[2]["phase"], "closed");
    assert_eq!(all[2]["conn"], open[1]["conn"]);
    assert_eq!(all[2]["bytes_up"], 4);
    assert_eq!(all[2]["bytes_down"], 4);
}

#[tokio::test]
async fn past_the_record_limit_connections_are_counted_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.jsonl");
    let f = std::fs::File::create(&log).unwrap();
    let p = Proxy::with_record_limit(Policy::parse("example.com").unwrap(), vec![f], 2);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(p.clone().serve_tcp(l));
    for i in 0..5 {
        // one at a time, so the numbering is the order here
        let r = exchange(
            port,
            format!("CONNECT 10.0.0.{i}:443 HTTP/1.1\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 403"),
            "past the limit the policy still holds: {r}"
        );
    }
    assert_eq!(p.records().len(), 2);
    let u = p.unrecorded().unwrap_or_default();
    assert_eq!((u.allowed, u.refused, u.limit), (0, 3, 2));
    p.write_unrecorded();
    let l = lines(&log);
    // two records, the notice when the limit was first passed, the final count
    assert_eq!(l.len(), 4, "{l:?}");
    assert_eq!(l[1]["conn"], 2);
    assert_eq!(l[2]["unrecorded"]["refused"], 1, "{l:?}");
    assert_eq!(l[3]["unrecorded"]["refused"], 3, "{l:?}");
    assert_eq!(l[3]["unrecorded"]["limit"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_concurrency_limit_are_refused_with_429() {
    // about eight descriptors per held connection live in this process
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(8192).max(lim.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let echo = echo_upstream().await;
    let (port, p) = proxy(&format!("127.0.0.1:{echo}")).await;
    let mut held = Vec::new();
    for _ in 0..agentvm_egress::MAX_ACTIVE {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(format!("CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut b = [0u8; 39];
        s.read_exact(&mut b).await.unwrap();
        assert!(b.starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let r = exchange(
        port,
        format!("CONNECT 127.0.0.1:{echo} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    assert!(
        r.contains("X-AgentVM-Egress-Denied: too-many-connections"),
        "{r}"
    );
    assert!(p
        .records()
        .iter()
        .any(|r| r.reason.as_deref() == Some("too-many-connections")));
    // once some close, new ones are served again
    held.truncate(10);
    let mut ok = false;
    for _ in 0..100 {
        let r = exchange(port, b"GET http://127.0.0.1:1/ HTTP/1.1\r\n\r\n").await;
        if !r.contains("too-many-connections") {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok, "the limit did not free up");
}
