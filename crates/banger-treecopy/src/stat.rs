//! A tree as `lstat` sees it, for the guest side of a workspace: what the
//! host compares with its last sync to find the guest's own changes. The
//! change time is what tells: every write, chmod or rename sets it, and
//! nothing can set it back.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatKind {
    File,
    Symlink,
    /// A socket, FIFO or device: never synced.
    Other,
}

/// One path under the listed directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    /// Relative, `/`-separated.
    pub path: String,
    pub kind: StatKind,
    pub size: u64,
    /// Seconds: what a tar entry carries.
    pub mtime: i64,
    pub mode: u32,
    pub ctime_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Bytes the file takes on its disk (less than `size` when sparse):
    /// what a pull of it needs on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<u64>,
}

impl Stat {
    /// Room a copy of it takes: its allocation, never above its size.
    pub fn room(&self) -> u64 {
        self.allocated.map_or(self.size, |a| a.min(self.size))
    }

    pub fn of(path: String, meta: &std::fs::Metadata, full: &Path) -> Stat {
        let kind = if meta.file_type().is_symlink() {
            StatKind::Symlink
        } else if meta.is_file() {
            StatKind::File
        } else {
            StatKind::Other
        };
        let target = (kind == StatKind::Symlink)
            .then(|| std::fs::read_link(full).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned());
        Stat {
            path,
            kind,
            size: meta.len(),
            mtime: meta.mtime(),
            mode: meta.mode() & 0o7777,
            ctime_ns: ctime_ns(meta),
            target,
            allocated: Some(meta.blocks() * 512),
        }
    }
}

pub fn ctime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.ctime() * 1_000_000_000 + meta.ctime_nsec()
}

/// Every file, symlink and special file under `dir` (directories are walked,
/// not listed; links are not followed), sorted by path. A missing `dir` is
/// an empty tree.
pub fn list(dir: &Path) -> std::io::Result<Vec<Stat>> {
    let mut out = Vec::new();
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => walk(dir, "", &mut out)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a directory", dir.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<Stat>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = crate::names::encode(entry.file_name().as_bytes());
        let rel = format!("{prefix}{name}");
        let full = entry.path();
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // Gone meanwhile.
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            walk(&full, &format!("{rel}/"), out)?;
        } else {
            out.push(Stat::of(rel, &meta, &full));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_names_files_links_and_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/f"), "12345").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("x")).unwrap();
        let listed = list(dir).unwrap();
        let paths: Vec<_> = listed.iter().map(|s| (s.path.as_str(), s.kind)).collect();
        assert_eq!(paths, [("a/b/f", StatKind::File), ("x", StatKind::Symlink)]);
        assert_eq!(listed[0].size, 5);
        assert_eq!(listed[1].target.as_deref(), Some("/etc"));
        assert!(list(&dir.join("missing")).unwrap().is_empty());

        // Any change moves the change time, even one that keeps size and mtime.
        let before = listed[0].clone();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("a/b/f"), "54321").unwrap();
        let t = filetime_of(&dir.join("a/b/f"));
        assert!(t >= before.mtime);
        assert_ne!(list(dir).unwrap()[0].ctime_ns, before.ctime_ns);
    }

    fn filetime_of(p: &Path) -> i64 {
        std::fs::metadata(p).unwrap().mtime()
    }
}
