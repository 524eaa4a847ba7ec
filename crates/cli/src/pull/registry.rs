//! Talking to a registry: its credentials from an auth file (never
//! printed), Bearer and Basic challenges, bounded answers.

use std::path::{Path, PathBuf};

use agentvm_image::ImageError;
use base64::Engine;
use serde::Deserialize;

use super::JSON_MAX;

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// A registry's user and password.
pub(super) struct Creds {
    user: String,
    password: String,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Creds({}, <redacted>)", self.user)
    }
}

/// The auth file to read: `--auth-file`, else $REGISTRY_AUTH_FILE, else
/// docker's config.json if there is one.
pub fn auth_file(flag: Option<PathBuf>) -> Option<PathBuf> {
    if flag.is_some() {
        return flag;
    }
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
    let p = dir.join("config.json");
    p.is_file().then_some(p)
}

pub(super) fn creds_for(file: &Path, registry: &str) -> Result<Option<Creds>, ImageError> {
    let b = std::fs::read(file)
        .map_err(|e| ImageError::Io(format!("auth file {}: {e}", file.display())))?;
    // the file holds secrets: its parse error must not quote it
    let f: AuthFile = serde_json::from_slice(&b).map_err(|e| {
        ImageError::Io(format!(
            "auth file {}: not an {{\"auths\": ...}} JSON file (line {}, column {})",
            file.display(),
            e.line(),
            e.column()
        ))
    })?;
    let host = |k: &str| -> String {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let k = k.split('/').next().unwrap_or(k);
        match k {
            "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
            _ => k.into(),
        }
    };
    let Some(e) = f
        .auths
        .iter()
        .find(|(k, _)| host(k) == registry)
        .map(|(_, e)| e)
    else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(Some(Creds {
            user: u.clone(),
            password: p.clone(),
        }));
    }
    let Some(a) = &e.auth else {
        return Ok(None);
    };
    let plain = base64::engine::general_purpose::STANDARD
        .decode(a.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    match plain {
        Some((user, password)) => Ok(Some(Creds { user, password })),
        None => Err(ImageError::Io(format!(
            "auth file {}: the auth of {registry} is not base64 of user:password",
            file.display()
        ))),
    }
}

pub(super) struct Registry {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
    pub(super) registry: String,
    pub(super) repo: String,
    pub(super) creds: Option<Creds>,
    pub(super) token: Option<String>,
    /// The registry asked for Basic: send the credentials from now on.
    pub(super) basic: bool,
}

pub(super) fn net(registry: &str) -> impl Fn(reqwest::Error) -> ImageError + '_ {
    // reqwest's error names the URL, never a header
    move |e| ImageError::Io(format!("registry {registry}: {e}"))
}

impl Registry {
    pub(super) async fn get(
        &mut self,
        path: &str,
        accept: &str,
    ) -> Result<reqwest::Response, ImageError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repo);
        let mut tried_auth = false;
        loop {
            let mut req = self.http.get(&url).header(reqwest::header::ACCEPT, accept);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            } else if let (true, Some(c)) = (self.basic, &self.creds) {
                req = req.basic_auth(&c.user, Some(&c.password));
            }
            let r = req.send().await.map_err(net(&self.registry))?;
            // a challenge from where a redirect led (a CDN, another
            // host) is not the registry's: its credentials are not for it
            let same_origin = r.url().origin()
                == reqwest::Url::parse(&url)
                    .map(|u| u.origin())
                    .unwrap_or_else(|_| r.url().origin());
            if r.status() == reqwest::StatusCode::UNAUTHORIZED && !tried_auth && same_origin {
                tried_auth = true;
                let challenge = r
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if let Some(params) = challenge.strip_prefix("Bearer ") {
                    self.token = Some(self.fetch_token(params).await?);
                } else if self.creds.is_none() {
                    return Err(self.refused(r.status()));
                } else {
                    self.basic = true;
                }
                continue;
            }
            if !r.status().is_success() {
                return Err(self.refused(r.status()));
            }
            return Ok(r);
        }
    }

    fn refused(&self, status: reqwest::StatusCode) -> ImageError {
        let hint = match status.as_u16() {
            401 | 403 if self.creds.is_none() => {
                "; give credentials with --auth-file (a {\"auths\": {\"HOST\": {\"auth\": base64(user:password)}}} file)"
            }
            401 | 403 => "; the credentials in the auth file were refused",
            404 => "; no such repository, tag or digest there",
            _ => "",
        };
        ImageError::NotFound(format!(
            "{}/{}: the registry answered {status}{hint}",
            self.registry, self.repo
        ))
    }

    /// The token service's answer to a Bearer challenge
    /// (realm="...",service="...",scope="...").
    async fn fetch_token(&self, params: &str) -> Result<String, ImageError> {
        let mut realm = None;
        let mut query = Vec::new();
        for part in split_params(params) {
            if let Some((k, v)) = part.split_once('=') {
                let v = v.trim().trim_matches('"').to_string();
                match k.trim() {
                    "realm" => realm = Some(v),
                    "service" | "scope" => query.push((k.trim().to_string(), v)),
                    _ => {}
                }
            }
        }
        if !query.iter().any(|(k, _)| k == "scope") {
            query.push(("scope".into(), format!("repository:{}:pull", self.repo)));
        }
        let realm = realm.ok_or_else(|| {
            ImageError::Io(format!(
                "registry {}: a Bearer challenge without a realm",
                self.registry
            ))
        })?;
        if !(realm.starts_with("https://")
            || (self.base.starts_with("http://") && realm.starts_with("http://")))
        {
            return Err(ImageError::Io(format!(
                "registry {}: its token service {} is not https",
                self.registry,
                realm.chars().take(200).collect::<String>()
            )));
        }
        let mut req = self.http.get(&realm).query(&query);
        if let Some(c) = &self.creds {
            req = req.basic_auth(&c.user, Some(&c.password));
        }
        let r = req.send().await.map_err(net(&self.registry))?;
        if !r.status().is_success() {
            return Err(ImageError::NotFound(format!(
                "{}/{}: the token service answered {}{}",
                self.registry,
                self.repo,
                r.status(),
                if self.creds.is_none() {
                    "; give credentials with --auth-file"
                } else {
                    "; the credentials in the auth file were refused"
                }
            )));
        }
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let b = read_bounded(r, JSON_MAX, &self.registry).await?;
        let t: Token = serde_json::from_slice(&b).map_err(|_| {
            ImageError::Io(format!(
                "registry {}: the token service's answer is not JSON",
                self.registry
            ))
        })?;
        t.token.or(t.access_token).ok_or_else(|| {
            ImageError::Io(format!(
                "registry {}: the token service gave no token",
                self.registry
            ))
        })
    }
}

/// Split `a="x,y",b=c` on the commas outside quotes.
fn split_params(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

pub(super) async fn read_bounded(
    mut r: reqwest::Response,
    max: usize,
    registry: &str,
) -> Result<Vec<u8>, ImageError> {
    let mut b = Vec::new();
    while let Some(c) = r.chunk().await.map_err(net(registry))? {
        if b.len() + c.len() > max {
            return Err(ImageError::TooLarge(format!(
                "registry {registry}: an answer past {} MiB",
                max >> 20
            )));
        }
        b.extend_from_slice(&c);
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_split_outside_quotes() {
        let p = split_params(
            r#"realm="http://h/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[2].ends_with("pull,push\""));
    }

    #[test]
    fn auth_files_give_credentials_without_quoting_them() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = d.path().join("auth.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("me:s3cret-pw");
        std::fs::write(&f, format!(r#"{{"auths":{{"https://reg.example:5000/v1/":{{"auth":"{b64}"}},"other.io":{{"username":"u","password":"p"}}}}}}"#))
            .unwrap_or_else(|e| panic!("{e}"));
        let c = creds_for(&f, "reg.example:5000")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("none"));
        assert_eq!((c.user.as_str(), c.password.as_str()), ("me", "s3cret-pw"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(creds_for(&f, "other.io")
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some());
        assert!(creds_for(&f, "third.io")
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none());
        std::fs::write(&f, r#"{"auths": {"x": {"auth": "s3cret-pw"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let e = creds_for(&f, "x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("not an") && !e.contains("s3cret"), "{e}");
    }
}
