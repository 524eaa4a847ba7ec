//! The SSH door's keys: the server's host key, made once and kept in the
//! data directory, and the users' public keys from an authorized_keys file,
//! each key's comment being who its sessions belong to.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey, PublicKey};

/// The host key's file in the data directory.
pub fn host_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ssh_host_ed25519_key")
}

/// The largest authorized_keys file read.
const MAX_AUTHORIZED_KEYS: u64 = 1 << 20;

/// The server's host key: read from the data directory, or made there
/// (ed25519, 0600) the first time, so clients see one fingerprint across
/// restarts.
pub fn host_key(data_dir: &Path) -> Result<PrivateKey, String> {
    let path = host_key_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mode = std::fs::metadata(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(format!(
                    "{}: the SSH host key is readable by others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                ));
            }
            PrivateKey::from_openssh(text.trim_end())
                .map_err(|e| format!("{}: not an OpenSSH private key: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => make_host_key(&path),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn make_host_key(path: &Path) -> Result<PrivateKey, String> {
    use rand::RngCore;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| format!("encoding the SSH host key: {e}"))?;
    // written whole under another name, then renamed: a crash leaves no
    // half key behind
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("writing the SSH host key {}: {e}", path.display()))?;
    Ok(key)
}

/// `SHA256:...`, as `ssh` and `ssh-keygen -l` print it.
pub fn fingerprint(k: &PublicKey) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

/// Who may log in: each key with the identity its comment names.
#[derive(Debug, Clone, Default)]
pub struct AuthorizedKeys {
    keys: Vec<(PublicKey, String)>,
}

/// An identity from a key's comment: what sessions and the audit trail
/// show as `ssh:IDENTITY`.
pub fn valid_identity(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b))
}

impl AuthorizedKeys {
    /// Read `path` (OpenSSH authorized_keys format). Every line must be a
    /// key with a comment; options (`from=`, `command=`, `restrict`, ...)
    /// are refused rather than ignored, since ignoring one would let a key
    /// do more than its line says.
    pub fn load(path: &Path) -> Result<AuthorizedKeys, String> {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut text = String::new();
        f.take(MAX_AUTHORIZED_KEYS + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() as u64 > MAX_AUTHORIZED_KEYS {
            return Err(format!("{}: larger than 1 MiB", path.display()));
        }
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<AuthorizedKeys, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = PublicKey::from_openssh(line).map_err(|_| {
                format!(
                    "line {n}: not a public key of a known type (options such as from= or command= are not supported: list plain keys)"
                )
            })?;
            let who = key.comment().as_str().unwrap_or("").trim().to_string();
            if !valid_identity(&who) {
                return Err(format!(
                    "line {n}: the key's comment is who it logs in as: give it one of 1 to 64 of A-Z a-z 0-9 . _ @ + - (e.g. alice@laptop)"
                ));
            }
            keys.push((key, who));
        }
        Ok(AuthorizedKeys { keys })
    }

    /// The identity `k` logs in as, if it is listed.
    pub fn identity(&self, k: &PublicKey) -> Option<&str> {
        self.keys
            .iter()
            .find(|(key, _)| key.key_data() == k.key_data())
            .map(|(_, who)| who.as_str())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(seed: u8, comment: &str) -> String {
        let k = PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]));
        let mut p = k.public_key().clone();
        p.set_comment(comment);
        p.to_openssh().unwrap_or_default()
    }

    #[test]
    fn authorized_keys_map_keys_to_their_comment() {
        let text = format!(
            "# team\n\n{}\n  {}  \n",
            public(1, "alice@laptop"),
            public(2, "bob")
        );
        let a = AuthorizedKeys::parse(&text).unwrap_or_default();
        assert_eq!(a.len(), 2);
        let k1 = PublicKey::from_openssh(&public(1, "whatever")).ok();
        let k3 = PublicKey::from_openssh(&public(3, "alice@laptop")).ok();
        assert_eq!(
            a.identity(k1.as_ref().unwrap_or_else(|| panic!())),
            Some("alice@laptop")
        );
        assert_eq!(
            a.identity(k3.as_ref().unwrap_or_else(|| panic!())),
            None,
            "the comment is no key"
        );
    }

    #[test]
    fn options_missing_or_odd_comments_and_junk_are_refused() {
        for (bad, why) in [
            (format!("from=\"10.0.0.1\" {}", public(1, "a")), "line 1"),
            (format!("command=\"true\" {}", public(1, "a")), "line 1"),
            (
                format!("{}\nrestrict {}", public(1, "a"), public(2, "b")),
                "line 2",
            ),
            (public(1, ""), "comment"),
            (public(1, "Alice Smith"), "comment"),
            (public(1, &"x".repeat(65)), "comment"),
            ("ssh-ed25519 AAAAnotbase64 a".into(), "line 1"),
            ("hello".into(), "line 1"),
        ] {
            match AuthorizedKeys::parse(&bad) {
                Ok(_) => panic!("accepted {bad:?}"),
                Err(e) => assert!(e.contains(why), "{bad:?}: {e}"),
            }
        }
    }

    #[test]
    fn the_host_key_is_made_once_private_and_kept() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let k1 = host_key(d.path()).unwrap_or_else(|e| panic!("{e}"));
        let path = host_key_path(d.path());
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
        let k2 = host_key(d.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fingerprint(k1.public_key()), fingerprint(k2.public_key()));
        assert!(fingerprint(k1.public_key()).starts_with("SHA256:"));
        // one that others can read is refused, not used
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644));
        let e = host_key(d.path()).err().unwrap_or_default();
        assert!(e.contains("chmod 600"), "{e}");
        // and a broken one is an error, not replaced
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        let _ = std::fs::write(&path, "junk");
        assert!(host_key(d.path()).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap_or_default(), "junk");
    }
}
