//! A terminal attached to a session over the attach WebSocket: raw mode
//! while attached (restored however it ends), the window size forwarded
//! on SIGWINCH, and the detach key `Enter ~ .` (as ssh's escape: typed at
//! the start of a line; `~~` sends one `~`). Binary messages are terminal
//! bytes both ways, text messages the JSON `AttachMessage`s (docs/API.md).

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsRawFd;

use agentvm_proto::api::AttachMessage;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::{api_path, Client};

/// What the person is told on attach.
pub const DETACH_HINT: &str = "detach: Enter ~ .  (~~ types a ~)";

/// How an attach ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The person detached (or the connection closed): the session goes on.
    Detached,
    /// The session ended, with its command's exit code when it had one.
    Exited(Option<i64>),
}

/// The detach key, watched in what is typed: `~` at the start of a line
/// is held back until the next byte says what it was.
#[derive(Debug)]
pub struct DetachKey {
    line_start: bool,
    tilde: bool,
}

impl Default for DetachKey {
    fn default() -> Self {
        DetachKey {
            line_start: true,
            tilde: false,
        }
    }
}

impl DetachKey {
    /// The bytes to send for `input`, and whether the person detached
    /// (what followed the detach key is dropped).
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &b in input {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return (out, true),
                    b'~' => {
                        out.push(b'~');
                        self.line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.line_start && b == b'~' {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.line_start = b == b'\r' || b == b'\n';
        }
        (out, false)
    }
}

/// The terminal's size, when stdout is one.
pub fn term_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into a local.
    let r = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// stdin in raw mode until dropped.
struct Raw(Option<libc::termios>);

impl Raw {
    fn enter() -> Raw {
        let fd = std::io::stdin().as_raw_fd();
        if !std::io::stdin().is_terminal() {
            return Raw(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a terminal.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Raw(None);
        }
        let saved = t;
        // SAFETY: cfmakeraw edits the local copy; tcsetattr applies it.
        unsafe {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
        Raw(Some(saved))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restoring the attributes read in enter().
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, t) };
        }
    }
}

/// A line for the person, in raw mode too.
fn say(msg: &str) {
    let mut e = std::io::stderr().lock();
    let _ = write!(e, "\r\n[agentvm] {msg}\r\n");
    let _ = e.flush();
}

fn ws_url(base: &str, path: &str) -> Result<String, String> {
    let rest = if let Some(r) = base.strip_prefix("https://") {
        format!("wss://{r}")
    } else if let Some(r) = base.strip_prefix("http://") {
        format!("ws://{r}")
    } else {
        return Err(format!("{base} is not an http:// or https:// URL"));
    };
    Ok(format!("{rest}{path}"))
}

/// Attach this terminal to session `id` until the person detaches, the
/// connection closes or the session ends.
pub async fn attach(c: &Client, id: &str, read_only: bool) -> Result<Ended, String> {
    let q: &[(&str, &str)] = if read_only {
        &[("read_only", "true")]
    } else {
        &[]
    };
    let path = api_path(&["v1", "sessions", id, "attach"], q)?;
    let mut req = ws_url(&c.url, &path)?
        .into_client_request()
        .map_err(|e| e.to_string())?;
    if let Some(k) = &c.key {
        let v = k
            .parse()
            .map_err(|_| "the API key is not a valid header value".to_string())?;
        req.headers_mut().insert("x-api-key", v);
    }
    let ws = match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status();
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            let detail = serde_json::from_str::<agentvm_proto::api::ErrorBody>(&body)
                .map(|e| e.to_string())
                .unwrap_or(body);
            return Err(format!(
                "{} {}: {detail}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ));
        }
        Err(e) => {
            return Err(format!("cannot attach through {}: {e}", c.url));
        }
    };
    let (mut tx, mut rx) = ws.split();
    let raw = Raw::enter();
    // stdin is read on a thread of its own: a blocking read that the
    // process leaves behind when it exits
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .map_err(|e| e.to_string())?;
    let resize = |tx_size: Option<(u16, u16)>| {
        tx_size.map(|(rows, cols)| {
            Message::Text(
                serde_json::to_string(&AttachMessage::Resize { rows, cols })
                    .unwrap_or_default()
                    .into(),
            )
        })
    };
    if let Some(m) = resize(term_size()) {
        let _ = tx.send(m).await;
    }
    let mut key = DetachKey::default();
    let mut stdin_open = true;
    let mut out = std::io::stdout();
    let ended = loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<AttachMessage>(&t) {
                    Ok(AttachMessage::Hello { name, writer, paused, .. }) => {
                        let mode = if paused {
                            ", which is paused (agentvm sessions resume lets it go on)"
                        } else if writer {
                            ""
                        } else {
                            ", read-only (another viewer writes)"
                        };
                        say(&format!("attached to session {name}{mode}; {DETACH_HINT}"));
                    }
                    Ok(AttachMessage::Paused { paused: true }) => say("the session is paused: input is ignored until it is resumed"),
                    Ok(AttachMessage::Paused { paused: false }) => say("the session resumed"),
                    Ok(AttachMessage::Writer { writer: true }) => say("you write now"),
                    Ok(AttachMessage::Writer { writer: false }) => say("another viewer took over: you watch read-only"),
                    Ok(AttachMessage::Exit { status, exit_code }) => {
                        let code = exit_code.map(|c| format!(", exit code {c}")).unwrap_or_default();
                        say(&format!("the session ended ({status}{code})"));
                        break Ended::Exited(exit_code);
                    }
                    Ok(AttachMessage::Notice { detail }) => say(&detail),
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break Ended::Detached,
                Some(Ok(_)) => {}
            },
            b = in_rx.recv(), if stdin_open => match b {
                Some(b) => {
                    let (send, detach) = key.feed(&b);
                    if !send.is_empty() && tx.send(Message::Binary(send.into())).await.is_err() {
                        break Ended::Detached;
                    }
                    if detach {
                        let m = serde_json::to_string(&AttachMessage::Detach).unwrap_or_default();
                        let _ = tx.send(Message::Text(m.into())).await;
                        break Ended::Detached;
                    }
                }
                // stdin closed (a pipe that ended): keep watching until the
                // session ends or the server closes
                None => stdin_open = false,
            },
            _ = winch.recv() => {
                if let Some(m) = resize(term_size()) {
                    let _ = tx.send(m).await;
                }
            }
        }
    };
    let _ = tx.close().await;
    drop(raw);
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detach_key_is_tilde_dot_at_a_line_start() {
        let mut k = DetachKey::default();
        assert_eq!(k.feed(b"~."), (vec![], true), "at the very start");
        let mut k = DetachKey::default();
        assert_eq!(k.feed(b"ls ~.\r"), (b"ls ~.\r".to_vec(), false), "mid-line");
        assert_eq!(k.feed(b"~"), (vec![], false), "held back");
        assert_eq!(k.feed(b"."), (vec![], true));
        let mut k = DetachKey::default();
        assert_eq!(k.feed(b"~~x"), (b"~x".to_vec(), false), "~~ is one ~");
        let mut k = DetachKey::default();
        assert_eq!(
            k.feed(b"~x"),
            (b"~x".to_vec(), false),
            "~ then anything else"
        );
        let mut k = DetachKey::default();
        assert_eq!(
            k.feed(b"echo\n~.rest"),
            (b"echo\n".to_vec(), true),
            "after a newline, the rest dropped"
        );
    }

    #[test]
    fn ws_urls_follow_the_scheme() {
        assert_eq!(ws_url("http://h:1", "/x").as_deref(), Ok("ws://h:1/x"));
        assert_eq!(ws_url("https://h", "/x").as_deref(), Ok("wss://h/x"));
        assert!(ws_url("ftp://h", "/x").is_err());
    }
}
