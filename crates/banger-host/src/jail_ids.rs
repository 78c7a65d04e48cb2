//! The uids a jailed Firecracker runs as: one of its own per VM (its gid
//! the same number), from a configured range no login user is in, as
//! Firecracker's production guidance asks. A guest that escapes into its
//! VMM then holds neither root nor the user's files and processes, nor
//! another VM's.
//!
//! A uid is taken while a process runs as it or a jail record names it;
//! choosing one holds a host-wide lock until the new jail's Firecracker
//! runs, so two launches (two helpers' callers, two root daemons) never
//! pick the same.

use std::fs::File;
use std::path::Path;

/// A range of ids, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIds {
    pub first: u32,
    pub last: u32,
}

/// Far above login users, system users and the usual subordinate ranges
/// (`/etc/subuid` starts at 100000, 65536 per user).
pub const DEFAULT_JAIL_IDS: JailIds = JailIds {
    first: 1_500_000_000,
    last: 1_500_000_999,
};

/// Where launches take turns choosing (root's, in /run: gone at reboot,
/// with the processes it was about).
pub const LOCK_FILE: &str = "/run/banger-jail-ids.lock";

/// A range that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    #[error("`{0}` is not a uid range (FIRST-LAST, like 1500000000-1500000999)")]
    Unreadable(String),
    #[error("the jail uid range {0} includes uid 0, nobody or -1: jails never run as those")]
    Reserved(JailIds),
    #[error("the jail uid range {range} includes {what} `{name}` ({id}); pick a range no user or group is in ([firecracker] jail_uids, or the helper's --jail-uids)")]
    InUse {
        range: JailIds,
        what: &'static str,
        name: String,
        id: u32,
    },
    #[error("every uid of the jail range {0} is in use: stop a jailed VM or widen the range")]
    Exhausted(JailIds),
    #[error("choosing a jail uid: {0}")]
    Lock(#[source] std::io::Error),
}

impl std::fmt::Display for JailIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl JailIds {
    pub fn parse(text: &str) -> Result<JailIds, IdsError> {
        let unreadable = || IdsError::Unreadable(text.to_string());
        let (a, b) = text.trim().split_once('-').ok_or_else(unreadable)?;
        let (first, last) = (
            a.trim().parse::<u32>().map_err(|_| unreadable())?,
            b.trim().parse::<u32>().map_err(|_| unreadable())?,
        );
        if first > last {
            return Err(unreadable());
        }
        Ok(JailIds { first, last })
    }

    pub fn contains(&self, id: u32) -> bool {
        (self.first..=self.last).contains(&id)
    }

    /// No id of the range is root's, nobody's or -1, and none names a user
    /// or a group on this host: checked when the helper starts and by
    /// `banger doctor`.
    pub fn check_unused(&self) -> Result<(), IdsError> {
        if [0, 65534, u32::MAX].iter().any(|&id| self.contains(id)) {
            return Err(IdsError::Reserved(*self));
        }
        // /etc/passwd and /etc/group are what NSS reads on the machines
        // banger runs on; a range is at most a few thousand ids.
        for (file, what) in [("/etc/passwd", "user"), ("/etc/group", "group")] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for line in text.lines() {
                let mut fields = line.split(':');
                let (Some(name), Some(id)) = (fields.next(), fields.nth(1)) else {
                    continue;
                };
                if let Ok(id) = id.parse::<u32>() {
                    if self.contains(id) {
                        return Err(IdsError::InUse {
                            range: *self,
                            what,
                            name: name.to_string(),
                            id,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes the lock and the lowest id no process runs as and `recorded`
    /// does not name. The lock is held until the returned guard drops.
    pub fn choose(
        &self,
        lock: &Path,
        recorded: impl Fn(u32) -> bool,
    ) -> Result<(u32, Chosen), IdsError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock)
            .map_err(IdsError::Lock)?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| IdsError::Lock(e.into()))
            .and_then(|held| {
                let running = process_uids();
                (self.first..=self.last)
                    .find(|id| !running.contains(id) && !recorded(*id))
                    .map(|id| (id, Chosen { _held: held }))
                    .ok_or(IdsError::Exhausted(*self))
            })
    }
}

/// The lock of a choice, held while the jail comes up.
pub struct Chosen {
    _held: nix::fcntl::Flock<File>,
}

/// Every real and effective uid a live process has.
fn process_uids() -> std::collections::HashSet<u32> {
    let mut uids = std::collections::HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return uids;
    };
    for entry in procs.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if let Some(line) = status.lines().find_map(|l| l.strip_prefix("Uid:")) {
            uids.extend(
                line.split_whitespace()
                    .filter_map(|n| n.parse::<u32>().ok()),
            );
        }
    }
    uids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_and_checked() {
        assert_eq!(
            JailIds::parse("100-199").unwrap(),
            JailIds {
                first: 100,
                last: 199
            }
        );
        for bad in ["", "100", "a-b", "200-100", "-5-9"] {
            assert!(JailIds::parse(bad).is_err(), "{bad}");
        }
        DEFAULT_JAIL_IDS.check_unused().unwrap();
        let with_root = JailIds { first: 0, last: 10 };
        assert!(matches!(
            with_root.check_unused(),
            Err(IdsError::Reserved(_))
        ));
        // Where this machine's first user is (root's group is 0 as well).
        let users = JailIds {
            first: 1,
            last: 65533,
        };
        if std::fs::read_to_string("/etc/passwd").is_ok_and(|t| t.contains(":1:")) {
            assert!(matches!(users.check_unused(), Err(IdsError::InUse { .. })));
        }
    }

    #[test]
    fn the_lowest_free_id_is_chosen_and_none_twice() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("ids.lock");
        let ids = JailIds {
            first: 1_500_001_000,
            last: 1_500_001_002,
        };
        let (a, held) = ids.choose(&lock, |_| false).unwrap();
        assert_eq!(a, 1_500_001_000);
        drop(held);
        let (b, _held) = ids.choose(&lock, |id| id == a).unwrap();
        assert_eq!(b, 1_500_001_001);
        // This test's own uid is a running process's: never chosen.
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        let mine = JailIds {
            first: me,
            last: me,
        };
        let lock2 = dir.path().join("other.lock");
        assert!(matches!(
            mine.choose(&lock2, |_| false),
            Err(IdsError::Exhausted(_))
        ));
    }
}
