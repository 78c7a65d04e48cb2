//! Firecracker's jailer. Each jailed VM gets `<base>/<firecracker>/<vm>/root`,
//! the VM's files linked into it (bind-mounted when they live on another
//! filesystem), its own cgroup, and a record of the process launched, so
//! that only that process is ever signalled. This runs as root: in the root
//! helper for a user's daemon, in-process for a root daemon.
//!
//! The jailer trusts its inputs; whoever calls [`RealJails`] has checked
//! them (the helper's policy), and every path handed to the jailer is built
//! here from checked parts.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use banger_proto::jail::{is_jail_name, JailFile, JailRequest, FIRECRACKER_ARGS};
use serde::{Deserialize, Serialize};

use crate::acl;
use crate::jail_ids::JailIds;
use crate::process::HostError;
use crate::vmm_process::{is_alive as alive, ProcessId};

/// Jailed Firecrackers: launched, signalled and torn down by VM name.
pub trait Jails: Send + Sync {
    /// The chroot base: VM `vm` of a Firecracker named `fc` has its root at
    /// `<base>/<fc>/<vm>/root`.
    fn base(&self) -> PathBuf;
    fn launch(&self, request: &JailRequest) -> Result<ProcessId, HostError>;
    /// Signals the process launched for `vm`, if it still runs.
    fn signal(&self, vm: &str, signal: i32) -> Result<(), HostError>;
    /// Kills what still runs in `vm`'s jail and removes the jail: its
    /// directory, mounts and cgroups. Nothing there is not an error.
    fn teardown(&self, vm: &str) -> Result<(), HostError>;
}

/// The jail directory of `vm` (its `root` is what Firecracker sees as `/`).
pub fn jail_dir(base: &Path, firecracker: &Path, vm: &str) -> PathBuf {
    let name = firecracker
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "firecracker".into());
    base.join(name).join(vm)
}

/// A file of the request, opened and checked by the caller.
pub struct Opened {
    pub file: File,
    pub name: String,
    pub writable: bool,
}

/// What the helper keeps of each jail it launched: enough to signal only
/// that process and to undo everything after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailRecord {
    pub vm: String,
    pub dir: PathBuf,
    pub pid: u32,
    pub start_time: u64,
    pub cgroups: Vec<PathBuf>,
    /// The uid (and gid) the jail's Firecracker runs as: its own.
    #[serde(default)]
    pub jail_uid: Option<u32>,
    /// The tap lent to that uid, given back at teardown.
    #[serde(default)]
    pub tap: Option<String>,
}

impl JailRecord {
    fn process(&self) -> ProcessId {
        ProcessId {
            pid: self.pid,
            start_time: self.start_time,
        }
    }
}

/// The jailer run for real, for one user's VMs, each jailed as a uid of
/// its own.
pub struct RealJails {
    pub jailer: PathBuf,
    pub base: PathBuf,
    /// Root-only: one JSON record per jail.
    pub records: PathBuf,
    /// The daemon's user, whose files the VMs use: granted the jail's
    /// sockets (it drives Firecracker), given back the tap after.
    pub uid: u32,
    pub gid: u32,
    /// The cgroup every jail's own cgroup is made under.
    pub cgroup_parent: String,
    /// Where each jail's own uid comes from, and the host-wide lock its
    /// choice is made under.
    pub ids: JailIds,
    pub ids_lock: PathBuf,
}

/// Memory a VMM uses beyond its guest's (its own, virtio queues, page tables).
pub const VMM_OVERHEAD_MIB: u64 = 128;

impl RealJails {
    fn record_path(&self, vm: &str) -> PathBuf {
        self.records.join(format!("{vm}.json"))
    }

    /// Whether the process launched for `vm` still runs.
    pub fn running(&self, vm: &str) -> bool {
        self.record(vm).is_some_and(|r| alive(r.process()))
    }

    pub fn record(&self, vm: &str) -> Option<JailRecord> {
        let text = std::fs::read(self.record_path(vm)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write_record(&self, record: &JailRecord) -> Result<(), HostError> {
        let path = self.record_path(&record.vm);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(record).expect("serialises"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| failed("recording the jail", e))
    }

    /// Every jail recorded here (for a sweep after a restart).
    pub fn recorded(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.records) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                name.strip_suffix(".json").map(str::to_string)
            })
            .collect()
    }

    /// Launches with files the caller already opened (and checked).
    pub fn launch_opened(
        &self,
        request: &JailRequest,
        files: Vec<Opened>,
        console: File,
    ) -> Result<ProcessId, HostError> {
        let vm = &request.vm;
        if !banger_proto::is_dns_label(vm) {
            return Err(HostError::Refused(format!("`{vm}` is not a VM name")));
        }
        if let Some(old) = self.record(vm) {
            if alive(old.process()) {
                return Err(HostError::Refused(format!(
                    "a jailed firecracker for VM `{vm}` still runs (pid {}); stop it first",
                    old.pid
                )));
            }
        }
        // What an earlier run left (a crash) goes first.
        self.teardown(vm)?;
        let dir = jail_dir(&self.base, &request.firecracker, vm);
        let root = dir.join("root");
        make_dirs(&self.base, &root)?;
        let cgroups = Cgroups::detect();
        let (cgroup_args, cgroup_dirs) = cgroups.args(&request.limits, &self.cgroup_parent, vm)?;
        std::fs::create_dir_all(&self.records).map_err(|e| failed("the jail records", e))?;
        // The jail's own uid, held by the lock until its Firecracker runs
        // as it (or the launch failed).
        let recorded = self.recorded_uids();
        let (jail_uid, _choosing) = self
            .ids
            .choose(&self.ids_lock, |id| recorded.contains(&id))
            .map_err(|e| HostError::Refused(e.to_string()))?;
        // Recorded before anything is made inside, so a crash from here on
        // is undone by the next teardown.
        let mut record = JailRecord {
            vm: vm.clone(),
            dir: dir.clone(),
            pid: 0,
            start_time: 0,
            cgroups: cgroup_dirs,
            jail_uid: Some(jail_uid),
            tap: request.tap.clone(),
        };
        self.write_record(&record)?;
        let made = (|| {
            for f in &files {
                expose(f, &root.join(&f.name), jail_uid)?;
            }
            if let Some(tap) = &request.tap {
                crate::tap_owner::set_owner(tap, jail_uid)
                    .map_err(|e| failed(&format!("lending tap {tap} to the jail"), e))?;
            }
            self.spawn(request, jail_uid, &cgroup_args, console)
        })();
        let id = match made {
            Ok(id) => id,
            Err(e) => {
                let _ = self.teardown(vm);
                return Err(e);
            }
        };
        record.pid = id.pid;
        record.start_time = id.start_time;
        self.write_record(&record)?;
        // Answered once the jail is up (its root handed to the VM's uid,
        // Firecracker's API socket made), so the caller may use it at once.
        if let Err(e) = wait_for(&root.join("fc.sock"), id, JAIL_UP)
            .and_then(|()| self.let_the_user_in(&root, jail_uid))
        {
            let _ = self.teardown(vm);
            return Err(e);
        }
        Ok(id)
    }

    /// The daemon's user drives the jail's Firecracker through sockets in
    /// its root, which the jailer gave the jail's uid alone (0700): the
    /// user is granted the root, the API socket, and (by a default ACL)
    /// whatever either side makes there from now on, so the vsock sockets
    /// Firecracker makes and the listener the daemon binds reach both.
    fn let_the_user_in(&self, root: &Path, jail_uid: u32) -> Result<(), HostError> {
        let denied = |e| failed("letting the daemon's user into the jail", e);
        let dir = File::open(root).map_err(denied)?;
        let mut uids = vec![jail_uid];
        if self.uid != 0 {
            acl::grant(&dir, self.uid, acl::RWX).map_err(denied)?;
            acl::grant_at(&root.join("fc.sock"), self.uid, acl::RWX).map_err(denied)?;
            uids.push(self.uid);
        }
        acl::inherit(&dir, &uids).map_err(denied)
    }

    /// The jail uids this user's records name (other users' and homes'
    /// jails are found by their running processes).
    fn recorded_uids(&self) -> Vec<u32> {
        self.recorded()
            .iter()
            .filter_map(|vm| self.record(vm))
            .filter_map(|r| r.jail_uid)
            .collect()
    }

    fn spawn(
        &self,
        request: &JailRequest,
        jail_uid: u32,
        cgroup_args: &[String],
        console: File,
    ) -> Result<ProcessId, HostError> {
        use std::os::unix::process::CommandExt;
        let program = self.jailer.display().to_string();
        let err = console
            .try_clone()
            .map_err(|e| HostError::spawn(&program, e))?;
        let mut cmd = std::process::Command::new(&self.jailer);
        cmd.arg("--id")
            .arg(&request.vm)
            .arg("--exec-file")
            .arg(&request.firecracker)
            .arg("--uid")
            .arg(jail_uid.to_string())
            .arg("--gid")
            .arg(jail_uid.to_string())
            .arg("--chroot-base-dir")
            .arg(&self.base)
            .args(cgroup_args)
            .arg("--")
            .args(FIRECRACKER_ARGS)
            .stdin(std::process::Stdio::null())
            .stdout(console)
            .stderr(err)
            .current_dir("/")
            .env_clear()
            // As the daemon's own VMMs: away from a terminal's Ctrl-C.
            .process_group(0);
        // Sockets Firecracker makes (API, vsock) are then group-writable,
        // which their ACL's mask is taken from: the user's entry counts.
        // SAFETY: umask(2) only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o007);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| HostError::spawn(&program, e))?;
        // No --daemonize: the jailer execs Firecracker as this very process.
        Ok(crate::vmm_process::detach(child))
    }
}

impl Jails for RealJails {
    fn base(&self) -> PathBuf {
        self.base.clone()
    }

    /// Opens the request's files itself: a root daemon trusts its own.
    fn launch(&self, request: &JailRequest) -> Result<ProcessId, HostError> {
        let mut opened = Vec::new();
        for f in &request.files {
            opened.push(open_file(f)?);
        }
        let console = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&request.console)
            .map_err(|e| failed(&format!("opening {}", request.console.display()), e))?;
        self.launch_opened(request, opened, console)
    }

    fn signal(&self, vm: &str, signal: i32) -> Result<(), HostError> {
        let Some(record) = self.record(vm) else {
            return Err(HostError::Refused(format!(
                "no jailed firecracker was launched for VM `{vm}`"
            )));
        };
        if alive(record.process()) {
            // SAFETY: kill(2) on the process launched for this jail, whose
            // start time still matches (not a recycled pid).
            unsafe { libc::kill(record.pid as i32, signal) };
        }
        Ok(())
    }

    fn teardown(&self, vm: &str) -> Result<(), HostError> {
        if !banger_proto::is_dns_label(vm) {
            return Err(HostError::Refused(format!("`{vm}` is not a VM name")));
        }
        let record = self.record(vm);
        if let Some(r) = &record {
            kill_and_wait(r.process());
        }
        let mut dirs: Vec<PathBuf> = record.iter().map(|r| r.dir.clone()).collect();
        // A jail whose record was lost (the helper's records live in /run).
        if let Ok(execs) = std::fs::read_dir(&self.base) {
            for exec in execs.flatten() {
                let dir = exec.path().join(vm);
                if dir.is_dir() && !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
        for dir in &dirs {
            // Whatever still runs with its root in the jail (a launch whose
            // record never got its pid).
            for pid in rooted_in(&dir.join("root")) {
                kill_and_wait(pid);
            }
            // The jailer gave the jail's root to its uid: that is the uid
            // whose grants go, when the record that names it was lost.
            let jail_uid = record.as_ref().and_then(|r| r.jail_uid).or_else(|| {
                std::fs::symlink_metadata(dir.join("root"))
                    .ok()
                    .map(|m| m.uid())
            });
            if let Some(uid) = jail_uid.filter(|u| self.ids.contains(*u)) {
                revoke_files(&dir.join("root"), uid);
            }
            unmount_under(dir)?;
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed(&format!("removing {}", dir.display()), e)),
            }
        }
        if let Some(tap) = record.as_ref().and_then(|r| r.tap.as_deref()) {
            // Back to the user's pool; a tap already gone is nothing to do.
            if let Err(e) = crate::tap_owner::set_owner(tap, self.uid) {
                tracing::warn!(tap, error = %e, "cannot give a jail's tap back");
            }
        }
        let cgroups = match &record {
            Some(r) => r.cgroups.clone(),
            None => Cgroups::detect().dirs(&self.cgroup_parent, vm),
        };
        let depth = Path::new(&self.cgroup_parent).components().count();
        for cg in cgroups {
            // Empty once its process is gone: a process still exiting (a
            // VM removed during its boot) keeps it busy for a moment, so
            // the jail's own cgroup is waited for. The parents, which other
            // jails may still use, are removed only if empty.
            remove_cgroup(&cg);
            for dir in cg.ancestors().skip(1).take(depth) {
                let _ = std::fs::remove_dir(dir);
            }
        }
        match std::fs::remove_file(self.record_path(vm)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(failed("removing the jail record", e)),
        }
    }
}

/// Removes a jail's own cgroup, waiting up to a second while the kernel
/// says it is busy (its last process not yet gone from it).
fn remove_cgroup(dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match std::fs::remove_dir(dir) {
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "a jail's cgroup stays");
                return;
            }
            _ => return,
        }
    }
}

/// How long a jailer may take to set up the jail and start Firecracker.
pub const JAIL_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for `path` to appear while `id` lives.
fn wait_for(path: &Path, id: ProcessId, limit: std::time::Duration) -> Result<(), HostError> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if path.exists() {
            return Ok(());
        }
        let why = if !alive(id) {
            "the jailer exited before Firecracker's API socket was up"
        } else if std::time::Instant::now() > deadline {
            "Firecracker's API socket did not come up in its jail"
        } else {
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        };
        return Err(HostError::Failed {
            command: "jailer".into(),
            status: "failed".into(),
            stderr: format!("{why} (its words are in the VM's console log)"),
        });
    }
}

fn failed(what: &str, e: std::io::Error) -> HostError {
    HostError::Failed {
        command: what.to_string(),
        status: "error".into(),
        stderr: e.to_string(),
    }
}

fn kill_and_wait(id: ProcessId) {
    if !alive(id) {
        return;
    }
    // SAFETY: the process is the recorded one (same start time).
    unsafe { libc::kill(id.pid as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while alive(id) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Opens one of a request's files for a root caller (no policy: the
/// helper opens its callers' files through its own).
fn open_file(f: &JailFile) -> Result<Opened, HostError> {
    if !is_jail_name(&f.name) {
        return Err(HostError::Refused(format!(
            "`{}` is not a file name for a jail",
            f.name
        )));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(f.writable)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&f.path)
        .map_err(|e| failed(&format!("opening {}", f.path.display()), e))?;
    Ok(Opened {
        file,
        name: f.name.clone(),
        writable: f.writable,
    })
}

/// `<base>/<fc>/<vm>/root`, each level root-owned: 0755 down to the VM's
/// directory (the VM's uid walks through), the root itself 0700 (the
/// jailer gives it to that uid).
fn make_dirs(base: &Path, root: &Path) -> Result<(), HostError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o755);
    let mut at = PathBuf::new();
    for part in root.components() {
        at.push(part);
        if at == root {
            builder.mode(0o700);
        }
        match builder.create(&at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if at.starts_with(base) {
                    check_root_dir(&at)?;
                }
            }
            Err(e) => return Err(failed(&format!("creating {}", at.display()), e)),
        }
    }
    Ok(())
}

/// A directory on the way to a jail: a real directory, root's, and not
/// writable by anyone else (else it could be swapped for a link).
fn check_root_dir(path: &Path) -> Result<(), HostError> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| failed(&format!("checking {}", path.display()), e))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(HostError::Refused(format!(
            "{} must be a directory owned by root and writable only by it",
            path.display()
        )));
    }
    Ok(())
}

/// Takes the jail uid's grants off the files in a jail's root (the VM's
/// own, hard-linked or bound in): best effort, a read-only bind refuses.
fn revoke_files(root: &Path, uid: u32) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file {
            if let Err(e) = acl::revoke_at(&entry.path(), uid) {
                tracing::debug!(file = %entry.path().display(), error = %e, "a jail uid's grant stays");
            }
        }
    }
}

/// Puts an opened file at `target`: a hard link on the same filesystem,
/// otherwise a bind mount (read-only unless writable), the jail's uid
/// granted it (read, or read and write); a block device (a dm snapshot) as
/// a node with its numbers, owned by the jail's uid.
fn expose(f: &Opened, target: &Path, uid: u32) -> Result<(), HostError> {
    let gid = uid;
    use std::os::unix::ffi::OsStrExt;
    let meta = f.file.metadata().map_err(|e| failed("stat", e))?;
    let c_target = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|_| HostError::Refused("a path with a NUL byte".into()))?;
    if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        let mode = libc::S_IFBLK | if f.writable { 0o600 } else { 0o400 };
        // SAFETY: plain syscalls on a NUL-terminated path we built.
        let made = unsafe { libc::mknod(c_target.as_ptr(), mode, meta.rdev()) };
        if made != 0 {
            return Err(failed("mknod", std::io::Error::last_os_error()));
        }
        // SAFETY: as above.
        if unsafe { libc::chown(c_target.as_ptr(), uid, gid) } != 0 {
            return Err(failed("chown", std::io::Error::last_os_error()));
        }
        return Ok(());
    }
    if !meta.is_file() {
        return Err(HostError::Refused(format!(
            "{} is neither a regular file nor a block device",
            f.name
        )));
    }
    let perm = if f.writable { acl::RW } else { acl::R };
    acl::grant(&f.file, uid, perm).map_err(|e| {
        failed(
            &format!(
                "granting the jail's uid {uid} {} (the filesystem must keep ACLs)",
                f.name
            ),
            e,
        )
    })?;
    use std::os::fd::AsRawFd;
    let by_fd =
        std::ffi::CString::new(format!("/proc/self/fd/{}", f.file.as_raw_fd())).expect("no NUL");
    // SAFETY: linkat on a descriptor path and a NUL-terminated target.
    let linked = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            by_fd.as_ptr(),
            libc::AT_FDCWD,
            c_target.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if linked == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EXDEV) {
        return Err(failed(&format!("linking {} into the jail", f.name), err));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .map_err(|e| failed(&format!("creating {}", target.display()), e))?;
    // SAFETY: mount(2) with NUL-terminated strings we built.
    let bound = unsafe {
        libc::mount(
            by_fd.as_ptr(),
            c_target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if bound != 0 {
        return Err(failed(
            &format!("bind-mounting {} into the jail", f.name),
            std::io::Error::last_os_error(),
        ));
    }
    if !f.writable {
        // SAFETY: as above; a remount of the bind just made.
        let ro = unsafe {
            libc::mount(
                std::ptr::null(),
                c_target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if ro != 0 {
            return Err(failed(
                "remounting read-only",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Unmounts every mount at or below `dir`, deepest first.
fn unmount_under(dir: &Path) -> Result<(), HostError> {
    use std::os::unix::ffi::OsStrExt;
    let mut points: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: umount2 on a NUL-terminated path read from mountinfo.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(failed(
                &format!("unmounting {}", p.display()),
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// The mount points of this mount namespace.
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_octal(p)))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(v) = u8::from_str_radix(&text[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Processes whose root directory is `root`. Compared by device and inode:
/// a pivot_root into a mount namespace of its own shows as `/` to a reader.
fn rooted_in(root: &Path) -> Vec<ProcessId> {
    let Ok(want) = std::fs::metadata(root).map(|m| (m.dev(), m.ino())) else {
        return Vec::new();
    };
    crate::vmm_process::processes_where(|pid| {
        std::fs::metadata(format!("/proc/{pid}/root")).is_ok_and(|m| (m.dev(), m.ino()) == want)
    })
}

/// The host's cgroup layout, as the jailer will use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// The unified hierarchy with its controllers, at this mount.
    V2(PathBuf, Vec<String>),
    /// One mount per controller set.
    V1(Vec<(Vec<String>, PathBuf)>),
    None,
}

impl Cgroups {
    pub fn detect() -> Cgroups {
        Self::parse(&std::fs::read_to_string("/proc/mounts").unwrap_or_default())
    }

    /// From /proc/mounts: v2 when its hierarchy has the cpu or memory
    /// controller (a hybrid host's unified mount often has neither), else
    /// the v1 mounts.
    pub fn parse(mounts: &str) -> Cgroups {
        let mut v1 = Vec::new();
        let mut v2 = None;
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let at = PathBuf::from(unescape_octal(f[1]));
            match f[2] {
                "cgroup2" => {
                    let controllers: Vec<String> =
                        std::fs::read_to_string(at.join("cgroup.controllers"))
                            .unwrap_or_default()
                            .split_whitespace()
                            .map(str::to_string)
                            .collect();
                    if controllers.iter().any(|c| c == "cpu" || c == "memory") {
                        v2 = Some(Cgroups::V2(at, controllers));
                    }
                }
                "cgroup" => {
                    let controllers = f[3]
                        .split(',')
                        .filter(|o| matches!(*o, "cpu" | "memory" | "cpuacct" | "cpuset" | "pids"))
                        .map(str::to_string)
                        .collect::<Vec<_>>();
                    if !controllers.is_empty() {
                        v1.push((controllers, at));
                    }
                }
                _ => {}
            }
        }
        match v2 {
            Some(v2) => v2,
            None if v1.is_empty() => Cgroups::None,
            None => Cgroups::V1(v1),
        }
    }

    fn has(&self, controller: &str) -> bool {
        match self {
            Cgroups::V2(_, c) => c.iter().any(|c| c == controller),
            Cgroups::V1(mounts) => mounts
                .iter()
                .any(|(c, _)| c.iter().any(|c| c == controller)),
            Cgroups::None => false,
        }
    }

    /// The jailer's cgroup arguments for `limits`, and the cgroup
    /// directories it will make. A CPU quota the host cannot enforce is an
    /// error; the memory ceiling is a safeguard, skipped where there is no
    /// memory controller.
    pub fn args(
        &self,
        limits: &banger_proto::jail::JailLimits,
        parent: &str,
        vm: &str,
    ) -> Result<(Vec<String>, Vec<PathBuf>), HostError> {
        let v2 = matches!(self, Cgroups::V2(..));
        let mut props = Vec::new();
        let mut used = Vec::new();
        if let Some(q) = limits.cpu_quota {
            if !self.has("cpu") {
                return Err(HostError::Refused(
                    "a CPU quota needs the cpu cgroup controller, which this host lacks".into(),
                ));
            }
            let quota = u64::from(q) * 1000;
            props.push(if v2 {
                format!("cpu.max={quota} 100000")
            } else {
                format!("cpu.cfs_quota_us={quota}")
            });
            used.push("cpu");
        }
        if let Some(mib) = limits.memory_mib {
            if self.has("memory") {
                let bytes = mib << 20;
                props.push(if v2 {
                    format!("memory.max={bytes}")
                } else {
                    format!("memory.limit_in_bytes={bytes}")
                });
                used.push("memory");
            }
        }
        let version = if v2 { "2" } else { "1" };
        let mut args = vec!["--cgroup-version".to_string(), version.to_string()];
        if props.is_empty() {
            return Ok((args, Vec::new()));
        }
        args.push("--parent-cgroup".into());
        args.push(parent.to_string());
        for p in props {
            args.push("--cgroup".into());
            args.push(p);
        }
        let dirs = self
            .dirs(parent, vm)
            .into_iter()
            .filter(|d| match self {
                Cgroups::V1(mounts) => mounts.iter().any(|(c, at)| {
                    d.starts_with(at) && c.iter().any(|c| used.contains(&c.as_str()))
                }),
                _ => true,
            })
            .collect();
        Ok((args, dirs))
    }

    /// Where the jailer makes the cgroup of `vm`, per hierarchy.
    pub fn dirs(&self, parent: &str, vm: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2(at, _) => vec![at.join(parent).join(vm)],
            Cgroups::V1(mounts) => mounts
                .iter()
                .filter(|(c, _)| c.iter().any(|c| c == "cpu" || c == "memory"))
                .map(|(_, at)| at.join(parent).join(vm))
                .collect(),
            Cgroups::None => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JailCall {
    Launch(JailRequest),
    Signal(String, i32),
    Teardown(String),
}

/// Records calls. A launch "runs" in the given fake launcher (so the
/// core's liveness checks see it) until signalled with KILL or TERM or
/// torn down.
#[derive(Clone, Default)]
pub struct FakeJails {
    calls: Arc<Mutex<Vec<JailCall>>>,
    running: Arc<Mutex<Vec<(String, ProcessId)>>>,
    launcher: crate::vmm_process::FakeLauncher,
}

impl FakeJails {
    pub fn new(launcher: crate::vmm_process::FakeLauncher) -> FakeJails {
        FakeJails {
            launcher,
            ..FakeJails::default()
        }
    }
    pub fn calls(&self) -> Vec<JailCall> {
        self.calls.lock().unwrap().clone()
    }
    pub fn running(&self) -> Vec<String> {
        self.running
            .lock()
            .unwrap()
            .iter()
            .map(|(vm, _)| vm.clone())
            .collect()
    }
    fn end(&self, vm: &str) {
        let mut running = self.running.lock().unwrap();
        for (_, id) in running.iter().filter(|(v, _)| v == vm) {
            self.launcher.exit(*id);
        }
        running.retain(|(v, _)| v != vm);
    }
}

impl Jails for FakeJails {
    fn base(&self) -> PathBuf {
        PathBuf::from("/fake/jail")
    }
    fn launch(&self, request: &JailRequest) -> Result<ProcessId, HostError> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(JailCall::Launch(request.clone()));
            calls.len()
        };
        let id = ProcessId {
            pid: 200_000 + n as u32,
            start_time: 7,
        };
        self.launcher.adopt(id);
        self.running.lock().unwrap().push((request.vm.clone(), id));
        Ok(id)
    }
    fn signal(&self, vm: &str, signal: i32) -> Result<(), HostError> {
        self.calls
            .lock()
            .unwrap()
            .push(JailCall::Signal(vm.to_string(), signal));
        if signal == libc::SIGKILL || signal == libc::SIGTERM {
            self.end(vm);
        }
        Ok(())
    }
    fn teardown(&self, vm: &str) -> Result<(), HostError> {
        self.calls
            .lock()
            .unwrap()
            .push(JailCall::Teardown(vm.to_string()));
        self.end(vm);
        Ok(())
    }
}

#[cfg(test)]
#[path = "jail_tests.rs"]
mod tests;
