//! The manifest's file in the VM's directory, for after a daemon restart:
//! syncs use the copy in memory, so the file is written in the background,
//! off the exec's path, newest last, and flushed when the VM stops.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::workspace::manifest::Manifest;

#[derive(Default)]
pub struct ManifestFiles {
    slots: Mutex<HashMap<String, Arc<Mutex<Slot>>>>,
    versions: AtomicU64,
}

struct Slot {
    path: PathBuf,
    /// The newest manifest not yet written, and its version.
    latest: Option<(u64, Arc<Manifest>)>,
    written: u64,
}

impl ManifestFiles {
    /// Writes `manifest` to `path` soon.
    pub fn save(&self, key: &str, path: PathBuf, manifest: Arc<Manifest>) {
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Slot {
                    path: path.clone(),
                    latest: None,
                    written: 0,
                }))
            })
            .clone();
        {
            let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
            s.path = path;
            s.latest = Some((version, manifest));
        }
        tokio::task::spawn_blocking(move || write_latest(&slot));
    }

    /// Writes what is pending for `key` now, and forgets it.
    pub async fn flush(&self, key: &str) {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if let Some(slot) = slot {
            let _ = tokio::task::spawn_blocking(move || write_latest(&slot)).await;
        }
    }
}

fn write_latest(slot: &Mutex<Slot>) {
    let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
    let Some((version, manifest)) = s.latest.take() else {
        return;
    };
    if version <= s.written {
        return;
    }
    match write(&s.path, &manifest) {
        Ok(()) => s.written = version,
        Err(e) => {
            tracing::warn!(path = %s.path.display(), error = %e, "writing the workspace manifest")
        }
    }
}

fn write(path: &Path, manifest: &Manifest) -> std::io::Result<()> {
    let text = serde_json::to_vec(manifest).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_newest_manifest_is_the_one_on_disk_after_a_flush() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("workspace.json");
        let files = ManifestFiles::default();
        for n in 0..20 {
            let mut m = Manifest::default();
            m.entries.insert(
                format!("f{n}"),
                crate::workspace::manifest::Entry::new(crate::workspace::scan::Found {
                    path: format!("f{n}"),
                    kind: crate::workspace::scan::Kind::File,
                    size: n,
                    mtime_ns: 0,
                    mode: 0o644,
                    ino: 1,
                    target: None,
                }),
            );
            files.save("vm@1", path.clone(), Arc::new(m));
        }
        files.flush("vm@1").await;
        let read: Manifest = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(read.entries.keys().collect::<Vec<_>>(), ["f19"]);
    }
}
