//! Reading the server name (SNI) out of a TLS ClientHello, without
//! decrypting or terminating anything.

/// Does `b` start a TLS handshake record that is not complete yet?
pub fn needs_more(b: &[u8]) -> bool {
    if b.is_empty() {
        return true;
    }
    if b[0] != 0x16 {
        return false; // not TLS: nothing to wait for
    }
    if b.len() < 5 {
        return true;
    }
    let len = u16::from_be_bytes([b[3], b[4]]) as usize;
    b.len() < 5 + len
}

struct Cur<'a>(&'a [u8], usize);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.0.get(self.1..self.1.checked_add(n)?)?;
        self.1 += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
}

/// The host name a ClientHello asks for, if it is one and names one.
pub fn server_name(b: &[u8]) -> Option<String> {
    let mut c = Cur(b, 0);
    if c.u8()? != 0x16 {
        return None;
    }
    c.take(2)?; // record version
    let rec_len = c.u16()?;
    let body = c.take(rec_len.min(b.len().saturating_sub(5)))?;
    let mut h = Cur(body, 0);
    if h.u8()? != 0x01 {
        return None; // not a ClientHello
    }
    h.take(3)?; // handshake length
    h.take(2 + 32)?; // version, random
    let sid = h.u8()?;
    h.take(sid)?;
    let suites = h.u16()?;
    h.take(suites)?;
    let comp = h.u8()?;
    h.take(comp)?;
    let ext_len = h.u16()?;
    let exts = h.take(ext_len)?;
    let mut e = Cur(exts, 0);
    while let (Some(kind), Some(len)) = (e.u16(), e.u16()) {
        let data = e.take(len)?;
        if kind != 0 {
            continue;
        }
        let mut d = Cur(data, 0);
        let list = d.u16()?;
        let list = d.take(list)?;
        let mut l = Cur(list, 0);
        while let Some(t) = l.u8() {
            let n = l.u16()?;
            let name = l.take(n)?;
            if t == 0 {
                return std::str::from_utf8(name).ok().map(str::to_owned);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with one server_name extension.
    fn hello(name: &str) -> Vec<u8> {
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
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
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

    #[test]
    fn reads_the_server_name() {
        let h = hello("api.example.com");
        assert_eq!(server_name(&h), Some("api.example.com".into()));
        assert!(!needs_more(&h));
        assert!(needs_more(&h[..h.len() - 1]));
        assert!(needs_more(&h[..3]));
    }

    #[test]
    fn tolerates_garbage() {
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), None);
        assert!(!needs_more(b"GET /"));
        let h = hello("x.y");
        for cut in 0..h.len() {
            let _ = server_name(&h[..cut]); // never panics
        }
        let mut bad = h.clone();
        bad[50] = 0xff; // a length that runs past the end
        let _ = server_name(&bad);
    }
}
