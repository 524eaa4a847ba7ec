//! What an archive says an image is: an OCI image layout's index,
//! manifest and config, or a `docker save` archive's manifest.json and
//! config, each JSON blob bounded and checked against its digest before
//! it is believed.

use serde::Deserialize;

use crate::source::Source;
use crate::{bounded, hex_of, sha256, ImageError, JSON_MAX};

/// An OCI content descriptor (also what `images pull` reads).
#[derive(Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize, Default)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default)]
    pub(crate) config: Option<RawRunConfig>,
    pub(crate) rootfs: RootFs,
}

#[derive(Deserialize, Default)]
pub(crate) struct RawRunConfig {
    #[serde(rename = "Env", default)]
    pub(crate) env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub(crate) working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub(crate) user: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    pub(crate) entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub(crate) cmd: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub(crate) diff_ids: Vec<String>,
}

fn json<T: serde::de::DeserializeOwned>(b: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(b).map_err(|e| ImageError::BadArchive(format!("{what}: {e}")))
}

/// A layer to unpack: where its blob is, what it must hash to.
pub(crate) struct LayerIn {
    pub(crate) name: String,
    /// (digest, size) of the blob as stored (compressed or not).
    pub(crate) blob: Option<(String, u64)>,
    /// None: sniffed from the blob's first bytes.
    pub(crate) compression: Option<Compression>,
    pub(crate) diff_id: String,
}

/// An image as the archive describes it, checked but not yet unpacked.
pub(crate) struct Plan {
    pub(crate) digest: String,
    pub(crate) tags: Vec<String>,
    pub(crate) config: RawConfig,
    pub(crate) layers: Vec<LayerIn>,
    pub(crate) format: &'static str,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

fn compression_of(media_type: &str) -> Result<Option<Compression>, ImageError> {
    if media_type.is_empty() {
        return Ok(None);
    }
    if media_type.ends_with("+zstd") || media_type.ends_with(".zstd") {
        return Ok(Some(Compression::Zstd));
    }
    if media_type.ends_with("+gzip") || media_type.ends_with(".gzip") {
        return Ok(Some(Compression::Gzip));
    }
    if media_type.ends_with(".tar") || media_type.ends_with("tar") {
        return Ok(Some(Compression::None));
    }
    Err(ImageError::BadArchive(format!(
        "layer media type {} is not a tar",
        bounded(media_type)
    )))
}

fn blob_name(d: &str) -> Result<String, ImageError> {
    Ok(format!("blobs/sha256/{}", hex_of(d)?))
}

/// Read and check a JSON blob against its descriptor.
fn checked_blob(src: &Source, d: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
    let b = src.read_small(&blob_name(&d.digest)?, JSON_MAX)?;
    let got = sha256(&b);
    if got != d.digest || b.len() as u64 != d.size {
        return Err(ImageError::Digest(format!(
            "the {what} is {got} ({} bytes); its descriptor says {} ({} bytes)",
            b.len(),
            bounded(&d.digest),
            d.size
        )));
    }
    Ok(b)
}

pub(crate) fn plan_oci(src: &Source) -> Result<Plan, ImageError> {
    let index: Index = json(&src.read_small("index.json", JSON_MAX)?, "index.json")?;
    let mut tags = Vec::new();
    // the manifest for linux/amd64, or the only one; a nested index (a
    // multi-platform image) is followed once
    let mut pick = |ms: &[Descriptor]| -> Result<usize, ImageError> {
        let want = |d: &Descriptor| {
            d.platform
                .as_ref()
                .is_none_or(|p| p.os == "linux" && p.architecture == crate::host_arch())
        };
        let i = match ms.len() {
            0 => {
                return Err(ImageError::BadArchive(
                    "index.json lists no manifest".into(),
                ))
            }
            1 => 0,
            _ => ms.iter().position(want).ok_or_else(|| {
                ImageError::BadArchive(
                    "no manifest for this machine's platform in index.json".into(),
                )
            })?,
        };
        if let Some(t) = ms[i].annotations.get("org.opencontainers.image.ref.name") {
            tags.push(t.clone());
        }
        Ok(i)
    };
    let i = pick(&index.manifests)?;
    let mut d = &index.manifests[i];
    let nested;
    if d.media_type.ends_with("image.index.v1+json")
        || d.media_type.ends_with("manifest.list.v2+json")
    {
        nested = json::<Index>(&checked_blob(src, d, "nested index")?, "nested index")?;
        let j = pick(&nested.manifests)?;
        d = &nested.manifests[j];
    }
    let digest = d.digest.clone();
    let m: Manifest = json(&checked_blob(src, d, "manifest")?, "manifest")?;
    let config: RawConfig = json(&checked_blob(src, &m.config, "config")?, "config")?;
    if config.rootfs.diff_ids.len() != m.layers.len() {
        return Err(ImageError::BadArchive(format!(
            "the manifest has {} layers, the config's rootfs {}",
            m.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (l, diff) in m.layers.iter().zip(&config.rootfs.diff_ids) {
        hex_of(diff)?;
        layers.push(LayerIn {
            name: blob_name(&l.digest)?,
            blob: Some((l.digest.clone(), l.size)),
            compression: compression_of(&l.media_type)?,
            diff_id: diff.clone(),
        });
    }
    Ok(Plan {
        digest,
        tags,
        config,
        layers,
        format: "oci",
    })
}

pub(crate) fn plan_docker(src: &Source) -> Result<Plan, ImageError> {
    let entries: Vec<DockerEntry> =
        json(&src.read_small("manifest.json", JSON_MAX)?, "manifest.json")?;
    let [e] = entries.as_slice() else {
        return Err(ImageError::BadArchive(format!(
            "manifest.json lists {} images; import an archive of one",
            entries.len()
        )));
    };
    let raw = src.read_small(&e.config, JSON_MAX)?;
    let digest = sha256(&raw);
    // the older format names the config by its own digest: check it
    let named = e
        .config
        .trim_end_matches(".json")
        .rsplit('/')
        .next()
        .unwrap_or("");
    if named.len() == 64 && named != hex_of(&digest)? {
        return Err(ImageError::Digest(format!(
            "the config {} hashes to {digest}",
            bounded(&e.config)
        )));
    }
    let config: RawConfig = json(&raw, "config")?;
    if config.rootfs.diff_ids.len() != e.layers.len() {
        return Err(ImageError::BadArchive(format!(
            "manifest.json has {} layers, the config's rootfs {}",
            e.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (l, diff) in e.layers.iter().zip(&config.rootfs.diff_ids) {
        hex_of(diff)?;
        // a newer docker save keeps layers as blobs named by digest
        let blob = l
            .strip_prefix("blobs/sha256/")
            .filter(|h| h.len() == 64)
            .map(|h| format!("sha256:{h}"));
        layers.push(LayerIn {
            name: l.clone(),
            blob: blob.map(|d| (d, u64::MAX)),
            compression: None,
            diff_id: diff.clone(),
        });
    }
    Ok(Plan {
        digest,
        tags: e.repo_tags.clone().unwrap_or_default(),
        config,
        layers,
        format: "docker",
    })
}
