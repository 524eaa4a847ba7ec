//! A job's recording: its output as an asciicast v2 file, the format
//! `asciinema play` reads.
//!
//! Built from the stored output chunks (each was redacted before it was
//! stored) and passed through the redactor once more on the way out, so a
//! recording never holds a configured secret. A job has no terminal, so
//! line feeds become CR LF as a terminal's output processing would make
//! them, and stdout and stderr are both terminal output ("o").

use std::borrow::Cow;

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
    /// The text of `bytes` after what was held; borrowed when nothing
    /// was held and `bytes` are whole UTF-8 (the common case, no copy).
    pub(crate) fn take<'a>(&mut self, bytes: &'a [u8], last: bool) -> Cow<'a, str> {
        if self.pending.is_empty() {
            if let Ok(s) = std::str::from_utf8(bytes) {
                return Cow::Borrowed(s);
            }
        }
        Cow::Owned(self.take_slow(bytes, last))
    }

    fn take_slow(&mut self, bytes: &[u8], last: bool) -> String {
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

/// Append one asciicast event line, `[t, "kind", "text"]` and a line
/// feed, to `out`: the JSON written by hand because every byte of a
/// session's output passes here (runs of plain bytes are copied whole,
/// eight bytes tested at a time).
pub(crate) fn event_line(out: &mut Vec<u8>, t: f64, kind: &str, text: &str) {
    out.push(b'[');
    // a time is finite and never negative; serde_json writes it as json! did
    if serde_json::to_writer(&mut *out, &t).is_err() {
        out.push(b'0');
    }
    out.extend_from_slice(b",");
    json_str(out, kind);
    out.push(b',');
    json_str(out, text);
    out.extend_from_slice(b"]\n");
}

/// Whether any of the eight bytes of `w` is below 0x20, `"` or `\`.
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (below_space | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')))) != 0
}

/// `s` as a JSON string, quotes included.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let (mut run, mut i) = (0, 0);
    while i < b.len() {
        if let Some(w) = b.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            if !word_needs_escape(u64::from_le_bytes(word)) {
                i += 8;
                continue;
            }
        }
        let end = (i + 8).min(b.len());
        while i < end {
            let c = b[i];
            let short = match c {
                b'"' => Some(b'"'),
                b'\\' => Some(b'\\'),
                b'\n' => Some(b'n'),
                b'\r' => Some(b'r'),
                b'\t' => Some(b't'),
                0x08 => Some(b'b'),
                0x0c => Some(b'f'),
                _ => None,
            };
            if c < 0x20 || short.is_some() {
                out.extend_from_slice(&b[run..i]);
                match short {
                    Some(e) => out.extend_from_slice(&[b'\\', e]),
                    None => {
                        const HEX: &[u8; 16] = b"0123456789abcdef";
                        out.extend_from_slice(b"\\u00");
                        out.push(HEX[usize::from(c >> 4)]);
                        out.push(HEX[usize::from(c & 15)]);
                    }
                }
                run = i + 1;
            }
            i += 1;
        }
    }
    out.extend_from_slice(&b[run..]);
    out.push(b'"');
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

    fn event(&self, text: &str) -> String {
        if text.is_empty() {
            return String::new();
        }
        let mut line = Vec::with_capacity(text.len() + 32);
        event_line(&mut line, self.t, "o", text);
        // written from a &str and ASCII escapes: always UTF-8
        String::from_utf8(line).unwrap_or_default()
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
        self.event(&text)
    }

    /// Whatever the redactor and the UTF-8 decoder still hold.
    pub fn finish(mut self) -> String {
        let bytes = onlcr(&self.red.finish(), &mut self.prev_cr);
        let text = self.utf8.take(&bytes, true);
        self.event(&text)
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
            image: None,
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

    #[test]
    fn event_lines_are_the_json_serde_would_read_back() {
        // every byte value at every offset from a word's start, runs of
        // plain text around them, multi-byte characters across words
        let mut texts: Vec<String> = Vec::new();
        for c in 0u8..0x80 {
            for pad in 0..10 {
                let mut t = "a".repeat(pad);
                t.push(char::from(c));
                t.push_str(&"bcdefghijk"[..(pad % 10)]);
                texts.push(t);
            }
        }
        texts.push("é\"日本\\\u{1}x\u{7f}€\r\n\t\u{8}\u{c}".repeat(5));
        texts.push(String::new());
        for t in &texts {
            let mut line = Vec::new();
            event_line(&mut line, 12.5, "o", t);
            let s = String::from_utf8(line).unwrap();
            assert!(s.ends_with("]\n"), "{s:?}");
            let v: serde_json::Value =
                serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            assert_eq!(v, json!([12.5, "o", t]), "{s:?}");
            // the same bytes serde_json writes, so recordings read as before
            assert_eq!(s, format!("{}\n", json!([12.5, "o", t])), "{t:?}");
        }
    }

    #[test]
    fn whole_utf8_is_borrowed_and_a_cut_sequence_waits() {
        let mut u = Utf8::default();
        assert!(matches!(
            u.take("héllo".as_bytes(), false),
            Cow::Borrowed("héllo")
        ));
        let e = "é".as_bytes();
        assert_eq!(u.take(&e[..1], false), "");
        assert!(matches!(u.take(&e[1..], false), Cow::Owned(ref s) if s == "é"));
        assert_eq!(u.take(&e[..1], true), "\u{fffd}");
    }
}
