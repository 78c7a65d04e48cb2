//! What `system install` changed on a machine, kept beside it so that
//! `system uninstall` undoes exactly that: files it wrote, directories it
//! made, the group it created or the membership it added. Files it found
//! there (a package's binaries used in place) are never listed, so never
//! removed.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::units::MANIFEST;

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Paths relative to the root.
    pub files: BTreeSet<String>,
    /// Directories that did not exist before, relative to the root.
    pub dirs: BTreeSet<String>,
    pub group_created: bool,
    /// The user added to an existing group.
    pub added_to_group: Option<String>,
}

impl Manifest {
    /// The manifest under `root`, or `None` when there is none (nothing was
    /// installed, or an install from before manifests).
    pub fn load(root: &Path) -> anyhow::Result<Option<Manifest>> {
        let path = root.join(MANIFEST);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Written before each change it lists, so an install that stops half
    /// way is still undone whole.
    pub fn save(&mut self, root: &Path) -> anyhow::Result<()> {
        let path = root.join(MANIFEST);
        self.note_dirs(root, MANIFEST);
        let dir = path.parent().context("manifest path")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Records `rel` as written by the install, with the directories that
    /// writing it will create.
    pub fn note_file(&mut self, root: &Path, rel: &str) {
        self.note_dirs(root, rel);
        self.files.insert(rel.to_string());
    }

    fn note_dirs(&mut self, root: &Path, rel: &str) {
        let mut dir = Path::new(rel).parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if root.join(d).exists() {
                break;
            }
            self.dirs.insert(d.to_string_lossy().into_owned());
            dir = d.parent();
        }
    }

    /// Removes the listed files, then the manifest, then the listed
    /// directories that are empty (deepest first); returns what it removed.
    pub fn remove_files(&self, root: &Path) -> anyhow::Result<Vec<String>> {
        let mut done = Vec::new();
        for rel in self.files.iter().map(String::as_str).chain([MANIFEST]) {
            let path = root.join(rel);
            match std::fs::remove_file(&path) {
                Ok(()) if rel != MANIFEST => done.push(format!("removed {}", path.display())),
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
        let mut dirs: Vec<&String> = self.dirs.iter().collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(Path::new(d).components().count()));
        for rel in dirs {
            // A directory something else has since put files in stays.
            let _ = std::fs::remove_dir(root.join(rel));
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_the_directories_it_creates_and_removes_only_those_left_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
        let mut m = Manifest::default();
        m.note_file(root, "usr/local/bin/banger");
        m.note_file(root, "usr/local/lib/banger/banger-agent");
        assert_eq!(
            m.dirs.iter().collect::<Vec<_>>(),
            ["usr/local/lib", "usr/local/lib/banger"]
        );
        m.save(root).unwrap();
        for f in &m.files {
            std::fs::create_dir_all(root.join(f).parent().unwrap()).unwrap();
            std::fs::write(root.join(f), b"x").unwrap();
        }
        std::fs::write(root.join("usr/local/lib/other"), b"not ours").unwrap();
        let loaded = Manifest::load(root).unwrap().unwrap();
        assert_eq!(loaded, m);
        assert_eq!(loaded.remove_files(root).unwrap().len(), 2);
        assert!(!root.join("usr/local/lib/banger").exists());
        assert!(root.join("usr/local/lib/other").exists());
        assert!(root.join("usr/local/bin").is_dir(), "it was there before");
        assert!(
            !root.join("var").exists(),
            "the manifest's own directories go"
        );
        assert!(Manifest::load(root).unwrap().is_none());
    }
}
