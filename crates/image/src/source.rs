//! Where an image is read from: a directory (an OCI layout, or a `docker
//! save` archive unpacked), or the tar of one, read in place (its entries
//! indexed once, each blob then read by seeking: nothing is extracted
//! first).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::unpack::components;
use crate::ImageError;

/// Entries an archive's outer tar may have.
const MAX_OUTER_ENTRIES: usize = 100_000;

pub enum Source {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        /// normalised name -> (offset, size) of each regular file
        files: HashMap<String, (u64, u64)>,
        /// normalised name -> symlink target (docker save links layers)
        links: HashMap<String, String>,
    },
}

fn norm(raw: &[u8]) -> Result<String, ImageError> {
    let comps = components(raw)?;
    let parts: Vec<String> = comps
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    Ok(parts.join("/"))
}

impl Source {
    pub fn open(path: &Path) -> Result<Source, ImageError> {
        let md = std::fs::metadata(path)
            .map_err(|e| ImageError::BadArchive(format!("{}: {e}", path.display())))?;
        if md.is_dir() {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        let mut f = File::open(path)
            .map_err(|e| ImageError::BadArchive(format!("{}: {e}", path.display())))?;
        let mut magic = [0u8; 2];
        let n = f.read(&mut magic).unwrap_or(0);
        if n == 2 && magic == [0x1f, 0x8b] {
            return Err(ImageError::BadArchive(format!(
                "{} is compressed: give the tar itself (gunzip it first), or its directory",
                path.display()
            )));
        }
        f.seek(SeekFrom::Start(0))
            .map_err(|e| ImageError::Io(format!("{}: {e}", path.display())))?;
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        let mut a = tar::Archive::new(f);
        let entries = a
            .entries()
            .map_err(|e| ImageError::BadArchive(format!("{}: not a tar ({e})", path.display())))?;
        for (i, e) in entries.enumerate() {
            if i >= MAX_OUTER_ENTRIES {
                return Err(ImageError::BadArchive(format!(
                    "{} has more than {MAX_OUTER_ENTRIES} entries: not an image archive",
                    path.display()
                )));
            }
            let e = e.map_err(|e| ImageError::BadArchive(format!("{}: {e}", path.display())))?;
            let name = norm(&e.path_bytes())?;
            match e.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    files.insert(name, (e.raw_file_position(), e.size()));
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    if let Some(t) = e.link_name_bytes() {
                        links.insert(name, String::from_utf8_lossy(&t).into_owned());
                    }
                }
                _ => {}
            }
        }
        Ok(Source::Tar {
            path: path.to_path_buf(),
            files,
            links,
        })
    }

    /// Does the archive hold `name`?
    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(d) => norm(name.as_bytes()).is_ok_and(|n| d.join(n).is_file()),
            Source::Tar { .. } => self.locate(name).is_ok(),
        }
    }

    fn locate(&self, name: &str) -> Result<(u64, u64), ImageError> {
        let Source::Tar { files, links, .. } = self else {
            return Err(ImageError::Io("not a tar".into()));
        };
        let mut n = norm(name.as_bytes())?;
        // a few hops of links inside the archive (docker save shares
        // layers between images this way)
        for _ in 0..8 {
            if let Some(at) = files.get(&n) {
                return Ok(*at);
            }
            let Some(t) = links.get(&n) else { break };
            n = if t.starts_with('/') {
                norm(t.as_bytes())?
            } else {
                let dir = n.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                norm(format!("{dir}/{t}").as_bytes())?
            };
        }
        Err(ImageError::BadArchive(format!("the archive has no {name}")))
    }

    /// The file `name` and its size.
    pub fn read(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        match self {
            Source::Dir(d) => {
                let p = d.join(norm(name.as_bytes())?);
                let f = File::open(&p)
                    .map_err(|e| ImageError::BadArchive(format!("{}: {e}", p.display())))?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                Ok((Box::new(f), len))
            }
            Source::Tar { path, .. } => {
                let (off, len) = self.locate(name)?;
                let mut f = File::open(path)
                    .map_err(|e| ImageError::Io(format!("{}: {e}", path.display())))?;
                f.seek(SeekFrom::Start(off))
                    .map_err(|e| ImageError::Io(format!("{}: {e}", path.display())))?;
                Ok((Box::new(f.take(len)), len))
            }
        }
    }

    /// The whole of a small file (JSON), at most `max` bytes.
    pub fn read_small(&self, name: &str, max: u64) -> Result<Vec<u8>, ImageError> {
        let (r, len) = self.read(name)?;
        if len > max {
            return Err(ImageError::BadArchive(format!(
                "{name} is {len} bytes; at most {max} for an image's JSON"
            )));
        }
        let mut v = Vec::new();
        r.take(max + 1)
            .read_to_end(&mut v)
            .map_err(|e| ImageError::Io(format!("{name}: {e}")))?;
        Ok(v)
    }
}
