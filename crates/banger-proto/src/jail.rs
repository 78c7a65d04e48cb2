//! What a jailed Firecracker is launched with: shared by the daemon (which
//! asks), the root helper (which checks and launches) and the host layer
//! (which does it), so the three agree on one shape.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Firecracker's arguments inside every jail. Fixed here rather than sent:
/// the helper never passes a caller's words to a root-launched process.
pub const FIRECRACKER_ARGS: &[&str] = &[
    "--api-sock",
    "/fc.sock",
    "--log-path",
    "/vmm.log",
    "--level",
    "Info",
    "--show-level",
];

/// A file the VM uses, made visible in its jail's root under `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailFile {
    /// On the host: the caller's own file, or its dm snapshot device.
    pub path: PathBuf,
    /// A plain file name inside the jail's root.
    pub name: String,
    /// Firecracker may write it (a disk it writes, its log).
    pub writable: bool,
}

/// Per-VM resource limits, applied through the jailer's cgroups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailLimits {
    /// CPU time as a percentage of one host CPU (150 = one and a half CPUs).
    #[serde(default)]
    pub cpu_quota: Option<u32>,
    /// A ceiling on the VMM's memory (guest memory plus overhead), MiB.
    #[serde(default)]
    pub memory_mib: Option<u64>,
}

/// One jailed Firecracker for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailRequest {
    /// Which of the caller's state directories the VM is of (see
    /// [`is_home_id`]): one user's two homes may both have a VM `web`.
    pub home: String,
    /// The jail's id: the VM's name (a DNS label).
    pub vm: String,
    /// The Firecracker binary the jailer copies in and runs.
    pub firecracker: PathBuf,
    pub files: Vec<JailFile>,
    /// The caller's file that gets Firecracker's stdout and stderr (the
    /// guest's serial console).
    pub console: PathBuf,
    #[serde(default)]
    pub limits: JailLimits,
    /// The VM's tap, if it has one: lent to the jail's own uid (which
    /// Firecracker opens it as) while the jail runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
}

/// Whether `name` may be a file name in a jail's root: one plain component.
pub fn is_jail_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// A state directory's short id: 1 to 16 lowercase letters and digits.
pub fn is_home_id(id: &str) -> bool {
    (1..=16).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// The short id of a state directory (stable for its path).
pub fn home_id(state_dir: &std::path::Path) -> String {
    // FNV-1a: the same on every build, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", h as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_names_are_single_plain_components() {
        for ok in ["vmlinux", "root.ext4", "vmm.log", "initrd.cpio"] {
            assert!(is_jail_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "/abs",
            "sp ace",
            &"x".repeat(65),
        ] {
            assert!(!is_jail_name(bad), "{bad}");
        }
        let id = home_id(std::path::Path::new("/home/u/.local/state/banger"));
        assert!(is_home_id(&id) && id.len() == 8);
        assert_ne!(id, home_id(std::path::Path::new("/tmp/other")));
        for bad in ["", "A1", "../x", &"a".repeat(17)] {
            assert!(!is_home_id(bad), "{bad}");
        }
    }
}
