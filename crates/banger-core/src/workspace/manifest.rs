//! What a workspace held at its last sync, and what changed since: stat
//! decides, and a file whose stat changed but whose size and mode did not is
//! hashed, so a touched or rewritten-identical file is not sent again.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::scan::{Found, Kind, Listing};
use super::WorkspaceError;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub found: Found,
    /// The content's sha256, once a sync has had reason to read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// What a sync sends: paths to write (files and links) and paths to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Bytes of the changed files' content.
    pub bytes: u64,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Compares what `dir` holds now (`listing`) with the last sync's manifest:
/// the delta to send, and the manifest once it is sent.
pub fn compare(
    old: &Manifest,
    listing: Listing,
    dir: &Path,
) -> Result<(Delta, Manifest), WorkspaceError> {
    let mut delta = Delta::default();
    let mut next = Manifest::default();
    for found in listing.found {
        let before = old.entries.get(&found.path);
        let (changed, hash) = match before {
            None => (true, None),
            Some(b) if b.found == found => (false, b.hash.clone()),
            Some(b) if same_shape(&b.found, &found) && b.hash.is_some() => {
                let hash = hash_file(&dir.join(&found.path))?;
                (Some(&hash) != b.hash.as_ref(), Some(hash))
            }
            Some(_) if found.kind == Kind::File => (true, Some(hash_file(&dir.join(&found.path))?)),
            Some(_) => (true, None),
        };
        if changed {
            delta.changed.push(found.path.clone());
            if found.kind == Kind::File {
                delta.bytes += found.size;
            }
        }
        next.entries
            .insert(found.path.clone(), Entry { found, hash });
    }
    delta.removed = old
        .entries
        .keys()
        .filter(|p| !next.entries.contains_key(*p))
        .cloned()
        .collect();
    Ok((delta, next))
}

/// Same kind, size, mode and target: only the content can differ.
fn same_shape(a: &Found, b: &Found) -> bool {
    a.kind == Kind::File && b.kind == Kind::File && a.size == b.size && a.mode == b.mode
}

fn hash_file(path: &Path) -> Result<String, WorkspaceError> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace::scan::list;
    use banger_host::RealRunner;
    use std::os::unix::fs::PermissionsExt;

    fn sync(old: &Manifest, dir: &Path) -> (Delta, Manifest) {
        compare(old, list(dir, &RealRunner).unwrap(), dir).unwrap()
    }

    #[test]
    fn changes_are_found_by_stat_and_confirmed_by_content() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for name in ["a", "b", "c", "d"] {
            std::fs::write(dir.join(name), format!("{name}{name}")).unwrap();
        }
        let (first, manifest) = sync(&Manifest::default(), dir);
        assert_eq!(first.changed, ["a", "b", "c", "d"]);
        assert_eq!(first.bytes, 8);
        let (nothing, manifest) = sync(&manifest, dir);
        assert!(nothing.is_empty(), "{nothing:?}");

        // Edited (new size), removed, mode changed, renamed, and a new file.
        std::fs::write(dir.join("a"), "longer").unwrap();
        std::fs::remove_file(dir.join("b")).unwrap();
        std::fs::set_permissions(dir.join("c"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(dir.join("d"), dir.join("e")).unwrap();
        let (delta, manifest) = sync(&manifest, dir);
        assert_eq!(delta.changed, ["a", "c", "e"]);
        assert_eq!(delta.removed, ["b", "d"]);

        // Rewritten with the same bytes: stat differs, content does not. The
        // first time its hash is taken (nothing to compare with yet); after
        // that an identical rewrite is not sent.
        let touch = |manifest: &Manifest, data: &str| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            std::fs::write(dir.join("e"), data).unwrap();
            sync(manifest, dir)
        };
        let (_, manifest) = touch(&manifest, "dd");
        assert!(manifest.entries["e"].hash.is_some());
        let (same, manifest) = touch(&manifest, "dd");
        assert!(same.is_empty(), "{same:?}");
        let (other, _) = touch(&manifest, "DD");
        assert_eq!(other.changed, ["e"]);
    }

    #[test]
    fn a_manifest_survives_serialisation() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), "x").unwrap();
        std::os::unix::fs::symlink("f", tmp.path().join("l")).unwrap();
        let (_, manifest) = sync(&Manifest::default(), tmp.path());
        let text = serde_json::to_string(&manifest).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), manifest);
    }
}
