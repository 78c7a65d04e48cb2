//! Builds the image's ext4 from the staging tree, then gives every inode the
//! owner, mode, device number and xattrs the image asked for.
//!
//! `mkfs.ext4 -d` copies the staging tree as it is on disk (owned by the
//! daemon's user, modes relaxed); `debugfs -w` then edits the inodes offline.
//! Neither needs privilege, so an unprivileged daemon builds correct images.
//! See ARCHITECTURE.md, "Ownership without root".

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use banger_host::{CommandSpec, ProcessRunner};

use super::meta::{Meta, MetaTable, S_IFCHR};

const BLOCK: u64 = 4096;
const MIB: u64 = 1024 * 1024;
/// Bytes an inode costs in the inode table (`-I 256`).
const INODE_BYTES: u64 = 256;

/// What the staging tree holds, for sizing the filesystem.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Bytes of regular-file content, hardlinks counted once.
    pub content_bytes: u64,
    /// Blocks the content and directories occupy.
    pub data_bytes: u64,
    pub inodes: u64,
}

pub fn tally(root: &Path) -> std::io::Result<Tally> {
    let mut t = Tally::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        t.inodes += 1;
        let mut entries = 0u64;
        for child in fs::read_dir(&dir)? {
            let child = child?;
            entries += 1;
            let meta = child.metadata()?;
            if meta.is_dir() {
                stack.push(child.path());
                continue;
            }
            if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            t.inodes += 1;
            if meta.is_file() {
                t.content_bytes += meta.len();
                t.data_bytes += meta.len().div_ceil(BLOCK) * BLOCK;
            } else if meta.file_type().is_symlink() && meta.len() >= 60 {
                t.data_bytes += BLOCK;
            }
        }
        // A directory entry costs roughly its name plus 8 bytes; 32 is generous.
        t.data_bytes += (entries * 32).div_ceil(BLOCK).max(1) * BLOCK;
    }
    Ok(t)
}

/// Filesystem size for a tree: content plus 20% plus 64 MiB (journal, metadata
/// and room for the guest), rounded up to a MiB. Documented in docs/oci-import.md.
pub fn fs_size(t: &Tally) -> u64 {
    let raw = t.data_bytes + t.inodes * INODE_BYTES;
    (raw + raw / 5 + 64 * MIB).div_ceil(MIB) * MIB
}

/// Inode count: the tree's plus half again plus 8192 for the guest's own files.
pub fn inode_count(t: &Tally) -> u64 {
    t.inodes + t.inodes / 2 + 8192
}

#[derive(Debug, Clone)]
pub struct Built {
    pub content_bytes: u64,
    pub size_bytes: u64,
    /// `tally`, `mkfs` and `fixup` (the debugfs pass).
    pub phases: crate::phases::PhaseClock,
}

/// Creates `out` (which must not exist) from `staging` and `meta`, keeping
/// `min_free` bytes free where it goes. `scratch` is a private directory for
/// the debugfs script and xattr values.
pub fn build(
    runner: &dyn ProcessRunner,
    staging: &Path,
    meta: &MetaTable,
    out: &Path,
    scratch: &Path,
    min_free: u64,
) -> anyhow::Result<Built> {
    let mut phases = crate::phases::PhaseClock::default();
    let t = tally(staging)?;
    phases.lap("tally");
    let size = fs_size(&t);
    // The tree may have been unpacked elsewhere (in memory): what the ext4
    // will hold must fit here before mkfs starts writing it.
    let dir = out.parent().unwrap_or(Path::new("."));
    let needed = t.data_bytes + t.inodes * INODE_BYTES;
    if let Some(free) = super::extract::free_bytes(dir) {
        if free < needed.saturating_add(min_free) {
            anyhow::bail!(
                "the image needs {} MiB and only {} MiB left on the filesystem holding {}; free space (or `banger image cache prune`) and pull again",
                needed.div_ceil(MIB),
                free / MIB,
                dir.display()
            );
        }
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)?;
    file.set_len(size)?;
    drop(file);
    // No metadata checksums: computing them was a fifth of mkfs's time, and
    // the image is verified by digest on the way in and shared read-only
    // after (guests with kernels older than 3.18 can mount it too).
    runner.run(
        &CommandSpec::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-T",
                "default",
                "-O",
                "^metadata_csum",
                "-b",
                "4096",
                "-I",
                "256",
                "-m",
                "0",
            ])
            .arg("-N")
            .arg(inode_count(&t).to_string())
            .args(["-L", "rootfs", "-d"])
            .arg(staging)
            .arg(out),
    )?;
    phases.lap("mkfs");

    let script_path = scratch.join("fixup.debugfs");
    let commands = fixup_script(staging, meta, scratch)?;
    if !commands.is_empty() {
        fs::write(&script_path, &commands)?;
        let output = runner.run(
            &CommandSpec::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(&script_path)
                .arg(out),
        )?;
        // debugfs exits 0 even when a command fails; its complaints go to stderr.
        let complaints: Vec<_> = String::from_utf8_lossy(&output.stderr)
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
            .map(str::to_owned)
            .collect();
        if !complaints.is_empty() {
            anyhow::bail!(
                "setting ownership in the ext4 failed: {}",
                complaints.join("; ")
            );
        }
    }
    phases.lap("fixup");
    Ok(Built {
        content_bytes: t.content_bytes,
        size_bytes: size,
        phases,
    })
}

/// debugfs commands that turn the copied staging inodes into the image's own.
pub fn fixup_script(staging: &Path, meta: &MetaTable, scratch: &Path) -> anyhow::Result<Vec<u8>> {
    let mut script = Vec::new();
    let mut xattr_files = 0usize;
    for (rel, want) in meta.iter() {
        let abs = {
            let mut p = b"/".to_vec();
            p.extend_from_slice(rel.as_os_str().as_bytes());
            p
        };
        let path = quote(&abs)?;
        let on_disk = fs::symlink_metadata(staging.join(rel))?;
        if want.is_device() {
            write_device(&mut script, rel, &path, want)?;
        } else {
            if on_disk.mode() != want.mode {
                set_field(&mut script, &path, "mode", &format!("0{:o}", want.mode));
            }
            if on_disk.uid() != want.uid {
                set_field(&mut script, &path, "uid", &want.uid.to_string());
            }
            if on_disk.gid() != want.gid {
                set_field(&mut script, &path, "gid", &want.gid.to_string());
            }
        }
        for (name, value) in &want.xattrs {
            xattr_files += 1;
            let value_file = scratch.join(format!("xattr-{xattr_files}"));
            fs::write(&value_file, value)?;
            script.extend_from_slice(b"ea_set -f ");
            script.extend_from_slice(&quote(value_file.as_os_str().as_bytes())?);
            script.push(b' ');
            script.extend_from_slice(&path);
            script.push(b' ');
            script.extend_from_slice(&quote(name.as_bytes())?);
            script.push(b'\n');
        }
    }
    Ok(script)
}

fn set_field(script: &mut Vec<u8>, path: &[u8], field: &str, value: &str) {
    script.extend_from_slice(b"sif ");
    script.extend_from_slice(path);
    writeln!(script, " {field} {value}").expect("writing to a Vec");
}

/// Replaces the staging placeholder with a real device node.
fn write_device(script: &mut Vec<u8>, rel: &Path, path: &[u8], want: &Meta) -> anyhow::Result<()> {
    let (major, minor) = want.rdev.unwrap_or((0, 0));
    let parent = {
        let mut p = b"/".to_vec();
        p.extend_from_slice(rel.parent().unwrap_or(Path::new("")).as_os_str().as_bytes());
        p
    };
    let name = rel.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    let kind = if want.file_type() == S_IFCHR {
        "c"
    } else {
        "b"
    };
    script.extend_from_slice(b"rm ");
    script.extend_from_slice(path);
    script.extend_from_slice(b"\ncd ");
    script.extend_from_slice(&quote(&parent)?);
    // debugfs 1.47 `mknod` takes a name relative to the current directory.
    script.extend_from_slice(b"\nmknod ");
    script.extend_from_slice(&quote(name)?);
    writeln!(script, " {kind} {major} {minor}\ncd /").expect("writing to a Vec");
    set_field(script, path, "mode", &format!("0{:o}", want.mode));
    set_field(script, path, "uid", &want.uid.to_string());
    set_field(script, path, "gid", &want.gid.to_string());
    Ok(())
}

/// Quotes an argument for debugfs' command parser (a doubled quote is a literal
/// quote inside a quoted string). Its script is line-based, so a newline cannot
/// be expressed at all.
pub fn quote(arg: &[u8]) -> anyhow::Result<Vec<u8>> {
    if arg.contains(&b'\n') {
        anyhow::bail!(
            "the path `{}` contains a newline, which banger cannot write into an ext4 image",
            String::from_utf8_lossy(arg)
        );
    }
    let mut out = Vec::with_capacity(arg.len() + 2);
    out.push(b'"');
    for &b in arg {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes_and_refuses_newlines() {
        assert_eq!(quote(b"/a b/q\"x").unwrap(), b"\"/a b/q\"\"x\"");
        assert!(quote(b"/a\nb").is_err());
    }

    #[test]
    fn sizing_leaves_documented_headroom() {
        let t = Tally {
            content_bytes: 100 * MIB,
            data_bytes: 100 * MIB,
            inodes: 1000,
        };
        let size = fs_size(&t);
        assert!(size >= 100 * MIB * 6 / 5 + 64 * MIB);
        assert_eq!(size % MIB, 0);
        assert_eq!(inode_count(&t), 1500 + 8192);
    }
}
