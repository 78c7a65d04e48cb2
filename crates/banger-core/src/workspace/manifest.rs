//! What a workspace held at its last sync, and what changed since on each
//! side. On the host stat decides, and a file whose stat changed but whose
//! size and mode did not is hashed, so a touched or rewritten-identical file
//! is not sent again; in the guest, a change time other than the one the
//! sync left says the guest wrote the file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use banger_treecopy::stat::{Stat, StatKind};

use super::scan::{Found, Kind, Listing};
use super::WorkspaceError;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: BTreeMap<String, Entry>,
}

impl Manifest {
    /// The paths of the manifest not among `seen`: gone since the last sync.
    fn unseen(&self, seen: &std::collections::HashSet<String>) -> Vec<String> {
        self.entries
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect()
    }
}

/// One path as both sides last agreed on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The host file.
    #[serde(flatten)]
    pub found: Found,
    /// The content's sha256, once a sync has had reason to read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// The guest copy's change time (ns) when it was written or last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ctime: Option<i64>,
}

impl Entry {
    pub fn new(found: Found) -> Entry {
        Entry {
            found,
            hash: None,
            guest_ctime: None,
        }
    }
}

/// What changed on the host since the last sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostDelta {
    /// The host's entries now, for paths to send.
    pub changed: Vec<Entry>,
    pub removed: Vec<String>,
    /// Entries whose stat moved but whose content did not: recorded, not sent.
    pub refreshed: Vec<Entry>,
    /// Bytes of the changed files' content.
    pub bytes: u64,
}

impl HostDelta {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }

    /// Every path that changed, in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.changed
            .iter()
            .map(|e| e.found.path.as_str())
            .chain(self.removed.iter().map(String::as_str))
    }
}

/// What the guest changed since the last sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestDelta {
    pub changed: Vec<Stat>,
    pub removed: Vec<String>,
}

impl GuestDelta {
    pub fn len(&self) -> usize {
        self.changed.len() + self.removed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Compares what `dir` holds now (`listing`) with the last sync's manifest.
pub fn host_changes(
    old: &Manifest,
    listing: Listing,
    dir: &Path,
) -> Result<HostDelta, WorkspaceError> {
    let mut delta = HostDelta::default();
    let mut seen = std::collections::HashSet::with_capacity(listing.found.len());
    for found in listing.found {
        seen.insert(found.path.clone());
        delta.consider(old, found, dir)?;
    }
    delta.removed = old.unseen(&seen);
    Ok(delta)
}

/// [`host_changes`] from the paths a watcher saw change, without listing
/// the tree: each is stat-ed; a path new to the manifest counts only if
/// `wanted` (the listing's rules) takes it.
pub fn host_changes_at(
    old: &Manifest,
    paths: &std::collections::BTreeSet<String>,
    dir: &Path,
    wanted: impl FnOnce(&[String]) -> std::collections::HashSet<String>,
) -> Result<HostDelta, WorkspaceError> {
    let mut delta = HostDelta::default();
    let mut new = Vec::new();
    for path in paths {
        match (
            super::scan::stat(dir, path)?,
            old.entries.contains_key(path),
        ) {
            (Some(found), true) => delta.consider(old, found, dir)?,
            (Some(found), false) => new.push(found),
            (None, true) => delta.removed.push(path.clone()),
            (None, false) => {} // Made and gone between two syncs.
        }
    }
    if !new.is_empty() {
        let names: Vec<String> = new.iter().map(|f| f.path.clone()).collect();
        let taken = wanted(&names);
        for found in new.into_iter().filter(|f| taken.contains(&f.path)) {
            delta.consider(old, found, dir)?;
        }
    }
    Ok(delta)
}

impl HostDelta {
    /// Sorts `found` (the host file now) against its last-sync entry.
    fn consider(&mut self, old: &Manifest, found: Found, dir: &Path) -> Result<(), WorkspaceError> {
        let before = old.entries.get(&found.path);
        let mut entry = Entry {
            guest_ctime: before.and_then(|b| b.guest_ctime),
            ..Entry::new(found)
        };
        let changed = match before {
            None => true,
            Some(b) if b.found == entry.found => false,
            Some(b) if same_shape(&b.found, &entry.found) && b.hash.is_some() => {
                let hash = hash_file(&dir.join(banger_treecopy::names::decode(&entry.found.path)))?;
                let changed = Some(&hash) != b.hash.as_ref();
                entry.hash = Some(hash);
                changed
            }
            Some(_) => {
                if entry.found.kind == Kind::File {
                    entry.hash = Some(hash_file(
                        &dir.join(banger_treecopy::names::decode(&entry.found.path)),
                    )?);
                }
                true
            }
        };
        if changed {
            if entry.found.kind == Kind::File {
                self.bytes += entry.found.size;
            }
            self.changed.push(entry);
        } else if before.is_some_and(|b| *b != entry) {
            self.refreshed.push(entry);
        }
        Ok(())
    }
}

/// Compares the guest's tree (`listed`, from `banger-tar list`) with the
/// last sync's manifest. A path the manifest does not know is the guest's
/// only if `wanted` says a sync would take it from the host too.
pub fn guest_changes(
    old: &Manifest,
    listed: Vec<Stat>,
    wanted: impl Fn(&str) -> bool,
) -> GuestDelta {
    let mut delta = GuestDelta::default();
    let mut seen = std::collections::HashSet::with_capacity(listed.len());
    for stat in listed {
        if stat.kind == StatKind::Other {
            continue;
        }
        seen.insert(stat.path.clone());
        let changed = match old.entries.get(&stat.path) {
            Some(e) => match e.guest_ctime {
                Some(ctime) => ctime != stat.ctime_ns,
                // Synced before change times were kept: what tar carries.
                None => !same_as_synced(&e.found, &stat),
            },
            None => wanted(&stat.path),
        };
        if changed {
            delta.changed.push(stat);
        }
    }
    delta.removed = old.unseen(&seen);
    delta
}

fn same_as_synced(host: &Found, guest: &Stat) -> bool {
    let kind = match guest.kind {
        StatKind::File => Kind::File,
        StatKind::Symlink => Kind::Symlink,
        StatKind::Other => return false,
    };
    host.kind == kind
        && host.mode == guest.mode
        && host.target == guest.target
        && (kind == Kind::Symlink
            || (host.size == guest.size && host.mtime_ns.div_euclid(1_000_000_000) == guest.mtime))
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

    /// A sync that the guest applied in full.
    fn sync(old: &Manifest, dir: &Path) -> (Delta, Manifest) {
        let delta = host_changes(old, list(dir, &RealRunner).unwrap(), dir).unwrap();
        let mut next = old.clone();
        for entry in delta.changed.iter().chain(&delta.refreshed) {
            next.entries.insert(entry.found.path.clone(), entry.clone());
        }
        for path in &delta.removed {
            next.entries.remove(path);
        }
        let changed = delta.changed.iter().map(|e| e.found.path.clone()).collect();
        let shown = Delta {
            changed,
            removed: delta.removed.clone(),
            bytes: delta.bytes,
        };
        (shown, next)
    }

    #[derive(Debug)]
    struct Delta {
        changed: Vec<String>,
        removed: Vec<String>,
        bytes: u64,
    }

    impl Delta {
        fn is_empty(&self) -> bool {
            self.changed.is_empty() && self.removed.is_empty()
        }
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

#[cfg(test)]
mod guest_tests {
    use super::*;

    fn stat(path: &str, ctime_ns: i64) -> Stat {
        Stat {
            path: path.into(),
            kind: StatKind::File,
            size: 1,
            mtime: 7,
            mode: 0o644,
            ctime_ns,
            target: None,
            allocated: None,
        }
    }

    fn entry(path: &str, guest_ctime: Option<i64>) -> Entry {
        Entry {
            guest_ctime,
            ..Entry::new(Found {
                path: path.into(),
                kind: Kind::File,
                size: 1,
                mtime_ns: 7_500_000_000,
                mode: 0o644,
                ino: 1,
                target: None,
            })
        }
    }

    #[test]
    fn the_guest_changed_what_its_change_time_says() {
        let mut old = Manifest::default();
        for (path, ctime) in [("same", Some(10)), ("edited", Some(10)), ("gone", Some(10))] {
            old.entries.insert(path.into(), entry(path, ctime));
        }
        // From before change times were kept: what tar carries decides.
        old.entries.insert("legacy".into(), entry("legacy", None));
        old.entries
            .insert("legacy-edit".into(), entry("legacy-edit", None));
        let mut edited = stat("legacy-edit", 1);
        edited.size = 2;
        let listed = vec![
            stat("same", 10),
            stat("edited", 11),
            stat("legacy", 99),
            edited,
            stat("new", 5),
            stat("target/ignored", 5),
            Stat {
                kind: StatKind::Other,
                ..stat("fifo", 5)
            },
        ];
        let delta = guest_changes(&old, listed, |p| !p.starts_with("target/"));
        let changed: Vec<_> = delta.changed.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(changed, ["edited", "legacy-edit", "new"]);
        assert_eq!(delta.removed, ["gone"]);
    }
}
