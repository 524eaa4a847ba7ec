//! A session's terminal on the server side: the primary side of the
//! sandbox's terminal (as `agentvm_sandbox::receive_console` hands it
//! over), its output redacted and sent to the [`Screen`] and to the
//! recording, its input and size taken from the writer only.
//!
//! The redactor holds back the last bytes of output that could begin a
//! secret; on a terminal those are the prompt the user waits for, so what
//! is held is let out (redacted) once output pauses for [`IDLE_FLUSH`]. A
//! secret printed in two pieces further apart than that passes in halves,
//! which is the same limit as any encoding of it (docs/SECURITY.md: the
//! redactor is against accidents, not against a program that means to
//! leak what it was given).

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::unix::AsyncFd;

use super::screen::Screen;
use crate::recording::Utf8;
use crate::redact::Redactor;

/// How long output may pause before held-back bytes are let out.
pub const IDLE_FLUSH: Duration = Duration::from_millis(25);
/// How long a viewer whose queue is full is waited for before it is
/// dropped (the session's output waits meanwhile).
pub const VIEWER_GRACE: Duration = Duration::from_secs(2);

/// Why input or a resize did not reach the terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputError {
    /// This viewer reads only (another one writes).
    ReadOnly,
    /// The program is not reading its input: nothing more is taken now.
    Busy,
    /// The terminal is gone.
    Closed,
    /// The session is paused: nothing is taken until it resumes.
    Paused,
    /// Rows and columns must be 1 to 1000.
    BadSize,
}

/// The asciicast v2 file of a session, written as it runs (flushed
/// whenever output pauses, and at the end), up to a size: past it one
/// last event says so and the recording stops, the session going on.
pub struct Recording {
    out: std::io::BufWriter<std::fs::File>,
    start: Instant,
    utf8: Utf8,
    written: u64,
    max: u64,
    full: bool,
    inputs: bool,
    /// The event being written, kept between events (up to [`LINE_KEEP`]).
    line: Vec<u8>,
}

/// Bytes of the recording's file buffer: several pieces of output per
/// write when output runs fast.
const RECORDING_BUFFER: usize = 64 * 1024;
/// The largest event buffer kept for the next event.
const LINE_KEEP: usize = 64 * 1024;

impl Recording {
    /// Create `path` (0600, never an existing file) and write the header.
    pub fn create(
        path: &Path,
        rows: u16,
        cols: u16,
        title: &str,
        command: &str,
        max: u64,
    ) -> std::io::Result<Recording> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let mut r = Recording {
            out: std::io::BufWriter::with_capacity(RECORDING_BUFFER, f),
            start: Instant::now(),
            utf8: Utf8::default(),
            written: 0,
            max,
            full: false,
            inputs: false,
            line: Vec::new(),
        };
        let header = json!({
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": agentvm_store::now_ms() / 1000,
            "title": title,
            "command": command,
            "env": {"TERM": "xterm-256color", "SHELL": "/bin/sh"},
        });
        writeln!(r.out, "{header}")?;
        r.out.flush()?;
        Ok(r)
    }

    fn event(&mut self, kind: &str, text: &str) -> std::io::Result<()> {
        if text.is_empty() || self.full {
            return Ok(());
        }
        let t = self.start.elapsed().as_secs_f64();
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        crate::recording::event_line(&mut line, t, kind, text);
        let r = self.put(t, &line);
        if line.capacity() <= LINE_KEEP {
            self.line = line;
        }
        r
    }

    fn put(&mut self, t: f64, line: &[u8]) -> std::io::Result<()> {
        if self.written + line.len() as u64 > self.max {
            self.full = true;
            let note = format!(
                "\r\n[agentvm: the recording stops here, at its limit of {} bytes; the session goes on]\r\n",
                self.max
            );
            writeln!(self.out, "{}", json!([t, "o", note]))?;
            return self.out.flush();
        }
        self.written += line.len() as u64;
        self.out.write_all(line)
    }

    /// Everything written so far, on disk: a crash keeps it.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn output(&mut self, bytes: &[u8], last: bool) -> std::io::Result<()> {
        let text = self.utf8.take(bytes, last);
        self.event("o", &text)
    }

    /// Record input too ("i" events, redacted): off unless asked for,
    /// because input holds what people type at password prompts.
    pub fn with_input(mut self) -> Recording {
        self.inputs = true;
        self
    }

    fn input(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if !self.inputs {
            return Ok(());
        }
        let text = String::from_utf8_lossy(bytes).into_owned();
        self.event("i", &text)
    }

    fn resize(&mut self, rows: u16, cols: u16) -> std::io::Result<()> {
        self.event("r", &format!("{cols}x{rows}"))
    }
}

/// The server's side of one session's terminal.
pub struct Terminal {
    primary: AsyncFd<OwnedFd>,
    screen: Arc<Screen>,
    redactor: Redactor,
    recording: Mutex<Option<Recording>>,
}

pub(super) fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, integer arguments.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Terminal {
    /// Take over `primary` (inside a tokio runtime).
    pub fn new(
        primary: OwnedFd,
        screen: Arc<Screen>,
        redactor: Redactor,
        recording: Option<Recording>,
    ) -> std::io::Result<Arc<Terminal>> {
        set_nonblocking(&primary)?;
        // SAFETY: an OwnedFd is open, owned here alone, and its number
        // does not change while the AsyncFd holds it.
        let primary = unsafe { AsyncFd::register(primary) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Arc::new(Terminal {
            primary,
            screen,
            redactor,
            recording: Mutex::new(recording),
        }))
    }

    pub fn screen(&self) -> &Arc<Screen> {
        &self.screen
    }

    fn record(&self, f: impl FnOnce(&mut Recording) -> std::io::Result<()>) {
        let mut g = match self.recording.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(r) = g.as_mut() {
            if let Err(e) = f(r) {
                // a recording that cannot be written stops; the session goes on
                tracing::error!(error = %e, "writing a session's recording failed; it stops here");
                *g = None;
            }
        }
    }

    async fn emit(&self, bytes: &[u8], last: bool) {
        if !bytes.is_empty() {
            self.screen.offer(bytes, VIEWER_GRACE).await;
        }
        self.record(|r| r.output(bytes, last));
    }

    /// Read the terminal until the command's side is closed (every
    /// process in the sandbox has ended); returns then. One page of
    /// output is held at a time, whatever the viewers do.
    pub async fn pump(self: Arc<Self>) {
        let mut red = self.redactor.stream();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let ready = match tokio::time::timeout(IDLE_FLUSH, self.primary.readable()).await {
                Err(_) => {
                    // output paused: let out what the redactor holds, and
                    // put the recording on disk
                    self.emit(&red.finish(), false).await;
                    self.record(|r| r.flush());
                    continue;
                }
                Ok(Err(_)) => break,
                Ok(Ok(g)) => g,
            };
            let mut ready = ready;
            // drain what is there (a terminal hands out at most 4 KiB per
            // read) into one piece: fewer, larger frames to every viewer
            match ready.try_io(|fd| {
                let mut n = 0;
                while n < buf.len() {
                    match nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(_) if n > 0 => break,
                        Err(e) => return Err(std::io::Error::from(e)),
                    }
                }
                Ok(n)
            }) {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => {
                    let out = red.push(&buf[..n]);
                    self.emit(&out, false).await;
                }
                // EIO: the last holder of the command's side closed it
                Ok(Err(_)) => break,
                Err(_would_block) => continue,
            }
        }
        self.emit(&red.finish(), true).await;
        self.record(|r| r.flush());
    }

    /// Input from viewer `id`: written only if it is the writer, never
    /// waiting on a program that does not read.
    pub fn input(&self, id: u64, bytes: &[u8]) -> Result<(), InputError> {
        if self.screen.is_paused() {
            return Err(InputError::Paused);
        }
        if !self.screen.may_write(id) {
            return Err(InputError::ReadOnly);
        }
        self.record(|r| r.input(&self.redactor.redact(bytes)));
        let mut rest = bytes;
        while !rest.is_empty() {
            match nix::unistd::write(self.primary.get_ref(), rest) {
                Ok(n) => rest = &rest[n..],
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return Err(InputError::Busy),
                Err(_) => return Err(InputError::Closed),
            }
        }
        Ok(())
    }

    /// A new size from viewer `id` (the writer only); recorded.
    pub fn resize(&self, id: u64, rows: u16, cols: u16) -> Result<(), InputError> {
        if !self.screen.may_write(id) {
            return Err(InputError::ReadOnly);
        }
        let max = agentvm_proto::run::TTY_MAX;
        if !(1..=max).contains(&rows) || !(1..=max).contains(&cols) {
            return Err(InputError::BadSize);
        }
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a local.
        if unsafe { libc::ioctl(self.primary.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(InputError::Closed);
        }
        self.record(|r| r.resize(rows, cols));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const SECRET: &str = "sk-test-session-0123456789";

    /// A terminal pair of this process's own: (primary, secondary).
    fn pair() -> (OwnedFd, OwnedFd) {
        let p = nix::pty::openpty(None, None).unwrap();
        (p.master, p.slave)
    }

    fn write_all(fd: &OwnedFd, b: &[u8]) {
        let mut rest = b;
        while !rest.is_empty() {
            let n = nix::unistd::write(fd.as_fd(), rest).unwrap();
            rest = &rest[n..];
        }
    }

    /// Output reaches viewers and the recording redacted, even when the
    /// secret is split over two writes; only the writer's input and size
    /// reach the program; the pump ends when the program's side closes,
    /// and the recording is asciicast v2 with the resize in it.
    #[tokio::test]
    async fn output_is_redacted_input_is_the_writers_and_the_recording_is_asciicast() {
        let (primary, secondary) = pair();
        // the program's side: raw, so what is written comes back as it is
        let mut t = nix::sys::termios::tcgetattr(secondary.as_fd()).unwrap();
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(secondary.as_fd(), nix::sys::termios::SetArg::TCSANOW, &t)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let rec_path = dir.path().join("s.cast");
        let rec = Recording::create(&rec_path, 24, 80, "agentvm test", "sh", 1 << 20).unwrap();
        let screen = Arc::new(Screen::new(4096, 64, 4));
        let term =
            Terminal::new(primary, screen.clone(), Redactor::new([SECRET]), Some(rec)).unwrap();
        let (mut writer, w) = screen.attach("alice", true).unwrap();
        let (reader, r) = screen.attach("bob", true).unwrap();
        assert!(w && !r);
        let pump = tokio::spawn(term.clone().pump());

        let (a, b) = SECRET.split_at(10);
        write_all(&secondary, format!("key={a}").as_bytes());
        tokio::time::sleep(Duration::from_millis(5)).await;
        write_all(&secondary, format!("{b} done\r\n").as_bytes());

        assert_eq!(term.input(reader.id, b"nope"), Err(InputError::ReadOnly));
        assert_eq!(term.resize(reader.id, 10, 10), Err(InputError::ReadOnly));
        term.input(writer.id, b"typed").unwrap();
        let mut got = [0u8; 5];
        let mut n = 0;
        while n < 5 {
            n += nix::unistd::read(secondary.as_raw_fd(), &mut got[n..]).unwrap();
        }
        assert_eq!(&got, b"typed");
        term.resize(writer.id, 33, 101).unwrap();
        let ws = {
            // SAFETY: TIOCGWINSZ writes one winsize into a local.
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            unsafe { libc::ioctl(secondary.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
            (ws.ws_row, ws.ws_col)
        };
        assert_eq!(ws, (33, 101));
        assert_eq!(term.resize(writer.id, 0, 80), Err(InputError::BadSize));

        drop(secondary);
        tokio::time::timeout(Duration::from_secs(10), pump)
            .await
            .unwrap()
            .unwrap();
        let mut seen = Vec::new();
        while let Ok(super::super::screen::Frame::Output(b)) = writer.frames.try_recv() {
            seen.extend_from_slice(&b);
        }
        let seen = String::from_utf8_lossy(&seen).into_owned();
        assert!(seen.contains("key=[REDACTED] done"), "{seen:?}");
        assert!(!seen.contains(a) || !seen.contains(b), "{seen:?}");

        let cast = std::fs::read_to_string(&rec_path).unwrap();
        assert!(!cast.contains(SECRET) && !cast.contains(b), "{cast}");
        let mut lines = cast.lines();
        let head: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(
            (head["version"].as_i64(), head["width"].as_i64()),
            (Some(2), Some(80))
        );
        let events: Vec<serde_json::Value> =
            lines.map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(
            events.iter().any(|e| e[1] == "r" && e[2] == "101x33"),
            "{cast}"
        );
        let text: String = events
            .iter()
            .filter(|e| e[1] == "o")
            .map(|e| e[2].as_str().unwrap().to_string())
            .collect();
        assert!(text.contains("key=[REDACTED] done"), "{cast}");
        let times: Vec<f64> = events.iter().map(|e| e[0].as_f64().unwrap()).collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "in order: {times:?}"
        );
    }

    /// A recording never replaces a file that is there (or follows a link).
    #[test]
    fn a_recording_is_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.cast");
        std::fs::write(&p, "keep").unwrap();
        assert!(Recording::create(&p, 24, 80, "t", "sh", 1 << 20).is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "keep");
        let l = dir.path().join("link.cast");
        std::os::unix::fs::symlink("/tmp/agentvm-nowhere", &l).unwrap();
        assert!(Recording::create(&l, 24, 80, "t", "sh", 1 << 20).is_err());
        assert!(!Path::new("/tmp/agentvm-nowhere").exists());
    }

    /// Past its limit a recording says so once and stops; it stays valid
    /// asciicast, and the session's output goes on reaching viewers.
    #[tokio::test]
    async fn a_recording_stops_at_its_limit() {
        let (primary, secondary) = pair();
        let dir = tempfile::tempdir().unwrap();
        let rec_path = dir.path().join("big.cast");
        let rec = Recording::create(&rec_path, 24, 80, "t", "sh", 4096).unwrap();
        let screen = Arc::new(Screen::new(4096, 1024, 4));
        let term = Terminal::new(primary, screen.clone(), Redactor::new([]), Some(rec)).unwrap();
        let (mut me, _) = screen.attach("me", true).unwrap();
        let pump = tokio::spawn(term.clone().pump());
        // the program writes from a thread of its own: a write that fills
        // the terminal's buffer blocks it until the pump drains, and the
        // pump runs on this test's one runtime thread, which must stay free
        let writer = tokio::task::spawn_blocking(move || {
            let line = "0123456789".repeat(10);
            for _ in 0..200 {
                write_all(&secondary, format!("{line}\r\n").as_bytes());
            }
            drop(secondary);
        });
        while !writer.is_finished() {
            while me.frames.try_recv().is_ok() {}
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        writer.await.unwrap();
        while me.frames.try_recv().is_ok() {}
        tokio::time::timeout(Duration::from_secs(10), pump)
            .await
            .unwrap()
            .unwrap();
        let cast = std::fs::read_to_string(&rec_path).unwrap();
        assert!(cast.len() < 4096 + 1024, "{} bytes", cast.len());
        assert!(cast.contains("the recording stops here"), "{cast}");
        for l in cast.lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
        assert!(!me.lagged(), "the viewer kept up and was kept");
    }
}
