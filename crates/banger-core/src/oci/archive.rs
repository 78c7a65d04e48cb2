//! Images on disk instead of in a registry: an OCI layout directory, an
//! OCI archive (that layout as a tar) or a docker archive (`docker save`,
//! `podman save`). What is read is planned here: which manifest, its
//! config, its layers in order; nothing is unpacked. A tar is indexed once
//! (names → where each file's bytes are) and read from those offsets, so a
//! layer goes straight from the archive into the blob cache. Names in an
//! archive are only ever looked up, never joined to a host path, and blobs
//! are found by validated digest; every byte read is checked against the
//! digest that names it (docker's layer files, which no digest names, are
//! hashed as they are copied).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::manifest::{self, Descriptor, Parsed};
use super::reference::Platform;
use super::{digest, ContentError};

/// The most a JSON file of an archive may take (manifests, configs).
const MAX_JSON_BYTES: u64 = 16 << 20;
/// Symlinks followed inside a tar before giving up.
const MAX_LINKS: usize = 8;

/// Where an archive's files are.
pub enum Source {
    /// An OCI layout directory.
    Dir(PathBuf),
    /// A tar file: each regular file's data offset and size, each link's target.
    Tar {
        path: PathBuf,
        entries: HashMap<String, TarEntry>,
    },
}

#[derive(Debug, Clone)]
pub enum TarEntry {
    File { offset: u64, size: u64 },
    Link(String),
}

/// One layer to take, bottom first.
#[derive(Debug, Clone)]
pub struct PlannedLayer {
    /// Where it is in the source.
    pub name: String,
    /// The digest that names it (OCI), or none (a docker archive's
    /// `layer.tar`, hashed as it is copied).
    pub digest: Option<String>,
    pub media_type: String,
    pub size: u64,
}

/// What an import takes from a source.
#[derive(Debug)]
pub struct Plan {
    /// `docker-archive`, `oci-archive` or `oci-layout`.
    pub format: &'static str,
    /// The manifest's digest (OCI), or the config's (docker: the image id).
    pub digest: String,
    pub config: Vec<u8>,
    pub layers: Vec<PlannedLayer>,
    /// The references the source names the image by (RepoTags, or the
    /// layout's `org.opencontainers.image.ref.name`).
    pub tags: Vec<String>,
}

impl Source {
    pub fn open(path: &Path) -> Result<Source, ContentError> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut archive = tar::Archive::new(file);
        let mut entries = HashMap::new();
        let listed = archive
            .entries()
            .map_err(|e| format!("{} is not a tar archive: {e}", path.display()))?;
        for entry in listed {
            let entry =
                entry.map_err(|e| format!("{} is not a tar archive ({e})", path.display()))?;
            let Ok(name) = entry.path().map(|p| normalise(&p.to_string_lossy())) else {
                continue;
            };
            let header = entry.header();
            let kind = header.entry_type();
            let found = if kind.is_file() {
                TarEntry::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                }
            } else if kind.is_symlink() || kind.is_hard_link() {
                let Ok(Some(target)) = entry.link_name() else {
                    continue;
                };
                let target = target.to_string_lossy().into_owned();
                // A symlink is relative to its directory; a hard link names
                // an entry of the archive.
                TarEntry::Link(if kind.is_symlink() {
                    relative_to(&name, &target)
                } else {
                    normalise(&target)
                })
            } else {
                continue;
            };
            entries.insert(name, found);
        }
        if entries.is_empty() {
            return Err(format!("{} is not a tar archive (no files in it)", path.display()).into());
        }
        Ok(Source::Tar {
            path: path.to_path_buf(),
            entries,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(dir) => safe_join(dir, name).is_some_and(|p| p.is_file()),
            Source::Tar { .. } => self.locate(name).is_ok(),
        }
    }

    /// A file of the source: a reader over exactly its bytes, and its size.
    pub fn open_file(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64), ContentError> {
        match self {
            Source::Dir(dir) => {
                let path = safe_join(dir, name)
                    .ok_or_else(|| format!("`{name}` is not a path inside the layout"))?;
                // Never through a symlink out of the layout.
                let file = open_nofollow(&path).map_err(|e| format!("{name}: {e}"))?;
                let size = file.metadata().map_err(|e| e.to_string())?.len();
                Ok((Box::new(file), size))
            }
            Source::Tar { path, .. } => {
                let (offset, size) = self.locate(name)?;
                let mut file = File::open(path).map_err(|e| e.to_string())?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| e.to_string())?;
                Ok((Box::new(file.take(size)), size))
            }
        }
    }

    fn locate(&self, name: &str) -> Result<(u64, u64), ContentError> {
        let Source::Tar { entries, .. } = self else {
            unreachable!("only tars are indexed")
        };
        let mut name = normalise(name);
        for _ in 0..MAX_LINKS {
            match entries.get(&name) {
                Some(TarEntry::File { offset, size }) => return Ok((*offset, *size)),
                Some(TarEntry::Link(target)) => name = target.clone(),
                None => return Err(format!("the archive has no `{name}`").into()),
            }
        }
        Err(format!("`{name}`: too many links").into())
    }

    /// A small file (JSON), whole.
    pub fn read_small(&self, name: &str) -> Result<Vec<u8>, ContentError> {
        let (reader, size) = self.open_file(name)?;
        if size > MAX_JSON_BYTES {
            return Err(format!("`{name}` is implausibly large ({size} bytes)").into());
        }
        let mut bytes = Vec::with_capacity(size as usize);
        reader
            .take(MAX_JSON_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading `{name}`: {e}"))?;
        Ok(bytes)
    }

    /// A blob named by its digest, checked against it.
    fn blob(&self, digest: &str) -> Result<Vec<u8>, ContentError> {
        let bytes = self.read_small(&blob_name(digest)?)?;
        if digest::sha256_of(&bytes) != digest {
            return Err(format!("blob {digest} does not match its digest").into());
        }
        Ok(bytes)
    }

    /// Which image to take, and from where.
    pub fn plan(&self, platform: &Platform) -> Result<Plan, ContentError> {
        if self.has("manifest.json") && !self.has("index.json") {
            return self.plan_docker();
        }
        if self.has("index.json") {
            // `docker save` since 25 writes both; its index is the OCI one.
            let format = match self {
                Source::Dir(_) => "oci-layout",
                Source::Tar { .. } if self.has("manifest.json") => "docker-archive",
                Source::Tar { .. } => "oci-archive",
            };
            return self.plan_oci(platform, format);
        }
        Err(
            "neither a docker archive (no manifest.json) nor an OCI layout (no index.json)"
                .to_string()
                .into(),
        )
    }

    fn plan_docker(&self) -> Result<Plan, ContentError> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            layers: Vec<String>,
        }
        let list: Vec<Entry> = serde_json::from_slice(&self.read_small("manifest.json")?)
            .map_err(|e| format!("unreadable manifest.json: {e}"))?;
        let entry = match list.as_slice() {
            [one] => one,
            [] => return Err("manifest.json lists no image".to_string().into()),
            many => {
                return Err(format!(
                    "the archive holds {} images; save one at a time (`docker save IMAGE`)",
                    many.len()
                )
                .into())
            }
        };
        let config = self.read_small(&entry.config)?;
        let layers = entry
            .layers
            .iter()
            .map(|name| {
                let (_, size) = self.open_file(name)?;
                Ok(PlannedLayer {
                    name: name.clone(),
                    digest: digest_of_blob_name(name),
                    media_type: String::new(),
                    size,
                })
            })
            .collect::<Result<Vec<_>, ContentError>>()?;
        Ok(Plan {
            format: "docker-archive",
            digest: digest::sha256_of(&config),
            config,
            layers,
            tags: entry.repo_tags.clone().unwrap_or_default(),
        })
    }

    fn plan_oci(&self, platform: &Platform, format: &'static str) -> Result<Plan, ContentError> {
        #[derive(serde::Deserialize)]
        struct Index {
            manifests: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Entry {
            #[serde(flatten)]
            desc: Descriptor,
            #[serde(default)]
            annotations: HashMap<String, String>,
        }
        let index: Index = serde_json::from_slice(&self.read_small("index.json")?)
            .map_err(|e| format!("unreadable index.json: {e}"))?;
        // A ref.name that is only a tag (`v1`) names no image.
        let tag_of = |e: &Entry| {
            e.annotations
                .get("io.containerd.image.name")
                .or_else(|| e.annotations.get("org.opencontainers.image.ref.name"))
                .filter(|t| t.contains('/') || t.contains(':'))
                .cloned()
        };
        let top: Vec<Descriptor> = index.manifests.iter().map(|e| e.desc.clone()).collect();
        let chosen = match index.manifests.as_slice() {
            [] => return Err("index.json lists no image".to_string().into()),
            [one] => one,
            _ => {
                let picked = manifest::select(&top, platform).ok_or_else(|| {
                    format!(
                        "the layout holds several images and none for {platform} (it has: {})",
                        manifest::available(&top)
                    )
                })?;
                index
                    .manifests
                    .iter()
                    .find(|e| e.desc.digest == picked.digest)
                    .expect("picked from these")
            }
        };
        let tags: Vec<String> = tag_of(chosen).into_iter().collect();
        let mut desc = chosen.desc.clone();
        let mut bytes = self.blob(&desc.digest)?;
        if let Parsed::Index(entries) = manifest::parse(&bytes)? {
            desc = manifest::select(&entries, platform)
                .ok_or_else(|| {
                    format!(
                        "the image has no variant for {platform} (it has: {})",
                        manifest::available(&entries)
                    )
                })?
                .clone();
            bytes = self.blob(&desc.digest)?;
        }
        let Parsed::Image { config, layers } = manifest::parse(&bytes)? else {
            return Err("an index of indexes, which banger does not follow"
                .to_string()
                .into());
        };
        let config_bytes = self.blob(&config.digest)?;
        let layers = layers
            .iter()
            .map(|l| {
                Ok(PlannedLayer {
                    name: blob_name(&l.digest)?,
                    digest: Some(l.digest.clone()),
                    media_type: l.media_type.clone(),
                    size: l.size.max(0) as u64,
                })
            })
            .collect::<Result<Vec<_>, ContentError>>()?;
        Ok(Plan {
            format,
            digest: desc.digest,
            config: config_bytes,
            layers,
            tags,
        })
    }
}

/// `blobs/sha256/<hex>` for a valid digest.
fn blob_name(d: &str) -> Result<String, ContentError> {
    Ok(format!("blobs/sha256/{}", digest::validate(d)?))
}

/// The digest a `blobs/sha256/<hex>` name stands for.
fn digest_of_blob_name(name: &str) -> Option<String> {
    let hex = normalise(name).strip_prefix("blobs/sha256/")?.to_string();
    let d = format!("sha256:{hex}");
    digest::validate(&d).ok()?;
    Some(d)
}

/// `./a//b/` → `a/b`; `..` stays (and so never matches a real entry).
fn normalise(name: &str) -> String {
    name.split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// A symlink's target, as a name in the archive, from the link's directory.
fn relative_to(link: &str, target: &str) -> String {
    if target.starts_with('/') {
        return normalise(target);
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    // Above the archive's root: a name nothing has.
                    return format!("../{target}");
                }
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// `dir/name` when `name` has no `..`, no root and no empty part.
fn safe_join(dir: &Path, name: &str) -> Option<PathBuf> {
    let clean = normalise(name);
    if clean.is_empty() || clean.split('/').any(|p| p == "..") || name.starts_with('/') {
        return None;
    }
    Some(dir.join(clean))
}

fn open_nofollow(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside() {
        assert_eq!(normalise("./blobs//sha256/x/"), "blobs/sha256/x");
        assert_eq!(relative_to("a/layer.tar", "../b/layer.tar"), "b/layer.tar");
        assert_eq!(
            relative_to("layer.tar", "../../etc/passwd"),
            "../../../etc/passwd"
        );
        assert!(safe_join(Path::new("/l"), "../x").is_none());
        assert!(safe_join(Path::new("/l"), "/etc/passwd").is_none());
        assert_eq!(
            safe_join(Path::new("/l"), "blobs/sha256/a"),
            Some(PathBuf::from("/l/blobs/sha256/a"))
        );
        let hex = "a".repeat(64);
        assert_eq!(
            digest_of_blob_name(&format!("blobs/sha256/{hex}")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(digest_of_blob_name("abc/layer.tar"), None);
        assert!(blob_name("sha256:../../x").is_err());
    }

    #[test]
    fn links_inside_a_tar_are_followed_a_few_times_only() {
        let mut entries = HashMap::new();
        entries.insert("a".to_string(), TarEntry::Link("b".into()));
        entries.insert("b".to_string(), TarEntry::Link("a".into()));
        entries.insert("c".to_string(), TarEntry::Link("d".into()));
        entries.insert(
            "d".to_string(),
            TarEntry::File {
                offset: 512,
                size: 3,
            },
        );
        let source = Source::Tar {
            path: PathBuf::from("/nonexistent"),
            entries,
        };
        assert!(source.locate("a").unwrap_err().contains("too many links"));
        assert_eq!(source.locate("./c").unwrap(), (512, 3));
        assert!(source.locate("e").is_err());
    }
}
