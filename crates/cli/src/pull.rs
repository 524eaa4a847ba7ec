//! `agentvm images pull REF`: an image from a registry (the OCI
//! distribution API), written as an OCI image layout in the store's
//! scratch and imported from there, so every check an import makes
//! applies. Every blob is hashed as it arrives and refused if it is not
//! what its digest says; `REF@sha256:...` pins the manifest (or index).
//! Credentials come from an auth file (the docker/podman `auths` format)
//! and are never printed.

use std::io::Write;
use std::path::{Path, PathBuf};

use agentvm_image::{host_arch, Descriptor, Image, ImageError, Limits, Store};
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Index, manifest and config bodies are read up to this.
const JSON_MAX: usize = 4 << 20;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// `[REGISTRY/]REPO[:TAG][@sha256:HEX]`, parsed as docker does.
#[derive(Debug, PartialEq)]
pub struct Reference {
    pub registry: String,
    pub repo: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

fn bad(m: String) -> ImageError {
    ImageError::BadArchive(m)
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
    fn wanted(&self) -> &str {
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
struct Creds {
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

fn creds_for(file: &Path, registry: &str) -> Result<Option<Creds>, ImageError> {
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

/// What to pull and how.
pub struct PullOpts {
    pub plain_http: bool,
    pub auth_file: Option<PathBuf>,
    pub tag: Option<String>,
    pub limits: Limits,
}

struct Registry {
    http: reqwest::Client,
    base: String,
    registry: String,
    repo: String,
    creds: Option<Creds>,
    token: Option<String>,
    /// The registry asked for Basic: send the credentials from now on.
    basic: bool,
}

fn net(registry: &str) -> impl Fn(reqwest::Error) -> ImageError + '_ {
    // reqwest's error names the URL, never a header
    move |e| ImageError::Io(format!("registry {registry}: {e}"))
}

impl Registry {
    async fn get(&mut self, path: &str, accept: &str) -> Result<reqwest::Response, ImageError> {
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

async fn read_bounded(
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

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

#[derive(Deserialize)]
struct Doc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The most layers a pulled image may have (the sandbox stacks them
/// with overlayfs, which takes a few hundred at most).
const MAX_LAYERS: usize = 128;

/// A registry's digest, checked: `sha256:` and 64 lowercase hex digits
/// (shown escaped when it is not, since it came from the network).
fn check_digest(digest: &str) -> Result<&str, ImageError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad(format!(
            "digest {:?} is not sha256",
            digest.chars().take(100).collect::<String>()
        )));
    }
    Ok(hex)
}

fn blob_path(blobs: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    Ok(blobs.join(check_digest(digest)?))
}

/// Pull `r` into `store`. `progress` hears a line per step.
pub fn pull(
    store: &Store,
    r: &Reference,
    o: &PullOpts,
    progress: &mut dyn FnMut(&str),
) -> Result<Image, ImageError> {
    let tag = o.tag.clone().unwrap_or_else(|| r.name());
    if !agentvm_image::valid_tag(&tag) {
        return Err(bad(format!(
            "tag {}: letters, digits and ._-/:@ only, at most 255",
            tag.chars().take(100).collect::<String>()
        )));
    }
    let creds = match auth_file(o.auth_file.clone()) {
        Some(f) => creds_for(&f, &r.registry)?,
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ImageError::Io(format!("a runtime: {e}")))?;
    let scratch = store.scratch("pull")?;
    let res = rt.block_on(fetch(store, r, o, creds, &scratch, &tag, progress));
    let res = res.and_then(|()| store.import(&scratch, Some(&tag), o.limits, progress));
    let _ = std::fs::remove_dir_all(&scratch);
    res
}

async fn fetch(
    store: &Store,
    r: &Reference,
    o: &PullOpts,
    creds: Option<Creds>,
    layout: &Path,
    tag: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .read_timeout(std::time::Duration::from_secs(120))
        .user_agent(concat!("agentvm/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(net(&r.registry))?;
    let host = if r.registry == "docker.io" {
        "registry-1.docker.io"
    } else {
        &r.registry
    };
    let mut reg = Registry {
        http,
        base: format!("{}://{host}", if o.plain_http { "http" } else { "https" }),
        registry: r.registry.clone(),
        repo: r.repo.clone(),
        creds,
        token: None,
        basic: false,
    };
    let blobs = layout.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs)
        .map_err(|e| ImageError::Io(format!("{}: {e}", blobs.display())))?;
    progress(&format!(
        "pulling {}/{}{}{} from {}",
        r.registry,
        r.repo,
        if r.digest.is_some() { "@" } else { ":" },
        r.wanted(),
        reg.base
    ));

    // the manifest (or index) the reference names, checked against the pin
    let resp = reg
        .get(&format!("manifests/{}", r.wanted()), ACCEPT)
        .await?;
    let ct = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut body = read_bounded(resp, JSON_MAX, &r.registry).await?;
    let mut digest = sha256(&body);
    if let Some(pin) = &r.digest {
        if &digest != pin {
            return Err(ImageError::Digest(format!(
                "the registry's manifest for {} hashes to {digest}",
                r.wanted()
            )));
        }
    }
    let mut doc: Doc =
        serde_json::from_slice(&body).map_err(|e| bad(format!("the registry's manifest: {e}")))?;
    let mut media = if doc.media_type.is_empty() {
        ct
    } else {
        doc.media_type.clone()
    };
    if let Some(ms) = doc.manifests.take() {
        // an index: this machine's platform
        let d = ms
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
            })
            .or(if ms.len() == 1 { ms.first() } else { None })
            .ok_or_else(|| bad(format!("no linux/{} image in the index", host_arch())))?;
        check_digest(&d.digest)?;
        progress(&format!(
            "index {digest}: linux/{} is {}",
            host_arch(),
            d.digest
        ));
        let resp = reg.get(&format!("manifests/{}", d.digest), ACCEPT).await?;
        body = read_bounded(resp, JSON_MAX, &r.registry).await?;
        digest = sha256(&body);
        if digest != d.digest {
            return Err(ImageError::Digest(format!(
                "the manifest {} hashes to {digest}",
                d.digest
            )));
        }
        media = d.media_type.clone();
        doc = serde_json::from_slice(&body).map_err(|e| bad(format!("the manifest: {e}")))?;
    }
    let (Some(config), Some(layers)) = (doc.config, doc.layers) else {
        return Err(bad(
            "the manifest has no config or layers (a schema 1 manifest is not supported)".into(),
        ));
    };
    std::fs::write(blob_path(&blobs, &digest)?, &body)
        .map_err(|e| ImageError::Io(format!("{}: {e}", layout.display())))?;
    // every digest is checked before it names a URL or reaches the
    // terminal; the layers are bounded before anything is fetched
    check_digest(&config.digest)?;
    for l in &layers {
        check_digest(&l.digest)?;
    }
    if layers.len() > MAX_LAYERS {
        return Err(ImageError::TooLarge(format!(
            "the manifest lists {} layers; at most {MAX_LAYERS}",
            layers.len()
        )));
    }
    let total = layers.iter().fold(0u64, |a, l| a.saturating_add(l.size));
    if total > o.limits.bytes.saturating_add(64 << 20) {
        return Err(ImageError::TooLarge(format!(
            "the layers are {total} bytes, past the image's limit (--max-size)"
        )));
    }
    progress(&format!("manifest {digest}: {} layers", layers.len()));

    let resp = reg.get(&format!("blobs/{}", config.digest), "*/*").await?;
    let cb = read_bounded(resp, JSON_MAX, &r.registry).await?;
    if sha256(&cb) != config.digest {
        return Err(ImageError::Digest(format!(
            "the config {} hashes to {}",
            config.digest,
            sha256(&cb)
        )));
    }
    std::fs::write(blob_path(&blobs, &config.digest)?, &cb)
        .map_err(|e| ImageError::Io(format!("{}: {e}", layout.display())))?;
    let diff_ids = serde_json::from_slice::<ConfigDoc>(&cb)
        .ok()
        .and_then(|c| c.rootfs)
        .map(|r| r.diff_ids)
        .unwrap_or_default();

    let n = layers.len();
    for (i, l) in layers.iter().enumerate() {
        let path = blob_path(&blobs, &l.digest)?;
        // a layer the store has unpacked is not fetched again: import
        // finds it by its diff_id without reading its blob
        if diff_ids.get(i).is_some_and(|d| store.has_layer(d)) {
            progress(&format!(
                "layer {}/{n}: {} already in the store",
                i + 1,
                l.digest
            ));
            continue;
        }
        if l.size > o.limits.bytes.saturating_add(64 << 20) {
            return Err(ImageError::TooLarge(format!(
                "layer {} is {} bytes, past the image's limit",
                l.digest, l.size
            )));
        }
        progress(&format!(
            "layer {}/{n}: {} ({:.1} MiB)",
            i + 1,
            l.digest,
            l.size as f64 / (1 << 20) as f64
        ));
        let mut resp = reg.get(&format!("blobs/{}", l.digest), "*/*").await?;
        let mut f = std::fs::File::create(&path)
            .map_err(|e| ImageError::Io(format!("{}: {e}", path.display())))?;
        let mut h = Sha256::new();
        let mut got = 0u64;
        while let Some(c) = resp.chunk().await.map_err(net(&r.registry))? {
            got += c.len() as u64;
            if got > l.size {
                return Err(ImageError::Digest(format!(
                    "layer {} is longer than the {} bytes its descriptor says",
                    l.digest, l.size
                )));
            }
            h.update(&c);
            f.write_all(&c)
                .map_err(|e| ImageError::Io(format!("{}: {e}", path.display())))?;
        }
        let d = format!("sha256:{}", hex::encode(h.finalize()));
        if d != l.digest || got != l.size {
            return Err(ImageError::Digest(format!(
                "layer {} arrived as {d} ({got} bytes)",
                l.digest
            )));
        }
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media,
            "digest": digest,
            "size": body.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    let write = |name: &str, b: &[u8]| {
        std::fs::write(layout.join(name), b)
            .map_err(|e| ImageError::Io(format!("{}: {e}", layout.display())))
    };
    write("index.json", index.to_string().as_bytes())?;
    write("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
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
