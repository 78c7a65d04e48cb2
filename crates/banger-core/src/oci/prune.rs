//! `image cache prune`: empties the blob cache without ever leaving it half
//! removed. The directory is renamed aside, recreated empty, and the aside copy
//! removed; pulls in flight keep their open files and see a fresh cache.

use std::fs;
use std::io;
use std::path::Path;

use banger_proto::image::PruneResult;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub bytes: u64,
    pub blobs: u64,
}

/// Files and bytes under `dir`; a missing directory is empty.
pub fn tally(dir: &Path) -> io::Result<Tally> {
    let mut t = Tally::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                t.blobs += 1;
                t.bytes += meta.len();
            }
        }
    }
    Ok(t)
}

pub fn prune(cache_dir: &Path, dry_run: bool) -> io::Result<PruneResult> {
    let t = tally(cache_dir)?;
    let result = PruneResult {
        bytes_freed: t.bytes,
        blobs_freed: t.blobs,
        dry_run,
        cache_dir: cache_dir.display().to_string(),
    };
    if dry_run || !cache_dir.exists() {
        return Ok(result);
    }
    let name = cache_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cache".into());
    let aside = cache_dir.with_file_name(format!(".pruning-{name}-{}", crate::ids::random_hex(6)));
    fs::rename(cache_dir, &aside)?;
    // The new, empty cache comes first, so a pull finishing meanwhile has
    // one to publish into; on a full disk there is no room even for that
    // until the old one is gone, so then it comes after.
    match fs::create_dir_all(cache_dir) {
        Ok(()) => fs::remove_dir_all(&aside)?,
        Err(e) if e.kind() == io::ErrorKind::StorageFull => {
            fs::remove_dir_all(&aside)?;
            fs::create_dir_all(cache_dir)?;
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&aside);
            return Err(e);
        }
    }
    Ok(result)
}

/// Removes aside directories a killed prune left behind.
pub fn clean_leftovers(cache_dir: &Path) {
    let Some(parent) = cache_dir.parent() else {
        return;
    };
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".pruning-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(dir: &Path) {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("blobs/sha256/a"), vec![0u8; 1000]).unwrap();
        fs::write(dir.join("blobs/sha256/b"), vec![0u8; 24]).unwrap();
    }

    fn siblings(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn prune_empties_the_cache_and_leaves_no_aside_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("oci");
        fill(&cache);
        let r = prune(&cache, false).unwrap();
        assert_eq!((r.bytes_freed, r.blobs_freed, r.dry_run), (1024, 2, false));
        assert!(cache.is_dir());
        assert_eq!(tally(&cache).unwrap(), Tally::default());
        assert_eq!(siblings(&cache), ["oci"]);
    }

    /// On a filesystem with no room left (here: no inode), the cache is
    /// still emptied and made again (red team round 3, item 17: it failed
    /// with "No space left on device" and freed nothing). Root only: it
    /// mounts a small tmpfs.
    #[test]
    fn prune_frees_a_full_filesystem() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,nr_inodes=16", "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(mounted.success());
        let cache = mnt.join("oci");
        fs::create_dir_all(cache.join("blobs")).unwrap();
        let mut n = 0;
        while fs::write(cache.join(format!("blobs/{n}")), b"blob").is_ok() {
            n += 1;
        }
        assert!(fs::create_dir(mnt.join("probe")).is_err(), "full");
        let pruned = prune(&cache, false);
        let again = cache.is_dir() && tally(&cache).unwrap() == Tally::default();
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        let r = pruned.unwrap();
        assert_eq!(r.blobs_freed, n);
        assert!(again, "the cache is there again, empty");
    }

    #[test]
    fn dry_run_reports_and_keeps_blobs() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("oci");
        fill(&cache);
        let r = prune(&cache, true).unwrap();
        assert_eq!((r.bytes_freed, r.blobs_freed, r.dry_run), (1024, 2, true));
        assert_eq!(
            tally(&cache).unwrap(),
            Tally {
                bytes: 1024,
                blobs: 2
            }
        );
    }

    #[test]
    fn a_missing_cache_is_a_zero_result() {
        let tmp = tempfile::tempdir().unwrap();
        let r = prune(&tmp.path().join("oci"), false).unwrap();
        assert_eq!((r.bytes_freed, r.blobs_freed), (0, 0));
    }
}
