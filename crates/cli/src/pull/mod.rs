//! `agentvm images pull REF`: an image from a registry (the OCI
//! distribution API), written as an OCI image layout in the store's
//! scratch and imported from there, so every check an import makes
//! applies. Every blob is hashed as it arrives and refused if it is not
//! what its digest says; `REF@sha256:...` pins the manifest (or index).
//! Credentials come from an auth file (the docker/podman `auths` format)
//! and are never printed.

mod reference;
mod registry;

use std::io::Write;
use std::path::{Path, PathBuf};

use agentvm_image::{host_arch, Descriptor, Image, ImageError, Limits, Store};
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use reference::Reference;
use registry::{auth_file, creds_for, net, read_bounded, Creds, Registry};

/// Index, manifest and config bodies are read up to this.
const JSON_MAX: usize = 4 << 20;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

fn bad(m: String) -> ImageError {
    ImageError::BadArchive(m)
}

/// What to pull and how.
pub struct PullOpts {
    pub plain_http: bool,
    pub auth_file: Option<PathBuf>,
    pub tag: Option<String>,
    pub limits: Limits,
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
