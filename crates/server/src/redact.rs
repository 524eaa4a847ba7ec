//! Secret redaction: every configured secret value, and its base64 forms,
//! replaced by `[REDACTED]` in everything a job produces before it is
//! stored or streamed.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;

pub const MASK: &[u8] = b"[REDACTED]";
/// Shorter values would mask ordinary text; they are refused at start.
pub const MIN_SECRET_LEN: usize = 8;

#[derive(Clone)]
pub struct Redactor {
    ac: Option<AhoCorasick>,
    longest: usize,
}

/// The forms a secret may take in output: itself, and base64 (standard and
/// URL-safe, padded or not), also when it sits inside a longer base64
/// string at any of the three byte alignments.
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let mut out = vec![secret.to_vec()];
    for e in engines {
        out.push(e.encode(secret).into_bytes());
        for k in 1..3usize {
            // with k bytes before it, the secret's own characters start after
            // the first (k * 4 + 2) / 3 characters and stop before the last
            // partial group
            let mut buf = vec![0u8; k];
            buf.extend_from_slice(secret);
            let enc = e.encode(&buf);
            let skip = (k * 4).div_ceil(3);
            let full = (k + secret.len()) / 3 * 4;
            if full > skip + 4 {
                out.push(enc.as_bytes()[skip..full].to_vec());
            }
        }
    }
    out.retain(|f| f.len() >= MIN_SECRET_LEN);
    out.sort();
    out.dedup();
    out
}

impl Redactor {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Redactor {
        let pats: Vec<Vec<u8>> = secrets
            .into_iter()
            .filter(|s| s.len() >= MIN_SECRET_LEN)
            .flat_map(|s| forms(s.as_bytes()))
            .collect();
        let longest = pats.iter().map(Vec::len).max().unwrap_or(0);
        let ac = if pats.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&pats)
                .ok()
        };
        Redactor { ac, longest }
    }

    pub fn is_empty(&self) -> bool {
        self.ac.is_none()
    }

    /// Redact a whole buffer.
    pub fn redact(&self, b: &[u8]) -> Vec<u8> {
        self.redact_until(b, b.len()).0
    }

    pub fn redact_str(&self, s: &str) -> String {
        String::from_utf8_lossy(&self.redact(s.as_bytes())).into_owned()
    }

    /// Redact `b`, emitting everything before `limit` (and any match that
    /// starts there). Returns the output and how many input bytes it covers.
    fn redact_until(&self, b: &[u8], limit: usize) -> (Vec<u8>, usize) {
        let Some(ac) = &self.ac else {
            return (b[..limit].to_vec(), limit);
        };
        let mut out = Vec::with_capacity(limit);
        let mut at = 0;
        for m in ac.find_iter(b) {
            if m.start() >= limit {
                break;
            }
            out.extend_from_slice(&b[at..m.start()]);
            out.extend_from_slice(MASK);
            at = m.end();
        }
        let end = limit.max(at);
        if at < end {
            out.extend_from_slice(&b[at..end]);
        }
        (out, end)
    }

    pub fn stream(&self) -> Stream {
        Stream {
            r: self.clone(),
            held: Vec::new(),
        }
    }
}

/// Redaction of a stream that arrives in pieces: the last `longest - 1`
/// bytes are held back, so a secret split across two pieces is still
/// caught.
pub struct Stream {
    r: Redactor,
    held: Vec<u8>,
}

impl Stream {
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.r.is_empty() {
            return data.to_vec();
        }
        self.held.extend_from_slice(data);
        let keep = self.r.longest.saturating_sub(1);
        if self.held.len() <= keep {
            return Vec::new();
        }
        let (out, used) = self.r.redact_until(&self.held, self.held.len() - keep);
        self.held.drain(..used);
        out
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.held);
        self.r.redact(&rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: &str = "sk-test-0123456789abcdef";

    #[test]
    fn masks_the_value_and_its_base64() {
        let r = Redactor::new([S]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(S);
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{S}"));
        let text = format!("key={S} b64={b64} basic={basic} ok");
        let out = String::from_utf8_lossy(&r.redact(text.as_bytes())).into_owned();
        assert!(!out.contains(S), "{out}");
        assert!(!out.contains(&b64), "{out}");
        assert!(
            !out.contains(&basic[8..basic.len() - 4]),
            "basic auth form survived: {out}"
        );
        assert!(out.contains("[REDACTED]") && out.ends_with(" ok"));
    }

    #[test]
    fn short_values_are_not_secrets() {
        let r = Redactor::new(["abc"]);
        assert!(r.is_empty());
        assert_eq!(r.redact(b"abc abc"), b"abc abc");
    }

    proptest! {
        /// However the output is cut into pieces, no secret survives and
        /// nothing else changes.
        #[test]
        fn streaming_catches_secrets_across_any_split(
            before in "[a-z ]{0,40}", after in "[a-z ]{0,40}", cuts in proptest::collection::vec(0usize..120, 0..6)
        ) {
            let r = Redactor::new([S]);
            let text = format!("{before}{S}{after}{before}");
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            points.push(0);
            points.push(bytes.len());
            points.sort();
            let mut st = r.stream();
            let mut out = Vec::new();
            for w in points.windows(2) {
                out.extend(st.push(&bytes[w[0]..w[1]]));
            }
            out.extend(st.finish());
            let s = String::from_utf8_lossy(&out).into_owned();
            prop_assert!(!s.contains(S));
            prop_assert_eq!(s, format!("{before}[REDACTED]{after}{before}"));
        }
    }
}
