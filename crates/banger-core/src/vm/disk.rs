//! A VM's disks: the root disk (a reflink or sparse copy of the image's
//! ext4, for the modes that give each VM the whole filesystem), the overlay
//! root's writable layer, and the work disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use banger_host::{CommandSpec, ProcessRunner};

pub use banger_proto::domain::RootMode;

/// An overlay root's writable layer, in the VM's directory.
pub const UPPER_FILE: &str = "upper.ext4";
/// A dm-snapshot root's copy-on-write store.
pub const COW_FILE: &str = "cow.img";
/// The whole root filesystem of a reflink or copy root.
pub const ROOT_FILE: &str = "root.ext4";
/// The work disk, in every mode.
pub const WORK_FILE: &str = "work.ext4";

/// The file in a VM's directory that holds what the VM wrote to its root.
pub fn own_root_file(mode: RootMode) -> &'static str {
    match mode {
        RootMode::Overlay => UPPER_FILE,
        RootMode::DmSnapshot => COW_FILE,
        RootMode::Reflink | RootMode::Copy => ROOT_FILE,
    }
}

const FICLONE: libc::c_ulong = 0x4004_9409;

/// Makes `dst` a copy of `src`: sharing all its blocks (`Reflink`, which
/// fails where the filesystem cannot) or a sparse copy (`Copy`).
pub fn copy_root(src: &Path, dst: &Path, mode: RootMode) -> io::Result<()> {
    let input = File::open(src)?;
    let output = OpenOptions::new().write(true).create_new(true).open(dst)?;
    if mode == RootMode::Reflink {
        // SAFETY: FICLONE with two valid descriptors.
        let rc = unsafe { libc::ioctl(output.as_raw_fd(), FICLONE, input.as_raw_fd()) };
        return if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
    }
    sparse_copy(&input, &output)?;
    output.sync_all()
}

/// A copy of `src` at `dst` (which must not exist) sharing its blocks where
/// the filesystem can (a reflink), else with only its data written (holes
/// stay holes): a snapshot's disks, or a fork's from a snapshot.
pub fn clone_file(src: &Path, dst: &Path) -> io::Result<()> {
    match copy_root(src, dst, RootMode::Reflink) {
        Ok(()) => Ok(()),
        Err(_) => {
            let _ = std::fs::remove_file(dst);
            copy_root(src, dst, RootMode::Copy)
        }
    }
}

/// Bytes the host has allocated to a file (a sparse one takes less than
/// its length); 0 if it does not exist.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Whether `dir`'s filesystem can reflink.
pub fn reflink_supported(dir: &Path) -> bool {
    let a = dir.join(format!(".reflink-probe-{}", std::process::id()));
    let b = dir.join(format!(".reflink-probe-{}-b", std::process::id()));
    let ok = std::fs::write(&a, b"probe").is_ok() && copy_root(&a, &b, RootMode::Reflink).is_ok();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

/// Copies only the data extents, leaving holes as holes.
fn sparse_copy(input: &File, output: &File) -> io::Result<()> {
    let len = input.metadata()?.len();
    output.set_len(len)?;
    let (fin, fout) = (input.as_raw_fd(), output.as_raw_fd());
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a valid descriptor.
        let data = unsafe { libc::lseek(fin, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fin, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let mut off_in = data;
        let mut off_out = data;
        while off_in < end {
            // SAFETY: copy_file_range between valid descriptors and offsets.
            let n = unsafe {
                libc::copy_file_range(
                    fin,
                    &mut off_in,
                    fout,
                    &mut off_out,
                    (end - off_in) as usize,
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                // Across filesystems (a VM directory mounted apart from the
                // images) or where the call is missing: copy by hand.
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                ) {
                    copy_range(input, output, off_in as u64, end as u64)?;
                    break;
                }
                return Err(err);
            }
            if n == 0 {
                break;
            }
        }
        pos = end;
    }
    Ok(())
}

/// Copies bytes `from..to` of `input` to the same offsets of `output`.
fn copy_range(input: &File, output: &File, from: u64, to: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let want = buf.len().min((to - at) as usize);
        let n = input.read_at(&mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        output.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// A disk file that could not be made: the file itself, or the tool that
/// formats or grows it.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("copying the image's root disk: {0}")]
    CopyRoot(io::Error),
    #[error("{what}: {source}")]
    Tool {
        what: &'static str,
        source: banger_host::HostError,
    },
}

/// Grows an ext4 image file to `size` bytes and its filesystem with it.
pub fn grow(runner: &dyn ProcessRunner, path: &Path, size: u64) -> Result<(), DiskError> {
    let current = std::fs::metadata(path)?.len();
    if size <= current {
        return Ok(());
    }
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size))?;
    runner
        .run(&CommandSpec::new("resize2fs").arg("-f").arg(path))
        .map_err(|source| DiskError::Tool {
            what: "growing the root filesystem",
            source,
        })?;
    Ok(())
}

/// Grows a disk a guest has used: its filesystem is checked first (a VM
/// that was killed leaves a journal to replay, which resize2fs will not
/// do), then grown as [`grow`] does.
pub fn grow_used(runner: &dyn ProcessRunner, path: &Path, size: u64) -> Result<(), DiskError> {
    // e2fsck's 1 is "errors corrected": the filesystem is fine now.
    runner
        .run(
            &CommandSpec::new("sh")
                .args([
                    "-c",
                    "e2fsck -fy \"$1\" >/dev/null 2>&1; test $? -le 1",
                    "sh",
                ])
                .arg(path),
        )
        .map_err(|source| DiskError::Tool {
            what: "checking the filesystem (e2fsck -fy) before growing it",
            source,
        })?;
    grow(runner, path, size)
}

/// An empty sparse ext4 (the work disk, an overlay's writable layer): lazy
/// init keeps creation instant whatever its size.
pub fn create_empty(
    runner: &dyn ProcessRunner,
    path: &Path,
    size: u64,
    label: &str,
) -> Result<(), DiskError> {
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.set_len(size)?;
    drop(file);
    runner
        .run(
            &CommandSpec::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-L",
                    label,
                    "-m",
                    "0",
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                ])
                .arg(path),
        )
        .map_err(|source| DiskError::Tool {
            what: "making an empty disk",
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copies_keep_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(64 * 1024 * 1024)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        copy_root(&src, &dst, RootMode::Copy).unwrap();
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert_eq!(a, b);
        let blocks = std::fs::metadata(&dst).unwrap().blocks();
        assert!(blocks < 1024, "the hole stayed a hole ({blocks} blocks)");
        assert!(
            copy_root(&src, &dst, RootMode::Copy).is_err(),
            "never overwrites"
        );
        let shared = dir.path().join("shared");
        match copy_root(&src, &shared, RootMode::Reflink) {
            Ok(()) => assert_eq!(std::fs::read(&shared).unwrap(), a),
            Err(_) => assert!(!reflink_supported(dir.path())),
        }
        // Onto another filesystem, where copy_file_range may refuse (EXDEV).
        let shm = Path::new("/dev/shm");
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        if shm.is_dir() && dev(shm) != dev(dir.path()) {
            let other = tempfile::tempdir_in(shm).unwrap();
            let dst = other.path().join("dst");
            copy_root(&src, &dst, RootMode::Copy).unwrap();
            assert_eq!(std::fs::read(&dst).unwrap(), a);
        }
    }

    #[test]
    fn an_empty_layer_grows_with_its_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join(UPPER_FILE);
        let runner = banger_host::RealRunner;
        create_empty(&runner, &upper, 64 << 20, "upper").unwrap();
        assert!(
            std::fs::metadata(&upper).unwrap().blocks() * 512 < 8 << 20,
            "sparse"
        );
        grow(&runner, &upper, 256 << 20).unwrap();
        let out = std::process::Command::new("dumpe2fs")
            .arg("-h")
            .arg(&upper)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        let bytes = field("Block count:") * field("Block size:");
        assert_eq!(bytes, 256 << 20, "the filesystem grew with its file");
    }
}
