//! `[REGISTRY/]REPO[:TAG][@sha256:HEX]`, parsed as docker reads it.

use agentvm_image::ImageError;

use super::bad;

/// `[REGISTRY/]REPO[:TAG][@sha256:HEX]`, parsed as docker does.
#[derive(Debug, PartialEq)]
pub struct Reference {
    pub registry: String,
    pub repo: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, ImageError> {
        let shown: String = s.chars().take(200).collect();
        if s.is_empty() || s.len() > 512 {
            return Err(bad(format!("reference {shown}: empty or too long")));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d.strip_prefix("sha256:").unwrap_or("");
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(bad(format!(
                        "reference {shown}: the pin after @ must be sha256: and 64 lowercase hex digits"
                    )));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, p))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), p.to_string())
            }
            _ => ("docker.io".to_string(), rest.to_string()),
        };
        let (repo, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_string(), Some(t.to_string())),
            _ => (path, None),
        };
        let repo = if registry == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
        };
        if !repo.split('/').all(component_ok) {
            return Err(bad(format!(
                "reference {shown}: a repository is lowercase letters, digits and ._- between slashes"
            )));
        }
        if let Some(t) = &tag {
            let ok = t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad(format!(
                    "reference {shown}: a tag is at most 128 of A-Za-z0-9._-"
                )));
            }
        }
        let host_ok = registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !host_ok {
            return Err(bad(format!(
                "reference {shown}: registry {registry} is not a host[:port]"
            )));
        }
        Ok(Reference {
            registry,
            repo,
            tag: if tag.is_none() && digest.is_none() {
                Some("latest".into())
            } else {
                tag
            },
            digest,
        })
    }

    /// What to ask the registry for: the pin, else the tag.
    pub(super) fn wanted(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The name the image is stored under unless --tag: the reference
    /// without its pin.
    pub fn name(&self) -> String {
        let mut s = if self.registry == "docker.io" {
            self.repo.trim_start_matches("library/").to_string()
        } else {
            format!("{}/{}", self.registry, self.repo)
        };
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn references_parse_as_docker_reads_them() {
        let x = r("debian");
        assert_eq!(
            (x.registry.as_str(), x.repo.as_str(), x.tag.as_deref()),
            ("docker.io", "library/debian", Some("latest"))
        );
        assert_eq!(x.name(), "debian:latest");
        let x = r("localhost:5000/team/tools:v1");
        assert_eq!(
            (x.registry.as_str(), x.repo.as_str(), x.tag.as_deref()),
            ("localhost:5000", "team/tools", Some("v1"))
        );
        let pin = format!("sha256:{}", "a".repeat(64));
        let x = r(&format!("ghcr.io/o/n@{pin}"));
        assert_eq!((x.tag, x.digest.as_deref()), (None, Some(pin.as_str())));
        let x = r(&format!("127.0.0.1:1/n:t@{pin}"));
        assert_eq!(x.tag.as_deref(), Some("t"));
        assert_eq!(x.wanted(), pin);
        for b in [
            "",
            "UPPER/x",
            "x@sha256:abc",
            "x@md5:aa",
            "a//b",
            "x:bad tag",
            "h.io/x:-t",
            "h.io/../x",
            "ho$t.io/x",
        ] {
            assert!(Reference::parse(b).is_err(), "{b:?} accepted");
        }
    }
}
