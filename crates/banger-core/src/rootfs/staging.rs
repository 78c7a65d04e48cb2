//! Where a pull unpacks its layers before the ext4 is built: in memory
//! (`/dev/shm`) when the image fits with room to spare, else on disk beside
//! the pull's other scratch files.
//!
//! The staging tree is written once and read once by `mkfs.ext4 -d`, then
//! deleted. On a disk filesystem each of its thousands of files costs inode
//! allocation and journalling that buy nothing here; in memory the Debian
//! image of scripts/bench-pull pulled about a fifth faster.

use std::path::{Path, PathBuf};

/// Where tmpfs is found on Linux.
const SHM: &str = "/dev/shm";
/// How much larger than its compressed bytes an image is taken to unpack to.
/// Ordinary layers unpack to 2–4×; one that unpacks further runs the memory
/// staging low, and the pull carries on on disk (see `Flattener::ran_out_of_room`).
const EXPANSION: u64 = 4;
/// Memory left to everything else: the staging may use half of what is free.
const SHARE: u64 = 2;

/// A staging directory, removed (with its tree) when dropped.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    in_memory: bool,
    /// Free bytes the staging filesystem must keep: past them, a tree in
    /// memory has used its share and the pull carries on on disk.
    keep_free: u64,
}

impl Staging {
    /// The tree's root inside this staging directory (not yet created).
    pub fn root(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    pub fn keep_free(&self) -> u64 {
        self.keep_free
    }

    /// On disk, inside the pull's scratch directory.
    pub fn on_disk(scratch: &Path) -> std::io::Result<Staging> {
        let dir = scratch.join("staging");
        std::fs::create_dir(&dir)?;
        Ok(Staging {
            dir,
            in_memory: false,
            keep_free: 0,
        })
    }

    /// In memory if `estimate` bytes fit in half of what tmpfs, the host
    /// and the daemon's cgroup have free; else on disk. `owner` tells this
    /// daemon's staging directories from other daemons' (see [`clean_leftovers`]).
    /// `forced_share` (a test seam) stages in memory whatever the estimate,
    /// with that many bytes to use.
    pub fn choose(
        scratch: &Path,
        owner: &str,
        estimate: u64,
        forced_share: Option<u64>,
    ) -> std::io::Result<Staging> {
        if let Some((shm_free, free)) = memory_free() {
            let share = forced_share.unwrap_or(free / SHARE);
            if estimate <= share || forced_share.is_some() {
                let dir = Path::new(SHM).join(format!(
                    "{}{}",
                    dir_prefix(owner),
                    crate::ids::random_hex(6)
                ));
                if std::fs::create_dir(&dir).is_ok() {
                    return Ok(Staging {
                        dir,
                        in_memory: true,
                        keep_free: shm_free.saturating_sub(share),
                    });
                }
            }
        }
        Staging::on_disk(scratch)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bytes `layers` (compressed sizes, and whether compressed) may unpack to.
pub fn estimate(layers: impl IntoIterator<Item = (u64, bool)>) -> u64 {
    layers
        .into_iter()
        .map(|(size, compressed)| if compressed { size * EXPANSION } else { size })
        .sum()
}

/// Memory staging directories a killed daemon left behind.
pub fn clean_leftovers(owner: &str) {
    let prefix = dir_prefix(owner);
    if let Ok(entries) = std::fs::read_dir(SHM) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// How one daemon's memory staging directories are named: by its state
/// directory, hashed.
pub fn dir_prefix(owner: &str) -> String {
    let hash = crate::oci::digest::sha256_of(owner.as_bytes());
    let hex = hash.trim_start_matches("sha256:");
    format!("banger-{}-pull-", &hex[..12])
}

/// Tmpfs's free space, and the least of that, the host's available memory
/// and the headroom of this process's cgroup (whose limit tmpfs pages count
/// against).
fn memory_free() -> Option<(u64, u64)> {
    let shm = nix::sys::statfs::statfs(SHM).ok()?;
    if shm.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return None;
    }
    let shm_free = shm.blocks_available() * shm.block_size() as u64;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo_kib(&meminfo, "MemAvailable:")? * 1024;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_headroom(&c, Path::new("/sys/fs/cgroup")))
        .unwrap_or(u64::MAX);
    Some((shm_free, shm_free.min(available).min(cgroup)))
}

fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The smallest `memory.max - memory.current` from this process's cgroup
/// (v2) up to the root; `None` when none sets a limit.
fn cgroup_headroom(self_cgroup: &str, mount: &Path) -> Option<u64> {
    let path = self_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mut dir = mount.join(path.trim_start_matches('/'));
    let mut least: Option<u64> = None;
    loop {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current")) {
            if let (Ok(max), Ok(current)) =
                (max.trim().parse::<u64>(), current.trim().parse::<u64>())
            {
                let room = max.saturating_sub(current);
                least = Some(least.map_or(room, |l| l.min(room)));
            }
        }
        if dir == mount || !dir.pop() || !dir.starts_with(mount) {
            break;
        }
    }
    least
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_estimate_counts_compressed_layers_four_times() {
        assert_eq!(estimate([(10, true), (5, false)]), 45);
    }

    #[test]
    fn the_tightest_cgroup_limit_on_the_way_up_counts() {
        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("system.slice/banger.service");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(leaf.join("memory.max"), "max\n").unwrap();
        std::fs::write(leaf.join("memory.current"), "100\n").unwrap();
        let slice = root.path().join("system.slice");
        std::fs::write(slice.join("memory.max"), "1000\n").unwrap();
        std::fs::write(slice.join("memory.current"), "400\n").unwrap();
        let line = "0::/system.slice/banger.service\n";
        assert_eq!(cgroup_headroom(line, root.path()), Some(600));
        std::fs::write(slice.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_headroom(line, root.path()), None);
        assert_eq!(cgroup_headroom("1:name=systemd:/\n", root.path()), None);
    }

    #[test]
    fn staging_goes_away_with_its_tree_and_leftovers_are_only_ours() {
        let scratch = tempfile::tempdir().unwrap();
        let owner = scratch.path().display().to_string();
        let staging = Staging::choose(scratch.path(), &owner, 1 << 20, None).unwrap();
        std::fs::create_dir(staging.root()).unwrap();
        std::fs::write(staging.root().join("f"), b"x").unwrap();
        let dir = staging.dir.clone();
        drop(staging);
        assert!(!dir.exists());

        if Path::new(SHM).is_dir() {
            let ours = Path::new(SHM).join(format!("{}left", dir_prefix(&owner)));
            let theirs = Path::new(SHM).join(format!("{}left", dir_prefix("/another/home")));
            std::fs::create_dir_all(&ours).unwrap();
            std::fs::create_dir_all(&theirs).unwrap();
            clean_leftovers(&owner);
            assert!(!ours.exists() && theirs.exists());
            let _ = std::fs::remove_dir_all(theirs);
        }
    }
}
