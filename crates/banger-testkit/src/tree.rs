//! Snapshots of a directory tree, for comparing two unpackings of one image.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub sha256: String,
    pub target: String,
    pub rdev: u64,
    /// The first path (in sorted order) sharing this node's inode, if not itself.
    pub hardlink_of: Option<String>,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Every path under `root` except `lost+found`, keyed by its relative path.
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut paths = Vec::new();
    walk(root, root, &mut paths);
    paths.sort();
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    let mut out = BTreeMap::new();
    for rel in paths {
        let full = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let m = std::fs::symlink_metadata(&full).unwrap();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_file() {
            "file"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "other"
        };
        let mut hardlink_of = None;
        if !ft.is_dir() && m.nlink() > 1 {
            let first = inodes
                .entry((m.dev(), m.ino()))
                .or_insert_with(|| rel.clone());
            if *first != rel {
                hardlink_of = Some(first.clone());
            }
        }
        let xattrs = user_xattrs(&full);
        out.insert(
            rel.clone(),
            Node {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if ft.is_file() { m.len() } else { 0 },
                sha256: if ft.is_file() {
                    hex::encode(Sha256::digest(std::fs::read(&full).unwrap()))
                } else {
                    String::new()
                },
                target: if ft.is_symlink() {
                    std::fs::read_link(&full).unwrap().display().to_string()
                } else {
                    String::new()
                },
                rdev: if ft.is_char_device() || ft.is_block_device() {
                    m.rdev()
                } else {
                    0
                },
                hardlink_of,
                xattrs,
            },
        );
    }
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let rel = dir.strip_prefix(root).unwrap().display().to_string();
    out.push(rel.clone());
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if rel.is_empty() && name == "lost+found" {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            walk(root, &e.path(), out);
        } else {
            out.push(if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            });
        }
    }
}

fn user_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let out = Command::new("getfattr")
        .args(["-h", "-d", "-m", "^user\\.", "-e", "hex"])
        .arg(path)
        .output();
    let Ok(out) = out else { return vec![] };
    let mut v: Vec<(String, Vec<u8>)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, val)| {
            (
                k.to_string(),
                hex::decode(val.trim_start_matches("0x")).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Human-readable differences between two snapshots (empty when equal).
pub fn diff(a: &BTreeMap<String, Node>, b: &BTreeMap<String, Node>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            None => out.push(format!("only in first: {k}")),
            Some(vb) if va != vb => out.push(format!("{k}: {va:?} != {vb:?}")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push(format!("only in second: {k}"));
        }
    }
    out
}

/// A read-only loop mount, unmounted when dropped.
pub struct LoopMount {
    pub dir: tempfile::TempDir,
}

impl LoopMount {
    pub fn new(image: &Path) -> LoopMount {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(image)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopMount { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
