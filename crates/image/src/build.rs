//! `images build --debian`: a Debian root filesystem made from Debian's
//! packages by mmdebstrap (from the mirror the host's apt uses), wrapped
//! as a one-layer OCI image layout and imported like any other image, so
//! every check an import makes applies to it too. A build is cached by
//! what it was made from: the same suite, packages, variant and mirror
//! give the stored image back without running anything.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    bounded, io, now_ms, sha256, valid_tag, write_atomic, Image, ImageError, Limits, Store,
};

/// Package lists after the old system's image flavours. `minimal` is
/// Debian's minbase with certificates; each adds to the one before.
pub const PRESETS: &[(&str, &[&str])] = &[
    ("minimal", &["ca-certificates"]),
    (
        "standard",
        &[
            "build-essential",
            "curl",
            "git",
            "jq",
            "less",
            "openssh-client",
            "patch",
            "procps",
            "python3",
            "python3-venv",
            "ripgrep",
            "unzip",
            "xz-utils",
        ],
    ),
    (
        "full",
        &[
            "cargo",
            "golang-go",
            "nodejs",
            "npm",
            "pkg-config",
            "python3-pip",
            "rustc",
            "tmux",
            "vim-tiny",
        ],
    ),
];

/// The packages a preset stands for (with those of the presets before it).
pub fn preset(name: &str) -> Option<Vec<&'static str>> {
    let at = PRESETS.iter().position(|(n, _)| *n == name)?;
    Some(
        PRESETS[..=at]
            .iter()
            .flat_map(|(_, p)| p.iter().copied())
            .collect(),
    )
}

/// What to build: checked at construction, so nothing here can be read
/// by mmdebstrap as an option.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DebianSpec {
    pub suite: String,
    /// Sorted, without repeats.
    pub packages: Vec<String>,
    /// None: the host's apt mirror, else mmdebstrap's default.
    pub mirror: Option<String>,
    /// mmdebstrap's variant: minbase unless asked.
    pub variant: String,
    pub architecture: String,
    /// The security archive (the host's, else Debian's own), used with
    /// `SUITE-updates` from the mirror unless `updates` is false.
    #[serde(default)]
    pub security: Option<String>,
    #[serde(default = "yes")]
    pub updates: bool,
}

fn yes() -> bool {
    true
}

/// Suites that have no -updates or -security archive.
const ROLLING: &[&str] = &["sid", "unstable", "experimental", "rc-buggy"];

/// A URL without its user:password@, to be shown or recorded.
fn shown(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            match auth.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://{host}{path}"),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

const VARIANTS: &[&str] = &[
    "extract",
    "custom",
    "essential",
    "apt",
    "minbase",
    "buildd",
    "required",
    "important",
    "standard",
];

fn debian_name(s: &str, max: usize) -> bool {
    // Debian policy 5.6.1 for package names; suites and codenames fit it
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(c))
}

impl DebianSpec {
    /// `packages` and the packages of `presets`, over `suite`.
    pub fn new(
        suite: &str,
        packages: &[String],
        presets: &[String],
        mirror: Option<&str>,
        variant: Option<&str>,
    ) -> Result<DebianSpec, ImageError> {
        let bad = |m: String| ImageError::BadArchive(m);
        if !debian_name(suite, 64) {
            return Err(bad(format!(
                "suite {}: a Debian suite or codename (bookworm, stable, trixie): lowercase letters, digits and +-. only",
                bounded(suite)
            )));
        }
        let mut all: Vec<String> = Vec::new();
        for p in presets {
            let Some(list) = preset(p) else {
                return Err(bad(format!(
                    "preset {}: one of {}",
                    bounded(p),
                    PRESETS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            all.extend(list.into_iter().map(String::from));
        }
        for p in packages {
            if !debian_name(p, 128) {
                return Err(bad(format!(
                    "package {}: a Debian package name (lowercase letters, digits and +-., starting with a letter or digit)",
                    bounded(p)
                )));
            }
            all.push(p.clone());
        }
        all.sort();
        all.dedup();
        if all.len() > 1000 {
            return Err(ImageError::TooLarge(format!(
                "{} packages; at most 1000",
                all.len()
            )));
        }
        let (host_main, host_security) = host_sources_in(Path::new("/etc/apt"));
        let mirror = match mirror {
            Some(m) => Some(check_mirror(m)?),
            None => host_main,
        };
        let variant = variant.unwrap_or("minbase");
        if !VARIANTS.contains(&variant) {
            return Err(bad(format!(
                "variant {}: one of {}",
                bounded(variant),
                VARIANTS.join(", ")
            )));
        }
        Ok(DebianSpec {
            suite: suite.into(),
            packages: all,
            mirror,
            variant: variant.into(),
            architecture: host_arch().into(),
            security: host_security,
            updates: true,
        })
    }

    /// Build from the suite's main archive only (no -updates, no
    /// -security): for a mirror that has nothing else.
    pub fn without_updates(mut self) -> DebianSpec {
        self.updates = false;
        self
    }

    /// What mmdebstrap is given as its mirrors: sources.list lines for the
    /// suite, its -updates and its -security (mmdebstrap adds those two
    /// itself only when it is given no mirror at all).
    pub fn sources(&self) -> Vec<String> {
        let main = self
            .mirror
            .clone()
            .unwrap_or_else(|| "http://deb.debian.org/debian".into());
        let mut v = vec![format!("deb {main} {} main", self.suite)];
        if self.updates && !ROLLING.contains(&self.suite.as_str()) {
            v.push(format!("deb {main} {}-updates main", self.suite));
            let sec = self
                .security
                .clone()
                .unwrap_or_else(|| "http://deb.debian.org/debian-security".into());
            v.push(format!("deb {sec} {}-security main", self.suite));
        }
        v
    }

    /// The cache key: the hash of everything the build depends on that
    /// the caller chose.
    pub fn key(&self) -> String {
        let b = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&b))
    }

    /// One line: "debian bookworm minbase +git,jq from URL".
    pub fn describe(&self) -> String {
        let mut s = format!("debian {} {}", self.suite, self.variant);
        if !self.packages.is_empty() {
            s.push_str(&format!(" +{}", self.packages.join(",")));
        }
        if let Some(m) = &self.mirror {
            s.push_str(&format!(" from {}", shown(m)));
        }
        if !self.updates {
            s.push_str(" (no updates)");
        }
        s
    }
}

fn check_mirror(m: &str) -> Result<String, ImageError> {
    let ok_scheme = ["http://", "https://", "file:///"]
        .iter()
        .any(|p| m.starts_with(p));
    if !ok_scheme
        || m.len() > 512
        || m.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(ImageError::BadArchive(format!(
            "mirror {}: an http://, https:// or file:/// URL without spaces",
            bounded(m)
        )));
    }
    Ok(m.to_string())
}

/// This machine's architecture as Debian and OCI name it (amd64, arm64).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "arm" => "armhf",
        "powerpc64" => "ppc64el",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// The Debian archive the host's apt uses: the first URI of a source
/// that is not the security archive, from deb822 .sources or one-line
/// sources.list files. None if there is none to find (mmdebstrap then
/// uses its own default, deb.debian.org).
pub fn host_mirror() -> Option<String> {
    host_sources_in(Path::new("/etc/apt")).0
}

/// The host apt's Debian archive and its security archive: the first
/// URI of a source that is not the security archive, and the first that
/// is, from deb822 .sources or one-line sources.list files.
fn host_sources_in(etc_apt: &Path) -> (Option<String>, Option<String>) {
    let (mut main, mut security) = (None, None);
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(rd) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let deb822 = f.extension().is_some_and(|e| e == "sources");
        for l in text.lines() {
            let l = l.trim();
            let uri = if deb822 {
                l.strip_prefix("URIs:")
                    .and_then(|r| r.split_whitespace().next())
            } else {
                l.strip_prefix("deb ").and_then(|r| {
                    // deb [options] uri suite components
                    let r = r.trim_start();
                    let r = match r.strip_prefix('[') {
                        Some(opts) => opts.split_once(']')?.1,
                        None => r,
                    };
                    r.split_whitespace().next()
                })
            };
            if let Some(u) = uri.filter(|u| check_mirror(u).is_ok()) {
                let slot = if u.contains("security") {
                    &mut security
                } else {
                    &mut main
                };
                if slot.is_none() {
                    *slot = Some(u.to_string());
                }
            }
        }
    }
    (main, security)
}

/// How `build_debian` treats its cache and what it may make.
#[derive(Debug, Clone)]
pub struct BuildOpts {
    /// Build even if the cache has it.
    pub rebuild: bool,
    /// A cached build older than this is built again (its packages have
    /// had security fixes since, most likely).
    pub max_age: std::time::Duration,
    pub limits: Limits,
}

impl Default for BuildOpts {
    fn default() -> Self {
        BuildOpts {
            rebuild: false,
            max_age: std::time::Duration::from_secs(7 * 86_400),
            limits: Limits::default(),
        }
    }
}

/// What `build_debian` gave.
#[derive(Debug)]
pub struct Built {
    pub image: Image,
    /// Taken from the cache: nothing was run.
    pub cached: bool,
}

#[derive(Serialize, Deserialize)]
struct CacheRecord {
    digest: String,
    spec: DebianSpec,
    built_at: u64,
}

impl Store {
    fn builds(&self) -> Result<PathBuf, ImageError> {
        let p = self.root.join("builds");
        std::fs::create_dir_all(&p).map_err(io(p.display()))?;
        Ok(p)
    }

    /// Build `spec` with the mmdebstrap at `tool` and name it `tag`; from
    /// the cache unless `rebuild`. `progress` hears mmdebstrap's own lines.
    pub fn build_debian(
        &self,
        spec: &DebianSpec,
        tag: &str,
        tool: &Path,
        o: &BuildOpts,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Built, ImageError> {
        if !valid_tag(tag) {
            return Err(ImageError::BadArchive(format!(
                "name {}: letters, digits and ._-/:@ only, at most 255, not a digest",
                bounded(tag)
            )));
        }
        let rec_path = self.builds()?.join(format!("{}.json", spec.key()));
        if !o.rebuild {
            if let Some((img, built_at)) = self.cached(&rec_path, spec, o.max_age) {
                progress(&format!(
                    "cached: {} is {}, built {} h ago (--rebuild builds it again)",
                    spec.describe(),
                    img.digest,
                    now_ms().saturating_sub(built_at) / 3_600_000
                ));
                let image = self.add_tag(&img.digest, tag)?;
                return Ok(Built {
                    image,
                    cached: true,
                });
            }
        }
        let scratch = self.scratch("build")?;
        let made = self.build_in(&scratch, spec, tag, tool, o.limits, progress);
        let _ = std::fs::remove_dir_all(&scratch);
        let mut image = made?;
        image.built = Some(spec.describe());
        {
            let _l = self.lock()?;
            self.write(&image)?;
        }
        let rec = CacheRecord {
            digest: image.digest.clone(),
            spec: spec.clone(),
            built_at: now_ms(),
        };
        let b = serde_json::to_vec_pretty(&rec).map_err(|e| ImageError::Io(e.to_string()))?;
        write_atomic(&rec_path, &b)?;
        Ok(Built {
            image,
            cached: false,
        })
    }

    /// The cached image for `spec`, if it and all its layers are still
    /// in the store.
    fn cached(
        &self,
        rec_path: &Path,
        spec: &DebianSpec,
        max_age: std::time::Duration,
    ) -> Option<(Image, u64)> {
        let b = std::fs::read(rec_path).ok()?;
        let rec: CacheRecord = serde_json::from_slice(&b).ok()?;
        let age = now_ms().saturating_sub(rec.built_at);
        if &rec.spec != spec || u128::from(age) > max_age.as_millis() {
            return None;
        }
        let img = self.read(&rec.digest).ok()?;
        let whole = img.layers.iter().all(|l| self.has_layer(l));
        whole.then_some((img, rec.built_at))
    }

    fn build_in(
        &self,
        scratch: &Path,
        spec: &DebianSpec,
        tag: &str,
        tool: &Path,
        limits: Limits,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Image, ImageError> {
        let tarball = scratch.join("rootfs.tar");
        let mut cmd = Command::new(tool);
        cmd.arg(format!("--variant={}", spec.variant))
            .arg("--format=tar")
            .arg(format!("--architectures={}", spec.architecture))
            // the sandbox lays its own over these; without them the
            // output depends less on the host
            .arg("--customize-hook=rm -f \"$1/etc/resolv.conf\" \"$1/etc/hostname\"");
        if !spec.packages.is_empty() {
            cmd.arg(format!("--include={}", spec.packages.join(",")));
        }
        cmd.arg(&spec.suite).arg(&tarball);
        // whole sources.list lines (checked parts only): the suite, its
        // updates and its security fixes
        cmd.args(spec.sources());
        progress(&format!(
            "building {} with {} (this downloads from the mirror; minutes)",
            spec.describe(),
            tool.display()
        ));
        run_tool(cmd, tool, progress)?;
        let (diff_id, size) = hash_file(&tarball)?;
        progress(&format!(
            "root filesystem: {:.1} MiB, {diff_id}",
            size as f64 / (1 << 20) as f64
        ));
        let layout = scratch.join("oci");
        let blobs = layout.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io(blobs.display()))?;
        let layer_hex = diff_id.trim_start_matches("sha256:");
        std::fs::rename(&tarball, blobs.join(layer_hex)).map_err(io(blobs.display()))?;
        let config = serde_json::json!({
            "architecture": spec.architecture,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Labels": { "org.agentvm.built": spec.describe() },
            },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        });
        let config = put_json(&blobs, &config)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config.0, "size": config.1,
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": diff_id, "size": size,
            }],
        });
        let manifest = put_json(&blobs, &manifest)?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest.0, "size": manifest.1,
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }],
        });
        let b = serde_json::to_vec(&index).map_err(|e| ImageError::Io(e.to_string()))?;
        write_atomic(&layout.join("index.json"), &b)?;
        write_atomic(
            &layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        self.import(&layout, Some(tag), limits, progress)
    }
}

/// Write a JSON blob into `blobs`; its digest and size.
fn put_json(blobs: &Path, v: &serde_json::Value) -> Result<(String, u64), ImageError> {
    let b = serde_json::to_vec(v).map_err(|e| ImageError::Io(e.to_string()))?;
    let d = sha256(&b);
    write_atomic(&blobs.join(d.trim_start_matches("sha256:")), &b)?;
    Ok((d, b.len() as u64))
}

fn hash_file(p: &Path) -> Result<(String, u64), ImageError> {
    let mut f = std::fs::File::open(p).map_err(|e| {
        ImageError::Io(format!(
            "the build made no root filesystem at {}: {e}",
            p.display()
        ))
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io(p.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

/// Lines longer than this are cut before they are shown or kept.
const LINE_MAX: usize = 400;
/// The tool's last lines, kept for the error if it fails.
const TAIL: usize = 12;

/// Run the build tool, its output (both streams) passed to `progress`
/// line by line; on failure, an error with its last lines.
fn run_tool(
    mut cmd: Command,
    tool: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        ImageError::Io(if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "{} not found: `apt-get install mmdebstrap` (or name one with AGENTVM_MMDEBSTRAP)",
                tool.display()
            )
        } else {
            format!("starting {}: {e}", tool.display())
        })
    })?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut readers = Vec::new();
    let outs: Vec<Box<dyn Read + Send>> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for out in outs {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(out);
            let mut line = Vec::new();
            loop {
                line.clear();
                // bounded: a line without an end is cut, not gathered
                match r.by_ref().take(64 << 10).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let s = String::from_utf8_lossy(&line);
                        let s: String = s.trim_end().chars().take(LINE_MAX).collect();
                        if tx.send(s).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for l in rx {
        if l.is_empty() {
            continue;
        }
        progress(&format!("mmdebstrap: {l}"));
        if tail.len() == TAIL {
            tail.pop_front();
        }
        tail.push_back(l);
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().map_err(io(tool.display()))?;
    if !status.success() {
        let mut msg = format!("{} failed ({status})", tool.display());
        if !tail.is_empty() {
            msg.push_str("; its last lines:");
            for l in tail {
                msg.push_str("\n  ");
                msg.push_str(&l);
            }
        }
        return Err(ImageError::Build(msg));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_an_option_parser_could_take_are_refused() {
        for bad in ["-x", "--include=evil", "", "Foo", "a b", "a,b", "a;b", "ä"] {
            assert!(
                DebianSpec::new("bookworm", &[bad.to_string()], &[], Some("http://m/"), None)
                    .is_err(),
                "package {bad:?}"
            );
            assert!(
                DebianSpec::new(bad, &[], &[], Some("http://m/"), None).is_err(),
                "suite {bad:?}"
            );
        }
        for bad in [
            "-http://x",
            "ftp://x",
            "http://a b",
            "http://x\n",
            "file://rel",
        ] {
            assert!(
                DebianSpec::new("bookworm", &[], &[], Some(bad), None).is_err(),
                "mirror {bad:?}"
            );
        }
        assert!(DebianSpec::new("bookworm", &[], &["huge".into()], None, None).is_err());
        assert!(DebianSpec::new("bookworm", &[], &[], None, Some("--x")).is_err());
    }

    #[test]
    fn presets_add_up_and_packages_are_sorted_once() {
        let s = DebianSpec::new(
            "bookworm",
            &["jq".into(), "git".into(), "zsh".into()],
            &["standard".into()],
            Some("http://m/debian"),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            s.packages.windows(2).all(|w| w[0] < w[1]),
            "{:?}",
            s.packages
        );
        assert!(s.packages.contains(&"ca-certificates".to_string()));
        assert!(s.packages.contains(&"zsh".to_string()));
        let full = preset("full").unwrap_or_default();
        assert!(full.contains(&"git") && full.contains(&"rustc"));
        // the key follows what the build depends on
        let t = DebianSpec::new(
            "bookworm",
            &["git".into(), "jq".into(), "zsh".into(), "jq".into()],
            &["standard".into()],
            Some("http://m/debian"),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.key(), t.key());
        let u = DebianSpec::new(
            "trixie",
            &["git".into()],
            &["standard".into()],
            Some("http://m/debian"),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(s.key(), u.key());
    }

    #[test]
    fn sources_carry_updates_and_security_and_no_credentials_are_shown() {
        let s = DebianSpec::new(
            "bookworm",
            &[],
            &[],
            Some("https://u:tok3n@m.example/debian"),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let src = s.sources();
        assert_eq!(src.len(), 3, "{src:?}");
        assert_eq!(
            src[1],
            "deb https://u:tok3n@m.example/debian bookworm-updates main"
        );
        assert!(src[2].ends_with("bookworm-security main"), "{src:?}");
        assert!(!s.describe().contains("tok3n"), "{}", s.describe());
        assert!(s.describe().contains("from https://m.example/debian"));
        assert_eq!(s.clone().without_updates().sources().len(), 1);
        assert_ne!(s.clone().without_updates().key(), s.key());
        let sid = DebianSpec::new("sid", &[], &[], Some("http://m/debian"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sid.sources(),
            vec!["deb http://m/debian sid main".to_string()]
        );
    }

    #[test]
    fn the_host_mirror_is_read_from_either_sources_format() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let etc = d.path();
        std::fs::create_dir(etc.join("sources.list.d")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(host_sources_in(etc).0, None);
        std::fs::write(
            etc.join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://security.debian.org/debian-security\nSuites: bookworm-security\n\nTypes: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            host_sources_in(etc).0.as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            host_sources_in(etc).1.as_deref(),
            Some("http://security.debian.org/debian-security")
        );
        std::fs::write(
            etc.join("sources.list"),
            "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            host_sources_in(etc).0.as_deref(),
            Some("http://one.example/debian")
        );
    }
}
