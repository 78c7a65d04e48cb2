//! What the helper agrees to touch. Every name, path and number a caller
//! sends is checked here before any host operation runs.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use banger_host::Subnet;

/// Who is calling, as the kernel recorded it on the connection (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A request outside the policy; nothing was changed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(msg.into()))
}

/// The private ranges a banger subnet may come from (RFC 1918).
const PRIVATE: [(u32, u8); 3] = [(0x0a00_0000, 8), (0xac10_0000, 12), (0xc0a8_0000, 16)];

pub struct Policy {
    /// The user the helper serves, if one was named.
    pub owner: Option<u32>,
    /// The group whose members may use it, if one was named.
    pub group: Option<u32>,
    /// Caller files (disks) must live under one of these.
    allowed_dirs: Vec<PathBuf>,
}

impl Policy {
    pub fn new(
        owner: Option<u32>,
        group: Option<u32>,
        allowed_dirs: Vec<PathBuf>,
    ) -> Result<Policy, String> {
        for dir in &allowed_dirs {
            if !dir.is_absolute() {
                return Err(format!(
                    "allowed directory {} is not absolute",
                    dir.display()
                ));
            }
        }
        Ok(Policy {
            owner,
            group,
            allowed_dirs,
        })
    }

    /// Root, the owner, and members of the group (primary or supplementary).
    pub fn admits(&self, caller: &Caller) -> bool {
        if caller.uid == 0 || self.owner == Some(caller.uid) {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        caller.gid == group || supplementary_groups(caller.pid).contains(&group)
    }

    /// Opens a file the caller owns inside the allowed directories, checking
    /// as the caller (so root's rights never reach a path the caller could
    /// not open) and never through a symlink.
    pub fn caller_file(&self, caller: &Caller, path: &Path, write: bool) -> Result<File, Refusal> {
        let canonical = as_caller(caller, || self.inside(path))?;
        let file = as_caller(caller, || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&canonical)
        })
        .map_err(|e| {
            Refusal(format!(
                "cannot open {} as uid {}: {e}",
                path.display(),
                caller.uid
            ))
        })?;
        let meta = file
            .metadata()
            .map_err(|e| Refusal(format!("{}: {e}", path.display())))?;
        if !meta.is_file() {
            return refuse(format!("{} is not a regular file", path.display()));
        }
        owned_by(caller, path, &meta)?;
        Ok(file)
    }

    /// The canonical form of `path` if it lies under an allowed directory.
    pub fn inside(&self, path: &Path) -> Result<PathBuf, Refusal> {
        if !path.is_absolute() {
            return refuse(format!("{} is not an absolute path", path.display()));
        }
        let canonical = path
            .canonicalize()
            .map_err(|e| Refusal(format!("{}: {e}", path.display())))?;
        let inside = self
            .allowed_dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .any(|d| canonical.starts_with(&d));
        if !inside {
            return refuse(format!(
                "{} is outside the helper's directories ({})",
                path.display(),
                self.allowed_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(canonical)
    }

    /// A program root may hand to the jailer: its canonical path, a regular
    /// file owned by root, and neither it nor any directory above it
    /// writable by anyone but root (else a caller could swap what runs).
    pub fn trusted_binary(&self, path: &Path) -> Result<PathBuf, Refusal> {
        if !path.is_absolute() {
            return refuse(format!("{} is not an absolute path", path.display()));
        }
        let canonical = path
            .canonicalize()
            .map_err(|e| Refusal(format!("{}: {e}", path.display())))?;
        let meta = std::fs::metadata(&canonical)
            .map_err(|e| Refusal(format!("{}: {e}", canonical.display())))?;
        if !meta.is_file() || meta.mode() & 0o111 == 0 {
            return refuse(format!(
                "{} is not an executable regular file",
                canonical.display()
            ));
        }
        for at in canonical.ancestors() {
            let meta =
                std::fs::metadata(at).map_err(|e| Refusal(format!("{}: {e}", at.display())))?;
            // The sticky /tmp is still no place for a trusted binary.
            if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
                return refuse(format!(
                    "{} must be owned by root and writable only by root (it is uid {}, mode {:o}); \
                     install firecracker under /usr/local/bin",
                    at.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                ));
            }
        }
        Ok(canonical)
    }

    /// The block device `/dev/mapper/<name>`, if `path` is it, opened.
    /// Whose it is, the handler has checked against its records.
    pub fn vm_device(&self, name: &str, path: &Path) -> Result<File, Refusal> {
        let own = PathBuf::from("/dev/mapper").join(name);
        let (want, got) = (own.canonicalize().ok(), path.canonicalize().ok());
        if want.is_none() || want != got {
            return refuse(format!(
                "{} is not the VM's snapshot device {}",
                path.display(),
                own.display()
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&own)
            .map_err(|e| Refusal(format!("{}: {e}", own.display())))?;
        let is_block = file
            .metadata()
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
        if !is_block {
            return refuse(format!("{} is not a block device", own.display()));
        }
        Ok(file)
    }

    /// A CPU quota (percent of one CPU) no larger than the host's CPUs.
    pub fn cpu_quota(&self, quota: u32) -> Result<u32, Refusal> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        if quota == 0 || quota > cpus * 100 {
            return refuse(format!(
                "a CPU quota of {quota}% is outside 1..={}% (this host has {cpus} CPUs)",
                cpus * 100
            ));
        }
        Ok(quota)
    }

    /// A VM name: a DNS label (it names jails and devices).
    pub fn vm_name(&self, vm: &str) -> Result<(), Refusal> {
        if !banger_proto::is_dns_label(vm) {
            return refuse(format!("`{vm}` is not a VM name (a DNS label)"));
        }
        Ok(())
    }

    /// A subnet inside the private ranges: the helper never routes or NATs
    /// addresses someone else owns.
    pub fn subnet(&self, text: &str) -> Result<Subnet, Refusal> {
        let subnet = Subnet::parse(text).map_err(Refusal)?;
        let private = PRIVATE.iter().any(|&(addr, prefix)| {
            let range = Subnet {
                addr: addr.into(),
                prefix,
            };
            subnet.prefix >= prefix && range.contains(subnet.network())
        });
        if !private {
            return refuse(format!(
                "{subnet} is not inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
            ));
        }
        Ok(subnet)
    }

    /// DNS is served by the unprivileged daemon, so on an unprivileged port.
    pub fn dns_port(&self, port: u16) -> Result<u16, Refusal> {
        if port < 1024 {
            return refuse(format!("DNS port {port} is privileged; use 1024 or above"));
        }
        Ok(port)
    }
}

/// Root may name anything; anyone else only what they own.
fn owned_by(caller: &Caller, path: &Path, meta: &std::fs::Metadata) -> Result<(), Refusal> {
    if caller.uid != 0 && meta.uid() != caller.uid {
        return refuse(format!(
            "{} belongs to uid {}, not to the caller (uid {})",
            path.display(),
            meta.uid(),
            caller.uid
        ));
    }
    Ok(())
}

/// Runs `f` with this thread's file-system identity set to the caller's, so
/// permission checks are the caller's own.
pub fn as_caller<T>(caller: &Caller, f: impl FnOnce() -> T) -> T {
    // SAFETY: setfsuid/setfsgid change only this thread's file-system ids;
    // each returns the previous value, restored below.
    let (old_gid, old_uid) = unsafe {
        let g = libc::setfsgid(caller.gid);
        let u = libc::setfsuid(caller.uid);
        (g, u)
    };
    let out = f();
    // SAFETY: as above, restoring the previous ids.
    unsafe {
        libc::setfsuid(old_uid as u32);
        libc::setfsgid(old_gid as u32);
    }
    out
}

fn supplementary_groups(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &Path) -> Policy {
        Policy::new(Some(1000), Some(4242), vec![dir.to_path_buf()]).unwrap()
    }

    #[test]
    fn callers_are_root_the_owner_or_the_group() {
        let p = policy(Path::new("/tmp"));
        let me = std::process::id();
        assert!(p.admits(&Caller {
            uid: 0,
            gid: 0,
            pid: me
        }));
        assert!(p.admits(&Caller {
            uid: 1000,
            gid: 1000,
            pid: me
        }));
        assert!(p.admits(&Caller {
            uid: 1001,
            gid: 4242,
            pid: me
        }));
        assert!(!p.admits(&Caller {
            uid: 1001,
            gid: 1001,
            pid: me
        }));
    }

    #[test]
    fn names_subnets_and_ports_are_checked() {
        let p = policy(Path::new("/tmp"));
        assert!(p.vm_name("web-1").is_ok());
        for bad in ["", "-x", "x-", "Web", "a/b", "../x", &"a".repeat(64)] {
            assert!(p.vm_name(bad).is_err(), "{bad}");
        }
        assert!(p.subnet("10.213.0.0/16").is_ok());
        assert!(p.subnet("172.30.0.0/16").is_ok());
        assert!(p.subnet("192.168.213.0/24").is_ok());
        for bad in ["8.8.8.0/24", "172.0.0.0/8", "10.0.0.0/7", "0.0.0.0/0"] {
            assert!(p.subnet(bad).is_err(), "{bad}");
        }
        assert!(p.dns_port(53).is_err());
        assert_eq!(p.dns_port(1053).unwrap(), 1053);
    }

    #[test]
    fn caller_files_must_be_inside_owned_regular_and_not_links() {
        let tmp = tempfile::tempdir().unwrap();
        let allowed = tmp.path().join("home");
        std::fs::create_dir(&allowed).unwrap();
        let p = policy(&allowed);
        let root = Caller {
            uid: 0,
            gid: 0,
            pid: std::process::id(),
        };
        let disk = allowed.join("disk.img");
        std::fs::write(&disk, b"x").unwrap();
        assert!(p.caller_file(&root, &disk, true).is_ok());
        // Outside, relative, through a symlink that leaves, a directory.
        let outside = tmp.path().join("outside.img");
        std::fs::write(&outside, b"x").unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("link.img")).unwrap();
        for bad in [
            outside.clone(),
            PathBuf::from("disk.img"),
            allowed.join("link.img"),
            allowed.join("../outside.img"),
            allowed.clone(),
            PathBuf::from("/etc/shadow"),
        ] {
            let err = p.caller_file(&root, &bad, false).unwrap_err();
            assert!(
                err.0.contains("outside")
                    || err.0.contains("absolute")
                    || err.0.contains("regular"),
                "{}: {err}",
                bad.display()
            );
        }
        // Someone else's file, even inside.
        let user = Caller {
            uid: 1000,
            gid: 1000,
            pid: std::process::id(),
        };
        if unsafe { libc::geteuid() } == 0 {
            let err = p.caller_file(&user, &disk, false).unwrap_err();
            assert!(err.0.contains("uid") || err.0.contains("denied"), "{err}");
        }
    }
}
