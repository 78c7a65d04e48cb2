//! What each path of the flattened tree must look like in the final ext4, kept
//! apart from the staging files (which belong to the daemon's user and carry
//! relaxed modes) so that ownership survives an unprivileged daemon.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFIFO: u32 = 0o010000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    /// Full `st_mode`: file type bits and permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    /// `(major, minor)` for character and block devices.
    pub rdev: Option<(u32, u32)>,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

impl Meta {
    pub fn dir_default() -> Meta {
        Meta {
            uid: 0,
            gid: 0,
            mode: S_IFDIR | 0o755,
            rdev: None,
            xattrs: Vec::new(),
            mtime: 0,
        }
    }

    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }

    pub fn is_device(&self) -> bool {
        matches!(self.file_type(), S_IFCHR | S_IFBLK)
    }
}

/// Desired metadata by path relative to the root (the root itself is `""`).
#[derive(Debug, Default)]
pub struct MetaTable {
    entries: BTreeMap<PathBuf, Meta>,
}

impl MetaTable {
    pub fn set(&mut self, path: PathBuf, meta: Meta) {
        self.entries.insert(path, meta);
    }

    pub fn get(&self, path: &Path) -> Option<&Meta> {
        self.entries.get(path)
    }

    /// Forgets `path` and everything below it.
    pub fn remove_tree(&mut self, path: &Path) {
        if path.as_os_str().is_empty() {
            let root = self.entries.remove(path);
            self.entries.clear();
            if let Some(root) = root {
                self.entries.insert(PathBuf::new(), root);
            }
            return;
        }
        let doomed: Vec<PathBuf> = self
            .entries
            .range(path.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(path))
            .map(|(p, _)| p.clone())
            .collect();
        for p in doomed {
            self.entries.remove(&p);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PathBuf, &Meta)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_tree_takes_descendants_but_not_siblings_with_a_common_prefix() {
        let mut t = MetaTable::default();
        for p in ["", "a", "a/b", "a/b/c", "ab", "a-b"] {
            t.set(PathBuf::from(p), Meta::dir_default());
        }
        t.remove_tree(Path::new("a"));
        let left: Vec<_> = t
            .iter()
            .map(|(p, _)| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["", "a-b", "ab"]);
    }
}
