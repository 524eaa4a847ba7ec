//! One SSH session channel: its requests (pty, env, window changes,
//! signals) until a shell or an exec, then a viewer of a session.
//!
//! Two tasks per channel, so that neither direction can stall the other:
//! this one reads what the client sends (input, resizes, signals, the
//! end), and `output` writes the session's frames, waiting on the client's
//! window. If one task waited on the other's direction, a client pasting
//! while it stops reading could block russh's connection loop, which is
//! also what would open the window again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_proto::api::SessionRequest;
use agentvm_store::SessionStatus;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, ChannelWriteHalf, Sig};

use crate::service::sessions::{Opening, Viewer};
use crate::service::{valid_name, Error, Principal, Service};
use crate::session::screen::Frame;
use crate::session::terminal::InputError;

/// After a shell's input ends, how often to look whether output stopped.
const EOF_TICK: Duration = Duration::from_millis(100);
/// ... how long it must be quiet for the viewer to detach,
const EOF_QUIET: Duration = Duration::from_millis(500);
/// ... and the longest wait.
const EOF_MOST: Duration = Duration::from_secs(5);

/// What the client asked for before its shell or exec.
#[derive(Default)]
struct Asked {
    /// rows, cols, from a pty request.
    pty: Option<(u16, u16)>,
    repo: Option<String>,
}

fn size(rows: u32, cols: u32) -> (u16, u16) {
    let max = u32::from(agentvm_proto::run::TTY_MAX);
    let c = |v: u32, d: u16| {
        if v == 0 {
            d
        } else {
            v.min(max) as u16
        }
    };
    (c(rows, 24), c(cols, 80))
}

enum Start {
    Shell,
    Exec(Vec<u8>),
}

pub(super) async fn session(
    svc: Arc<Service>,
    p: Principal,
    user: String,
    channel: Channel<Msg>,
    h: Handle,
) {
    let id = channel.id();
    let (mut rd, wr) = channel.split();
    let mut asked = Asked::default();
    let start = loop {
        let Some(m) = rd.wait().await else { return };
        match m {
            ChannelMsg::RequestPty {
                col_width,
                row_height,
                ..
            } => {
                asked.pty = Some(size(row_height, col_width));
                let _ = h.channel_success(id).await;
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            } if asked.pty.is_some() => {
                asked.pty = Some(size(row_height, col_width));
            }
            // env requests want no reply (OpenSSH sends them so); only
            // AGENTVM_REPO is read, everything else is dropped
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } if variable_name == "AGENTVM_REPO" => {
                asked.repo = Some(variable_value);
            }
            ChannelMsg::RequestShell { .. } => {
                let _ = h.channel_success(id).await;
                break Start::Shell;
            }
            ChannelMsg::Exec { command, .. } => {
                let _ = h.channel_success(id).await;
                break Start::Exec(command);
            }
            ChannelMsg::RequestSubsystem { name, .. } => {
                let why = format!(
                    "the {} subsystem is not offered: a session's files leave it as its patch (agentvm sessions patch NAME)",
                    agentvm_store::bounded(&name, 32)
                );
                // said before the failure: sftp closes on it
                say(&wr, &why).await;
                let _ = h.channel_failure(id).await;
                end(&wr, 1).await;
                return;
            }
            ChannelMsg::RequestX11 { .. } | ChannelMsg::AgentForward { .. } => {
                let _ = h.channel_failure(id).await;
            }
            ChannelMsg::Eof | ChannelMsg::Close => return,
            _ => {}
        }
    };
    let is_exec = matches!(start, Start::Exec(_));
    let opened = match start {
        Start::Shell => shell(&svc, &p, &user, &asked).await,
        Start::Exec(cmd) => exec(&svc, &p, &cmd, &asked).await,
    };
    let (v, fresh) = match opened {
        Ok(v) => v,
        Err(why) => {
            fail(&wr, &why).await;
            return;
        }
    };
    run(svc, p, v, fresh, is_exec, asked, rd, wr).await;
}

/// Attach to the caller's live session `user`, or start it.
async fn shell(
    svc: &Service,
    p: &Principal,
    user: &str,
    asked: &Asked,
) -> Result<(Viewer, bool), String> {
    if !valid_name(user) {
        return Err(format!(
            "{:?} is not a session name: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with - (ssh NAME@host)",
            agentvm_store::bounded(user, 64)
        ));
    }
    // two connections racing to start one name: the loser attaches
    let mut last = String::new();
    for _ in 0..2 {
        if let Ok(s) = svc.find_session(p, user).await {
            if s.status == SessionStatus::Running {
                match svc.attach(p, &s.id, "ssh", false).await {
                    Ok(v) => return Ok((v, false)),
                    // it ended between the two calls: start a new one
                    Err(Error::Conflict(_)) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        let (rows, cols) = asked.pty.unwrap_or((24, 80));
        let r = SessionRequest {
            name: Some(user.to_string()),
            repo_path: asked.repo.clone(),
            rows: Some(rows),
            cols: Some(cols),
            ..Default::default()
        };
        match open(svc, p, &r, false).await {
            // the name was taken between the two calls: attach to it
            Err(Error::Conflict(why)) => last = why,
            other => return other.map(|v| (v, true)).map_err(|e| e.to_string()),
        }
    }
    Err(format!(
        "session {user} could not be started or attached: {last}"
    ))
}

/// A fresh session running `sh -c COMMAND`, ended with the channel.
async fn exec(
    svc: &Service,
    p: &Principal,
    cmd: &[u8],
    asked: &Asked,
) -> Result<(Viewer, bool), String> {
    let Ok(cmd) = std::str::from_utf8(cmd) else {
        return Err("the command is not UTF-8".into());
    };
    let first = cmd.split_whitespace().next().unwrap_or("");
    if first == "scp" || (first == "rsync" && cmd.contains("--server")) {
        return Err(format!(
            "{first} is not offered: a session's files leave it as its patch (agentvm sessions patch NAME)"
        ));
    }
    let (rows, cols) = asked.pty.unwrap_or((24, 80));
    let r = SessionRequest {
        repo_path: asked.repo.clone(),
        command: Some(vec!["/bin/sh".into(), "-c".into(), cmd.to_string()]),
        rows: Some(rows),
        cols: Some(cols),
        ..Default::default()
    };
    open(svc, p, &r, asked.pty.is_none())
        .await
        .map(|v| (v, true))
        .map_err(|e| e.to_string())
}

async fn open(
    svc: &Service,
    p: &Principal,
    r: &SessionRequest,
    raw: bool,
) -> Result<Viewer, Error> {
    let open = Opening {
        door: Some("ssh"),
        raw,
    };
    match svc.open_session(p, r, open).await? {
        (_, Some(v)) => Ok(v),
        (s, None) => Err(Error::Conflict(format!(
            "session {} could not start: {}",
            s.name,
            s.error.as_deref().unwrap_or("its sandbox failed")
        ))),
    }
}

/// One line on the client's stderr, status 1, and the channel closed.
async fn fail(wr: &ChannelWriteHalf<Msg>, why: &str) {
    say(wr, why).await;
    end(wr, 1).await;
}

/// One line on the client's stderr.
async fn say(wr: &ChannelWriteHalf<Msg>, why: &str) {
    let line = format!("agentvm: {}\r\n", one_line(why));
    let _ = wr.extended_data_bytes(1, line.into_bytes()).await;
}

/// The exit status, and the channel closed.
async fn end(wr: &ChannelWriteHalf<Msg>, status: u32) {
    let _ = wr.exit_status(status).await;
    let _ = wr.eof().await;
    let _ = wr.close().await;
}

/// What a message may put on someone's terminal: printable, one line.
fn one_line(s: &str) -> String {
    agentvm_store::bounded(s, 500)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn signal_number(s: &Sig) -> Option<i32> {
    Some(match s {
        Sig::INT => libc::SIGINT,
        Sig::TERM => libc::SIGTERM,
        Sig::HUP => libc::SIGHUP,
        Sig::QUIT => libc::SIGQUIT,
        _ => return None,
    })
}

/// The attached viewer, both directions, until either side ends.
#[allow(clippy::too_many_arguments)]
async fn run(
    svc: Arc<Service>,
    p: Principal,
    mut v: Viewer,
    fresh: bool,
    exec: bool,
    asked: Asked,
    mut rd: russh::ChannelReadHalf,
    wr: ChannelWriteHalf<Msg>,
) {
    let live = v.live.clone();
    let me = v.attached.id;
    // the terminal the client has now, if this viewer writes
    if let Some((rows, cols)) = asked.pty {
        if !fresh {
            let _ = live.term.resize(me, rows, cols);
        }
    }
    let replay = std::mem::take(&mut v.attached.replay);
    let wr = Arc::new(wr);
    let t0 = Instant::now();
    let last_out = Arc::new(AtomicU64::new(0));
    let out = tokio::spawn(output(
        v,
        replay,
        wr.clone(),
        svc.clone(),
        t0,
        last_out.clone(),
    ));
    let mut told = false;
    // when a shell's input ended (`... | ssh -tt NAME@host`)
    let mut input_ended: Option<Instant> = None;
    loop {
        let m = match input_ended {
            None => rd.wait().await,
            Some(at) => tokio::select! {
                m = rd.wait() => m,
                _ = tokio::time::sleep(EOF_TICK) => {
                    let quiet = t0.elapsed().saturating_sub(Duration::from_millis(last_out.load(Ordering::Relaxed)));
                    if quiet >= EOF_QUIET || at.elapsed() >= EOF_MOST {
                        break;
                    }
                    continue;
                }
            },
        };
        let Some(m) = m else { break };
        match m {
            ChannelMsg::Data { data } => {
                live.touch();
                // the writer went away: the next to type takes over
                if !live.screen().may_write(me) && !live.screen().has_writer() {
                    live.screen().take_over(me);
                }
                match live.term.input(me, &data) {
                    Ok(()) => {}
                    Err(InputError::ReadOnly) if !told => {
                        told = true;
                        let n = "\r\nagentvm: another viewer is typing in this session; yours is ignored until they detach\r\n";
                        let _ = wr.extended_data_bytes(1, n.as_bytes().to_vec()).await;
                    }
                    Err(InputError::Paused) if !told => {
                        told = true;
                        let n = "\r\nagentvm: the session is paused; input is ignored until it is resumed\r\n";
                        let _ = wr.extended_data_bytes(1, n.as_bytes().to_vec()).await;
                    }
                    Err(_) => {}
                }
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            } => {
                let (rows, cols) = size(row_height, col_width);
                let _ = live.term.resize(me, rows, cols);
            }
            ChannelMsg::Signal { signal } if live.screen().may_write(me) => {
                if let Some(n) = signal_number(&signal) {
                    live.signal(n);
                }
            }
            // end of input: a terminal cannot pass it on. An exec's command
            // goes on until it ends; a shell's viewer detaches once the
            // output the last input caused has come out
            ChannelMsg::Eof if !exec => input_ended = Some(Instant::now()),
            ChannelMsg::Close => break,
            _ => {}
        }
        if out.is_finished() {
            break;
        }
    }
    out.abort();
    let _ = out.await;
    let _ = wr.eof().await;
    let _ = wr.close().await;
    // an exec's session is the connection's: it ends with it
    if exec && svc.sessions.get(&live.id).is_some() {
        let _ = svc.end_session(&p, &live.id).await;
    }
}

/// Bytes of queued output sent to a client as one message, at most (a
/// piece more than this is never split; OpenSSH's largest packet is 32 KiB).
const SEND_BATCH: usize = 32 * 1024;

/// The session's output to the client, then its exit status.
async fn output(
    mut v: Viewer,
    replay: Vec<u8>,
    wr: Arc<ChannelWriteHalf<Msg>>,
    svc: Arc<Service>,
    t0: Instant,
    last_out: Arc<AtomicU64>,
) {
    if !replay.is_empty() && wr.data_bytes(replay).await.is_err() {
        return;
    }
    let mut held = None;
    loop {
        let frame = match held.take() {
            Some(f) => Some(f),
            None => v.attached.frames.recv().await,
        };
        match frame {
            Some(Frame::Output(b)) => {
                // what else is already queued goes in the same message
                let mut data = b.to_vec();
                while data.len() < SEND_BATCH {
                    match v.attached.frames.try_recv() {
                        Ok(Frame::Output(more)) => data.extend_from_slice(&more),
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if wr.data_bytes(data).await.is_err() {
                    return;
                }
                let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
                last_out.store(ms, Ordering::Relaxed);
            }
            Some(Frame::Paused(p)) => {
                let n = if p {
                    format!("\r\nagentvm: session {} is paused (agentvm sessions resume {} lets it go on)\r\n", v.live.name, v.live.id)
                } else {
                    format!("\r\nagentvm: session {} resumed\r\n", v.live.name)
                };
                if wr.extended_data_bytes(1, n.into_bytes()).await.is_err() {
                    return;
                }
            }
            Some(Frame::End(code)) => {
                let s = svc.store.get_session(&v.live.id).await.ok().flatten();
                let code = s.and_then(|s| s.exit_code).or(code.map(i64::from));
                if let Some(c) = code {
                    let _ = wr.exit_status(u32::try_from(c).unwrap_or(255)).await;
                }
                break;
            }
            None => {
                if v.attached.lagged() {
                    let n = "\r\nagentvm: you fell too far behind the session's output and were detached; the session goes on: ssh again to attach\r\n";
                    let _ = wr.extended_data_bytes(1, n.as_bytes().to_vec()).await;
                }
                break;
            }
        }
    }
    let _ = wr.eof().await;
    let _ = wr.close().await;
}
