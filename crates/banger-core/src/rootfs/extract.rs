//! Applies image layers, in order, onto a staging directory with OCI semantics.
//!
//! Staging files belong to the daemon's user with modes relaxed so it can keep
//! writing; the true owner, mode, device numbers and xattrs of every path go to
//! the [`MetaTable`], which the ext4 step applies. Nothing here ever follows a
//! symlink out of the staging root or writes outside it.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::EntryType;

use super::meta::{Meta, MetaTable, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG};
use super::path_safety::{normalize_entry_path, resolve_dir_in_root};
use super::whiteout::{self, Marker};

/// A layer entry that could not be applied; `path` is the name in the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError {
    pub path: String,
    pub reason: String,
}

impl std::fmt::Display for EntryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "`{}`: {}", self.path, self.reason)
        }
    }
}

fn io_reason(e: io::Error) -> String {
    e.to_string()
}

pub struct Flattener {
    root: PathBuf,
    meta: MetaTable,
    /// Paths the layer being applied has created; whiteouts only hide lower layers.
    created_in_layer: HashSet<PathBuf>,
    limits: Limits,
    /// Uncompressed bytes of every layer applied so far.
    image_bytes: u64,
    /// A layer stopped because the staging filesystem reached `min_free`.
    out_of_room: bool,
}

/// How far a pull may expand (see `LimitsConfig`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub layer: u64,
    pub image: u64,
    /// Free space to keep on the staging filesystem.
    pub min_free: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            layer: u64::MAX,
            image: u64::MAX,
            min_free: 0,
        }
    }
}

/// How often the free space is looked at while a layer unpacks.
const FREE_SPACE_EVERY: u64 = 4 << 20;

/// Counts a layer's uncompressed bytes against the limits and watches the
/// free space as it goes: an error here stops the layer at once.
struct Budget<'a, R> {
    inner: R,
    root: &'a Path,
    limits: Limits,
    layer: u64,
    image: &'a mut u64,
    next_check: u64,
    out_of_room: &'a mut bool,
}

impl<R: Read> Read for Budget<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.layer += n as u64;
        *self.image += n as u64;
        if self.layer > self.limits.layer {
            return Err(io::Error::other(format!(
                "the layer expands past {} (limits.max_layer_bytes in the config file)",
                gib(self.limits.layer)
            )));
        }
        if *self.image > self.limits.image {
            return Err(io::Error::other(format!(
                "the image expands past {} (limits.max_image_bytes in the config file)",
                gib(self.limits.image)
            )));
        }
        if self.layer >= self.next_check {
            self.next_check = self.layer + FREE_SPACE_EVERY;
            if let Some(free) = free_bytes(self.root) {
                if free < self.limits.min_free {
                    *self.out_of_room = true;
                    return Err(io::Error::other(format!(
                        "only {} MiB left on the filesystem holding {}; free space (or `banger image cache prune`) and pull again",
                        free >> 20,
                        self.root.display()
                    )));
                }
            }
        }
        Ok(n)
    }
}

fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Bytes an unprivileged writer may still use under `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

impl Flattener {
    /// Starts a tree at `root`, which must not exist yet.
    pub fn new(root: &Path) -> io::Result<Flattener> {
        fs::create_dir(root)?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))?;
        let mut meta = MetaTable::default();
        meta.set(PathBuf::new(), Meta::dir_default());
        Ok(Flattener {
            root: root.to_path_buf(),
            meta,
            created_in_layer: HashSet::new(),
            limits: Limits::default(),
            image_bytes: 0,
            out_of_room: false,
        })
    }

    /// Bounds what the layers may expand to.
    pub fn with_limits(mut self, limits: Limits) -> Flattener {
        self.limits = limits;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the last layer stopped because its filesystem ran low.
    pub fn ran_out_of_room(&self) -> bool {
        self.out_of_room
    }

    /// Applies one uncompressed layer tar stream on top of the tree.
    pub fn apply_layer<R: Read>(&mut self, reader: R) -> Result<(), EntryError> {
        self.created_in_layer.clear();
        let root = self.root.clone();
        let mut image_bytes = self.image_bytes;
        let mut out_of_room = false;
        let result = self.apply_counted(Budget {
            inner: reader,
            root: &root,
            limits: self.limits,
            layer: 0,
            image: &mut image_bytes,
            next_check: 0,
            out_of_room: &mut out_of_room,
        });
        self.image_bytes = image_bytes;
        self.out_of_room = out_of_room;
        result
    }

    fn apply_counted<R: Read>(&mut self, reader: R) -> Result<(), EntryError> {
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| EntryError {
            path: String::new(),
            reason: format!("not a tar stream: {e}"),
        })?;
        for entry in entries {
            let mut entry = entry.map_err(|e| EntryError {
                path: String::new(),
                reason: format!("corrupt tar stream: {e}"),
            })?;
            let raw = entry.path_bytes().into_owned();
            let fail = |reason: String| EntryError {
                path: String::from_utf8_lossy(&raw).into_owned(),
                reason,
            };
            let rel = normalize_entry_path(&raw).map_err(|e| fail(e.into()))?;
            self.apply_entry(&mut entry, rel).map_err(fail)?;
        }
        Ok(())
    }

    /// Gives file times their final values (creating children moved directory
    /// mtimes) and hands back the metadata for the ext4 step.
    pub fn finish(self) -> Result<MetaTable, EntryError> {
        for (rel, meta) in self.meta.iter() {
            let full = self.root.join(rel);
            let time = nix::sys::time::TimeSpec::new(meta.mtime, 0);
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &full,
                &time,
                &time,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| EntryError {
                path: rel.to_string_lossy().into_owned(),
                reason: format!("setting times: {e}"),
            })?;
        }
        Ok(self.meta)
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: PathBuf,
    ) -> Result<(), String> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let mut meta = header_meta(entry)?;
        let Some(name) = rel.file_name().map(OsStr::to_os_string) else {
            // The root directory itself: only its metadata can change.
            if kind == EntryType::Directory {
                meta.mode = S_IFDIR | (meta.mode & 0o7777);
                self.meta.set(PathBuf::new(), meta);
            }
            return Ok(());
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));

        match whiteout::classify(&name)? {
            Marker::Opaque => {
                let parent = self.ensure_dir(parent_rel)?;
                return self.hide_lower(&parent);
            }
            Marker::Remove(target) => {
                let parent = resolve_dir_in_root(&self.root, parent_rel)?;
                let victim = parent.join(target);
                if !self.created_in_layer.contains(&victim) {
                    self.remove(&victim)?;
                }
                return Ok(());
            }
            Marker::None => {}
        }

        let parent = self.ensure_dir(parent_rel)?;
        let dest_rel = parent.join(&name);
        let dest = self.root.join(&dest_rel);
        match kind {
            EntryType::Directory => {
                meta.mode = S_IFDIR | (meta.mode & 0o7777);
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    _ => {
                        self.remove(&dest_rel)?;
                        fs::create_dir(&dest).map_err(io_reason)?;
                    }
                }
                fs::set_permissions(
                    &dest,
                    fs::Permissions::from_mode((meta.mode & 0o777) | 0o700),
                )
                .map_err(io_reason)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                meta.mode = S_IFREG | (meta.mode & 0o7777);
                self.remove(&dest_rel)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(io_reason)?;
                io::copy(entry, &mut file).map_err(|e| format!("reading file data: {e}"))?;
                fs::set_permissions(
                    &dest,
                    fs::Permissions::from_mode((meta.mode & 0o777) | 0o600),
                )
                .map_err(io_reason)?;
            }
            EntryType::Symlink => {
                meta.mode = S_IFLNK | 0o777;
                let target = entry
                    .link_name_bytes()
                    .ok_or("symlink without a target")?
                    .into_owned();
                if target.is_empty() || target.contains(&0) {
                    return Err("symlink target is empty or contains a NUL byte".into());
                }
                self.remove(&dest_rel)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest).map_err(io_reason)?;
            }
            EntryType::Link => {
                let raw = entry
                    .link_name_bytes()
                    .ok_or("hardlink without a target")?
                    .into_owned();
                let target_rel = normalize_entry_path(&raw).map_err(|why| {
                    format!("hardlink target `{}`: {why}", String::from_utf8_lossy(&raw))
                })?;
                let target_name = target_rel
                    .file_name()
                    .ok_or("hardlink to the image root")?
                    .to_os_string();
                let target_parent =
                    resolve_dir_in_root(&self.root, target_rel.parent().unwrap_or(Path::new("")))
                        .map_err(|why| format!("hardlink target: {why}"))?;
                let target_rel = target_parent.join(target_name);
                if target_rel == dest_rel {
                    return Ok(());
                }
                let target = self.root.join(&target_rel);
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => return Err("hardlink to a directory".into()),
                    Ok(_) => {}
                    Err(_) => {
                        return Err(format!(
                            "hardlink target `{}` does not exist in the image",
                            target_rel.display()
                        ))
                    }
                }
                // Both names share one inode, so they share its metadata.
                meta = self.meta.get(&target_rel).cloned().unwrap_or(meta);
                self.remove(&dest_rel)?;
                fs::hard_link(&target, &dest).map_err(io_reason)?;
            }
            EntryType::Char | EntryType::Block => {
                let kind_bits = if kind == EntryType::Char {
                    S_IFCHR
                } else {
                    S_IFBLK
                };
                meta.mode = kind_bits | (meta.mode & 0o7777);
                let major = entry
                    .header()
                    .device_major()
                    .map_err(io_reason)?
                    .unwrap_or(0);
                let minor = entry
                    .header()
                    .device_minor()
                    .map_err(io_reason)?
                    .unwrap_or(0);
                meta.rdev = Some((major, minor));
                // Device nodes need privilege; a placeholder keeps the name and the
                // ext4 step replaces it with the real node.
                self.remove(&dest_rel)?;
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(io_reason)?;
            }
            EntryType::Fifo => {
                meta.mode = S_IFIFO | (meta.mode & 0o7777);
                self.remove(&dest_rel)?;
                nix::unistd::mkfifo(&dest, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| e.to_string())?;
            }
            other => {
                tracing::debug!(path = %dest_rel.display(), kind = ?other, "skipping unsupported tar entry type");
                return Ok(());
            }
        }
        self.meta.set(dest_rel.clone(), meta);
        self.created_in_layer.insert(dest_rel);
        Ok(())
    }

    /// Resolves a directory inside the root, creating missing components the way
    /// container runtimes do (root-owned, 0755).
    fn ensure_dir(&mut self, rel: &Path) -> Result<PathBuf, String> {
        let resolved = resolve_dir_in_root(&self.root, rel)?;
        let mut prefix = PathBuf::new();
        for comp in resolved.components() {
            prefix.push(comp);
            let full = self.root.join(&prefix);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("`{}` is not a directory", prefix.display())),
                Err(_) => {
                    fs::create_dir(&full).map_err(io_reason)?;
                    fs::set_permissions(&full, fs::Permissions::from_mode(0o755))
                        .map_err(io_reason)?;
                    self.meta.set(prefix.clone(), Meta::dir_default());
                }
            }
        }
        Ok(resolved)
    }

    /// Removes whatever is at `rel` (file, link or whole directory tree).
    fn remove(&mut self, rel: &Path) -> Result<(), String> {
        let full = self.root.join(rel);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&full).map_err(io_reason)?,
            Ok(_) => fs::remove_file(&full).map_err(io_reason)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        self.meta.remove_tree(rel);
        Ok(())
    }

    /// Opaque directory: drops everything under `dir` that this layer did not add.
    fn hide_lower(&mut self, dir: &Path) -> Result<(), String> {
        let full = self.root.join(dir);
        let mut names = Vec::new();
        for child in fs::read_dir(&full).map_err(io_reason)? {
            names.push(child.map_err(io_reason)?.file_name());
        }
        for name in names {
            let child = dir.join(&name);
            if !self.created_in_layer.contains(&child) {
                self.remove(&child)?;
            } else if fs::symlink_metadata(self.root.join(&child))
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                self.hide_lower(&child)?;
            }
        }
        Ok(())
    }
}

/// Owner, permission bits, xattrs and mtime of an entry, preferring PAX records.
fn header_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let header = entry.header();
    // Like Go's archive/tar, which wrote most layers, an empty numeric field is 0.
    let mut uid = header.uid().unwrap_or(0);
    let mut gid = header.gid().unwrap_or(0);
    let mode = header.mode().unwrap_or(0o644) & 0o7777;
    let mut mtime = header.mtime().unwrap_or(0) as i64;
    let mut xattrs = Vec::new();
    if let Some(exts) = entry.pax_extensions().map_err(io_reason)? {
        for ext in exts {
            let ext = ext.map_err(io_reason)?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            let number = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.split('.').next()?.parse::<i64>().ok())
            };
            match key {
                "uid" => uid = number().ok_or("bad PAX uid")? as u64,
                "gid" => gid = number().ok_or("bad PAX gid")? as u64,
                "mtime" => mtime = number().unwrap_or(mtime),
                _ => {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        xattrs.push((name.to_string(), value.to_vec()));
                    }
                }
            }
        }
    }
    let id =
        |v: u64, what: &str| u32::try_from(v).map_err(|_| format!("{what} {v} is out of range"));
    Ok(Meta {
        uid: id(uid, "uid")?,
        gid: id(gid, "gid")?,
        mode,
        rdev: None,
        xattrs,
        mtime,
    })
}
