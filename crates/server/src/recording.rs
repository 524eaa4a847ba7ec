//! A job's recording: its output as an asciicast v2 file, the format
//! `asciinema play` reads.
//!
//! Built from the stored output chunks (each was redacted before it was
//! stored) and passed through the redactor once more on the way out, so a
//! recording never holds a configured secret. A job has no terminal, so
//! line feeds become CR LF as a terminal's output processing would make
//! them, and stdout and stderr are both terminal output ("o").

use agentvm_store::{Job, LogChunk};
use serde_json::json;

use crate::redact::Redactor;

/// The terminal size written in the header (jobs have no terminal).
pub const WIDTH: u32 = 80;
pub const HEIGHT: u32 = 24;

/// The media type of an asciicast file.
pub const CONTENT_TYPE: &str = "application/x-asciicast";

/// Bytes in, valid UTF-8 out: a sequence cut at the end of one chunk is
/// kept for the next; invalid bytes become U+FFFD.
#[derive(Default)]
pub(crate) struct Utf8 {
    pending: Vec<u8>,
}

impl Utf8 {
    pub(crate) fn take(&mut self, bytes: &[u8], last: bool) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (ok, bad) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(ok).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &bad[n..];
                        }
                        // cut short: wait for the rest, unless nothing follows
                        None if !last => {
                            rest = bad;
                            break;
                        }
                        None => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &[];
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }
}

/// LF to CR LF, except where the CR is already there (also across chunks).
fn onlcr(bytes: &[u8], prev_cr: &mut bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 16);
    for &b in bytes {
        if b == b'\n' && !*prev_cr {
            out.push(b'\r');
        }
        out.push(b);
        *prev_cr = b == b'\r';
    }
    out
}

/// An asciicast v2 file, built chunk by chunk (a download holds one page
/// of output at a time, never the whole recording).
pub struct Cast {
    start: i64,
    red: crate::redact::Stream,
    utf8: Utf8,
    prev_cr: bool,
    t: f64,
}

impl Cast {
    /// The encoder for `job`, and the header line.
    pub fn new(job: &Job, redactor: &Redactor) -> (Cast, String) {
        let start = job.started_at.unwrap_or(job.created_at);
        let header = json!({
            "version": 2,
            "width": WIDTH,
            "height": HEIGHT,
            "timestamp": start / 1000,
            "title": format!("agentvm {} ({})", job.id, job.agent),
            "env": {"TERM": "xterm-256color", "SHELL": "/bin/sh"},
        });
        let cast = Cast {
            start,
            red: redactor.stream(),
            utf8: Utf8::default(),
            prev_cr: false,
            t: 0.0,
        };
        (cast, format!("{header}\n"))
    }

    fn event(&self, text: String) -> String {
        if text.is_empty() {
            String::new()
        } else {
            format!("{}\n", json!([self.t, "o", text]))
        }
    }

    /// The event lines for one stored chunk (none for egress decisions).
    pub fn push(&mut self, c: &LogChunk) -> String {
        if !crate::output::is_output(c) {
            return String::new();
        }
        // never backwards: clocks may step, the format needs order
        self.t = self.t.max((c.ts - self.start) as f64 / 1000.0);
        let bytes = onlcr(&self.red.push(&c.data), &mut self.prev_cr);
        let text = self.utf8.take(&bytes, false);
        self.event(text)
    }

    /// Whatever the redactor and the UTF-8 decoder still hold.
    pub fn finish(mut self) -> String {
        let bytes = onlcr(&self.red.finish(), &mut self.prev_cr);
        let text = self.utf8.take(&bytes, true);
        self.event(text)
    }
}

/// The asciicast v2 text of `job` with its output `chunks` (in order).
pub fn asciicast(job: &Job, chunks: &[LogChunk], redactor: &Redactor) -> String {
    let (mut cast, mut out) = Cast::new(job, redactor);
    for c in chunks {
        out.push_str(&cast.push(c));
    }
    out.push_str(&cast.finish());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_store::JobStatus;

    fn job() -> Job {
        Job {
            seq: 1,
            id: "job_1".into(),
            agent: "shell".into(),
            prompt: "p".into(),
            repo_path: "/r".into(),
            timeout_s: 1,
            extra_args: Vec::new(),
            network: None,
            status: JobStatus::Succeeded,
            key_id: None,
            created_at: 1_000,
            started_at: Some(2_000),
            finished_at: Some(3_000),
            exit_code: Some(0),
            error: None,
            result: None,
            supervisor_pid: None,
            supervisor_start: None,
        }
    }

    fn chunk(seq: i64, ts: i64, data: &[u8]) -> LogChunk {
        LogChunk {
            seq,
            stream: "stdout".into(),
            ts,
            data: data.to_vec(),
        }
    }

    fn events(cast: &str) -> Vec<serde_json::Value> {
        cast.lines()
            .skip(1)
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    #[test]
    fn header_then_timed_output_with_crlf() {
        let chunks = [
            chunk(1, 2_500, b"one\n"),
            chunk(2, 3_250, b"two\r\nthree\n"),
        ];
        let cast = asciicast(&job(), &chunks, &Redactor::new([]));
        let head: serde_json::Value =
            serde_json::from_str(cast.lines().next().unwrap_or("")).unwrap_or_default();
        assert_eq!(head["version"], 2);
        assert_eq!(head["width"], WIDTH);
        assert_eq!(head["timestamp"], 2);
        let ev = events(&cast);
        assert_eq!(ev.len(), 2, "{cast}");
        assert_eq!(ev[0], json!([0.5, "o", "one\r\n"]));
        assert_eq!(ev[1], json!([1.25, "o", "two\r\nthree\r\n"]));
    }

    #[test]
    fn utf8_cut_between_chunks_is_joined_and_time_never_goes_back() {
        let e = "é".as_bytes();
        let chunks = [
            chunk(1, 2_100, &[b'a', e[0]]),
            chunk(2, 2_050, &[e[1], b'b', 0xff]),
        ];
        let ev = events(&asciicast(&job(), &chunks, &Redactor::new([])));
        assert_eq!(ev[0], json!([0.1, "o", "a"]));
        assert_eq!(ev[1], json!([0.1, "o", "éb\u{fffd}"]));
    }

    #[test]
    fn a_secret_split_across_chunks_is_redacted() {
        let secret = "sk-recorded-secret-123456";
        let (a, b) = secret.split_at(9);
        let chunks = [chunk(1, 2_000, a.as_bytes()), chunk(2, 2_001, b.as_bytes())];
        let cast = asciicast(&job(), &chunks, &Redactor::new([secret]));
        assert!(!cast.contains(secret), "{cast}");
        assert!(!cast.contains(b), "{cast}");
        assert!(cast.contains("[REDACTED]"), "{cast}");
    }
}
