//! OCI images for sandboxes: an image layout (a directory or its tar) or a
//! `docker save` archive, every blob checked against its digest, unpacked
//! once into a content-addressed store of layers in the data directory.
//! The threat model is docs/IMAGES.md.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod build;
mod formats;
mod source;
mod unpack;
mod user;
mod zstd;

pub use build::{host_arch, host_mirror, preset, BuildOpts, Built, DebianSpec, PRESETS};
pub use formats::{Descriptor, Platform};
pub use unpack::{Limits, Report};
pub use user::User;

use formats::{plan_docker, plan_oci, Compression, LayerIn};
use source::Source;
use unpack::{Budget, Unpacker};

/// The largest index, manifest or config accepted.
pub(crate) const JSON_MAX: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The archive is not an image this understands.
    #[error("not an image archive: {0}")]
    BadArchive(String),
    /// A blob is not what its digest or size says.
    #[error("digest mismatch: {0}")]
    Digest(String),
    /// An entry was refused (it would reach outside the layer).
    #[error("refused: {0}")]
    Refused(String),
    /// Past a limit.
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("no image {0}")]
    NotFound(String),
    /// The build tool failed.
    #[error("build: {0}")]
    Build(String),
    #[error("{0}")]
    Io(String),
}

/// What a sandbox takes from an image's config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Config {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// One stored image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    /// `sha256:...` of its manifest (of its config for an older `docker
    /// save` archive, which has no manifest).
    pub digest: String,
    pub tags: Vec<String>,
    /// Its layers' diff_ids, bottom first.
    pub layers: Vec<String>,
    pub config: Config,
    pub architecture: String,
    pub os: String,
    /// Bytes of file contents, all layers.
    pub bytes: u64,
    pub entries: u64,
    /// Device nodes and fifos not made, setuid/setgid bits dropped.
    pub devices_skipped: u64,
    pub setid_dropped: u64,
    /// "oci" or "docker".
    pub format: String,
    /// Unix ms.
    pub imported_at: u64,
    /// What `images build` made it from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built: Option<String>,
}

/// The store: DATA/images.
pub struct Store {
    root: PathBuf,
}

/// What `gc` removed.
#[derive(Debug, Default, Serialize)]
pub struct Gc {
    pub layers_removed: usize,
    pub unfinished_removed: usize,
    pub layers_kept: usize,
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ImageError {
    move |e| ImageError::Io(format!("{what}: {e}"))
}

/// The hex of a `sha256:` digest, checked.
pub(crate) fn hex_of(d: &str) -> Result<&str, ImageError> {
    let h = d
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::BadArchive(format!("digest {} is not sha256", bounded(d))))?;
    if h.len() != 64
        || !h
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ImageError::BadArchive(format!(
            "{} is not a sha256 digest",
            bounded(d)
        )));
    }
    Ok(h)
}

pub(crate) fn bounded(s: &str) -> String {
    s.chars().take(100).collect()
}

/// A reader that hashes and counts what passes through, and fails past
/// `cap` bytes.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    n: u64,
    cap: u64,
    what: &'static str,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R, cap: u64, what: &'static str) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            n: 0,
            cap,
            what,
        }
    }

    fn drain(&mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        while self.read(&mut buf)? > 0 {}
        Ok(())
    }

    fn digest(self) -> (String, u64) {
        (
            format!("sha256:{}", hex::encode(self.hash.finalize())),
            self.n,
        )
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        if self.n > self.cap {
            return Err(std::io::Error::other(format!(
                "{} past {} bytes",
                self.what, self.cap
            )));
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

pub(crate) fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A valid tag: what a registry reference may hold.
pub fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 255
        && !t.starts_with("sha256:")
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
}

/// The store's lock, held while it lives.
struct Locked(std::fs::File);

impl Drop for Locked {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on our own descriptor.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Store {
    /// The store of the data directory `data_dir` (made if missing).
    pub fn open(data_dir: &Path) -> Result<Store, ImageError> {
        let root = data_dir.join("images");
        for d in ["", "layers", "images", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io(p.display()))?;
        }
        Ok(Store { root })
    }

    fn lock(&self) -> Result<Locked, ImageError> {
        use std::os::fd::AsRawFd;
        let p = self.root.join("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io(p.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(ImageError::Io(format!(
                "locking {}: {}",
                p.display(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(Locked(f))
    }

    /// A new scratch directory in the store's tmp/ for work that takes
    /// long without the lock (a build, a pull): `gc` leaves it while this
    /// process lives. The caller removes it.
    pub fn scratch(&self, what: &str) -> Result<PathBuf, ImageError> {
        let p = self
            .root
            .join("tmp")
            .join(format!("{what}.{}.{}", std::process::id(), now_ms()));
        std::fs::create_dir(&p).map_err(io(p.display()))?;
        Ok(p)
    }

    /// Whether the store holds the unpacked layer `diff_id` (with its
    /// record), so an import need not read its blob.
    pub fn has_layer(&self, diff_id: &str) -> bool {
        self.layer_dir(diff_id)
            .is_ok_and(|d| d.is_dir() && d.with_extension("json").is_file())
    }

    /// Where the unpacked layer `diff_id` is.
    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("layers").join(hex_of(diff_id)?))
    }

    /// Import the image at `path`; `tag` names it (else the archive's own
    /// name, if it has one). `progress` hears a line per step.
    pub fn import(
        &self,
        path: &Path,
        tag: Option<&str>,
        limits: Limits,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Image, ImageError> {
        if let Some(t) = tag.filter(|t| !valid_tag(t)) {
            return Err(ImageError::BadArchive(format!(
                "tag {}: letters, digits and ._-/:@ only, at most 255, not a digest",
                bounded(t)
            )));
        }
        let src = Source::open(path)?;
        let plan = if src.has("index.json") && src.has("oci-layout") {
            plan_oci(&src)?
        } else if src.has("manifest.json") {
            plan_docker(&src)?
        } else {
            return Err(ImageError::BadArchive(format!(
                "{}: neither an OCI image layout (oci-layout, index.json) nor a docker save archive (manifest.json)",
                path.display()
            )));
        };
        let _l = self.lock()?;
        let mut budget = Budget::new(limits);
        let mut total = Report::default();
        let n = plan.layers.len();
        for (i, l) in plan.layers.iter().enumerate() {
            progress(&format!("layer {}/{n}: {}", i + 1, l.diff_id));
            let r = self.layer(&src, l, &mut budget)?;
            total.entries += r.entries;
            total.bytes += r.bytes;
            total.devices_skipped += r.devices_skipped;
            total.setid_dropped += r.setid_dropped;
        }
        let rc = plan.config.config.unwrap_or_default();
        let mut tags: Vec<String> = tag
            .map(|t| vec![t.to_string()])
            .unwrap_or_else(|| plan.tags.into_iter().filter(|t| valid_tag(t)).collect());
        tags.dedup();
        let img = Image {
            digest: plan.digest,
            tags: tags.clone(),
            layers: plan.layers.iter().map(|l| l.diff_id.clone()).collect(),
            config: Config {
                env: rc.env.unwrap_or_default(),
                working_dir: rc.working_dir.unwrap_or_default(),
                user: rc.user.unwrap_or_default(),
                entrypoint: rc.entrypoint.unwrap_or_default(),
                cmd: rc.cmd.unwrap_or_default(),
            },
            architecture: plan.config.architecture,
            os: plan.config.os,
            bytes: total.bytes,
            entries: total.entries,
            devices_skipped: total.devices_skipped,
            setid_dropped: total.setid_dropped,
            format: plan.format.into(),
            imported_at: now_ms(),
            built: None,
        };
        self.untag_others(&img.digest, &tags)?;
        // an image imported again keeps the tags it had, and how it was built
        let mut img = img;
        if let Ok(old) = self.read(&img.digest) {
            for t in old.tags {
                if !img.tags.contains(&t) {
                    img.tags.push(t);
                }
            }
            img.built = old.built;
        }
        self.write(&img)?;
        Ok(img)
    }

    /// A tag names one image: `tags` leave every image but `digest`.
    fn untag_others(&self, digest: &str, tags: &[String]) -> Result<(), ImageError> {
        for mut other in self.list_unlocked()? {
            if other.digest != digest && other.tags.iter().any(|t| tags.contains(t)) {
                other.tags.retain(|t| !tags.contains(t));
                self.write(&other)?;
            }
        }
        Ok(())
    }

    /// Name the stored image `digest` `tag` too (taking it from any other).
    pub fn add_tag(&self, digest: &str, tag: &str) -> Result<Image, ImageError> {
        if !valid_tag(tag) {
            return Err(ImageError::BadArchive(format!(
                "tag {}: letters, digits and ._-/:@ only, at most 255, not a digest",
                bounded(tag)
            )));
        }
        let _l = self.lock()?;
        let mut img = self.read(digest)?;
        let tags = vec![tag.to_string()];
        self.untag_others(digest, &tags)?;
        if !img.tags.iter().any(|t| t == tag) {
            img.tags.push(tag.to_string());
            self.write(&img)?;
        }
        Ok(img)
    }

    /// Unpack one layer (unless the store has it), checking its digests.
    fn layer(&self, src: &Source, l: &LayerIn, budget: &mut Budget) -> Result<Report, ImageError> {
        let dest = self.layer_dir(&l.diff_id)?;
        let meta = dest.with_extension("json");
        if dest.is_dir() {
            if let Ok(r) = std::fs::read(&meta)
                .map_err(|_| ())
                .and_then(|b| serde_json::from_slice::<Report>(&b).map_err(|_| ()))
            {
                budget.bytes = budget.bytes.saturating_add(r.bytes);
                return Ok(r);
            }
        }
        let (r, len) = src.read(&l.name)?;
        if let Some((d, size)) = &l.blob {
            if *size != u64::MAX && *size != len {
                return Err(ImageError::Digest(format!(
                    "layer {} is {len} bytes; its descriptor says {size}",
                    bounded(d)
                )));
            }
        }
        let mut blob = Hashing::new(
            std::io::BufReader::with_capacity(64 << 10, r),
            u64::MAX,
            "the layer",
        );
        let compression = match l.compression {
            Some(c) => c,
            None => {
                let head = std::io::BufRead::fill_buf(&mut blob.inner).map_err(io(&l.name))?;
                if head.starts_with(&[0x1f, 0x8b]) {
                    Compression::Gzip
                } else if head.starts_with(&zstd::MAGIC) {
                    Compression::Zstd
                } else {
                    Compression::None
                }
            }
        };
        // the uncompressed stream may be the files plus their headers: a
        // bomb is cut there
        let left = budget.limits.bytes.saturating_sub(budget.bytes);
        let cap = left
            .saturating_add(left.min(512 << 20))
            .saturating_add(1 << 20);
        let tmp = self.root.join("tmp").join(format!(
            "{}.{}.{}",
            hex_of(&l.diff_id)?,
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir(&tmp).map_err(io(tmp.display()))?;
        let made = (|| -> Result<(Report, String), ImageError> {
            let fd = nix::fcntl::open(
                &tmp,
                nix::fcntl::OFlag::O_RDONLY
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_NOFOLLOW
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| ImageError::Io(format!("{}: {e}", tmp.display())))?;
            // SAFETY: open just returned this descriptor; we own it.
            let root = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut un = Unpacker::new(root);
            let (stream, what): (Box<dyn Read + '_>, _) = match compression {
                Compression::Gzip => (
                    Box::new(flate2::read::GzDecoder::new(&mut blob)),
                    "the layer, uncompressed,",
                ),
                Compression::Zstd => (
                    Box::new(zstd::Frames::new(std::io::BufReader::with_capacity(
                        64 << 10,
                        &mut blob,
                    ))),
                    "the layer, uncompressed,",
                ),
                Compression::None => (Box::new(&mut blob), "the layer"),
            };
            let mut plain = Hashing::new(stream, cap, what);
            unpack_into(&mut plain, &mut un, budget)?;
            plain
                .drain()
                .map_err(|e| ImageError::TooLarge(format!("layer {}: {e}", l.diff_id)))?;
            let diff = plain.digest().0;
            Ok((un.finish()?, diff))
        })();
        let result = made.and_then(|(report, diff)| {
            blob.drain().map_err(io(&l.name))?;
            let (got, _) = blob.digest();
            if let Some((want, _)) = &l.blob {
                if &got != want {
                    return Err(ImageError::Digest(format!(
                        "layer {} hashes to {got}",
                        bounded(want)
                    )));
                }
            }
            if diff != l.diff_id {
                return Err(ImageError::Digest(format!(
                    "layer {} unpacks to {diff}; the config says {}",
                    bounded(&l.name),
                    l.diff_id
                )));
            }
            Ok(report)
        });
        match result {
            Ok(report) => {
                let b = serde_json::to_vec(&report).map_err(|e| ImageError::Io(e.to_string()))?;
                write_atomic(&meta, &b)?;
                if dest.is_dir() {
                    // a layer without its record: made again
                    std::fs::remove_dir_all(&dest).map_err(io(dest.display()))?;
                }
                std::fs::rename(&tmp, &dest).map_err(io(dest.display()))?;
                Ok(report)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    fn record(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self
            .root
            .join("images")
            .join(format!("{}.json", hex_of(digest)?)))
    }

    fn write(&self, img: &Image) -> Result<(), ImageError> {
        let b = serde_json::to_vec_pretty(img).map_err(|e| ImageError::Io(e.to_string()))?;
        write_atomic(&self.record(&img.digest)?, &b)
    }

    fn read(&self, digest: &str) -> Result<Image, ImageError> {
        let p = self.record(digest)?;
        let b = std::fs::read(&p).map_err(|_| ImageError::NotFound(digest.into()))?;
        serde_json::from_slice(&b).map_err(|e| ImageError::Io(format!("{}: {e}", p.display())))
    }

    fn list_unlocked(&self) -> Result<Vec<Image>, ImageError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(dir.display()))? {
            let e = e.map_err(io(dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".json") else {
                continue;
            };
            if let Ok(img) = self.read(&format!("sha256:{hex}")) {
                out.push(img);
            }
        }
        out.sort_by_key(|i| i.imported_at);
        Ok(out)
    }

    /// Every image, oldest import first.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        self.list_unlocked()
    }

    /// The image a tag, a digest or a digest's prefix (at least 12 hex
    /// digits, `sha256:` optional) names.
    pub fn find(&self, name: &str) -> Result<Image, ImageError> {
        let all = self.list_unlocked()?;
        if let Some(i) = all.iter().find(|i| i.tags.iter().any(|t| t == name)) {
            return Ok(i.clone());
        }
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<&Image> = all
                .iter()
                .filter(|i| i.digest.trim_start_matches("sha256:").starts_with(hex))
                .collect();
            match hits.as_slice() {
                [one] => return Ok((*one).clone()),
                [] => {}
                _ => {
                    return Err(ImageError::NotFound(format!(
                        "{}: more than one image's digest starts so; give more of it",
                        bounded(name)
                    )))
                }
            }
        }
        Err(ImageError::NotFound(bounded(name)))
    }

    /// Forget an image (its layers stay until `gc`, for others may share
    /// them).
    pub fn remove(&self, name: &str) -> Result<Image, ImageError> {
        let _l = self.lock()?;
        let img = self.find(name)?;
        let p = self.record(&img.digest)?;
        std::fs::remove_file(&p).map_err(io(p.display()))?;
        Ok(img)
    }

    /// Remove the layers no image names, and unfinished imports.
    pub fn gc(&self) -> Result<Gc, ImageError> {
        let _l = self.lock()?;
        let mut used = std::collections::BTreeSet::new();
        for i in self.list_unlocked()? {
            for l in &i.layers {
                used.insert(hex_of(l)?.to_string());
            }
        }
        let mut g = Gc::default();
        let dir = self.root.join("layers");
        for e in std::fs::read_dir(&dir).map_err(io(dir.display()))? {
            let e = e.map_err(io(dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(".json").unwrap_or(&name).to_string();
            if used.contains(&hex) {
                if !name.ends_with(".json") {
                    g.layers_kept += 1;
                }
                continue;
            }
            let p = e.path();
            if name.ends_with(".json") {
                std::fs::remove_file(&p).map_err(io(p.display()))?;
            } else {
                std::fs::remove_dir_all(&p).map_err(io(p.display()))?;
                g.layers_removed += 1;
            }
        }
        let tmp = self.root.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io(tmp.display()))? {
            let e = e.map_err(io(tmp.display()))?;
            // NAME.PID.MS: a build still running (it holds no lock while
            // mmdebstrap works) keeps its scratch
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.rsplit('.').nth(1).and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| {
                p != std::process::id() && Path::new(&format!("/proc/{p}")).exists()
            }) {
                continue;
            }
            std::fs::remove_dir_all(e.path()).map_err(io(e.path().display()))?;
            g.unfinished_removed += 1;
        }
        Ok(g)
    }
}

fn unpack_into<R: Read>(
    r: &mut R,
    un: &mut Unpacker,
    budget: &mut Budget,
) -> Result<(), ImageError> {
    let mut a = tar::Archive::new(r);
    let entries = a
        .entries()
        .map_err(|e| ImageError::BadArchive(format!("a layer is not a tar: {e}")))?;
    for e in entries {
        let mut e = e.map_err(|e| ImageError::BadArchive(format!("a layer's tar: {e}")))?;
        un.entry(&mut e, budget)?;
    }
    Ok(())
}

fn write_atomic(p: &Path, b: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let tmp = p.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io(tmp.display()))?;
    f.write_all(b).map_err(io(tmp.display()))?;
    f.sync_all().map_err(io(tmp.display()))?;
    std::fs::rename(&tmp, p).map_err(io(p.display()))
}
