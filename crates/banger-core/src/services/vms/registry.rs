//! The VMs as records and processes: looking one up, whether its VMM lives,
//! its lock, its VMM backend, what `vm ls` shows of it, and the ssh config
//! every record feeds. Every other VM part asks here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_host::{Jails, ProcessId, ProcessLauncher};
use banger_proto::domain::NetworkMode;
use banger_proto::vm::{RootMode, VmInfo, VmNetwork, VmState, VmmKind};

use super::error::VmError;
use crate::config::Config;
use crate::error::OpResult;
use crate::locks::{KeyGuard, KeyedLocks};
use crate::paths::Paths;
use crate::services::network::NetworkService;
use crate::store::{Store, VmRecord, VmRuntime};
use crate::suggest;
use crate::vm::ssh_config;
use crate::vm::vmm::{Vmm, VmmProvider};

/// Where the work disk is mounted in every guest.
pub const WORK_MOUNT: &str = "/work";

pub struct VmRegistry {
    pub(super) paths: Paths,
    pub(super) config: Config,
    pub(super) store: Arc<Store>,
    pub(super) launcher: Arc<dyn ProcessLauncher>,
    pub(super) blockdevs: Arc<dyn banger_host::BlockDevices>,
    pub(super) network: Arc<NetworkService>,
    vmms: Arc<dyn VmmProvider>,
    /// Firecracker's jails, when its VMs run jailed.
    pub(super) jails: Option<Arc<dyn Jails>>,
    /// One per VM: held by whatever changes its state (create, start, stop, rm).
    locks: KeyedLocks,
}

impl VmRegistry {
    pub fn new(
        paths: Paths,
        config: Config,
        store: Arc<Store>,
        launcher: Arc<dyn ProcessLauncher>,
        blockdevs: Arc<dyn banger_host::BlockDevices>,
        network: Arc<NetworkService>,
        vmms: Arc<dyn VmmProvider>,
    ) -> VmRegistry {
        VmRegistry {
            paths,
            config,
            store,
            launcher,
            blockdevs,
            network,
            vmms,
            jails: None,
            locks: KeyedLocks::default(),
        }
    }

    pub fn with_jails(mut self, jails: Option<Arc<dyn Jails>>) -> VmRegistry {
        self.jails = jails;
        self
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.paths.state_dir.join("vms")
    }

    pub async fn lock(&self, name: &str) -> KeyGuard {
        self.locks.lock(name).await
    }

    /// The VM's lock if nobody holds it (a start or stop in progress does).
    pub fn try_lock(&self, name: &str) -> Option<KeyGuard> {
        self.locks.try_lock(name)
    }

    /// The VM's lock for an operation that must end: waits at most `limit`
    /// for whoever holds it (a start, a key push to a frozen guest), then
    /// kills the VM's VMM so the holder fails fast, and takes the lock.
    pub async fn lock_or_kill(&self, name: &str, limit: Duration) -> KeyGuard {
        let lock = self.locks.handle(name);
        if let Ok(guard) = tokio::time::timeout(limit, lock.clone().lock_owned()).await {
            return guard;
        }
        if let Ok(Some(rt)) = self.store.get_runtime(name) {
            tracing::warn!(vm = name, "the VM is busy past the limit; killing its VMM");
            self.kill(&rt).await;
        }
        lock.lock_owned().await
    }

    /// Stops a VM's VMM process: TERM, then KILL; returns once it is gone.
    pub async fn kill(&self, rt: &VmRuntime) {
        let stop = self.stopper(&rt.name, rt.process(), rt.jailed);
        let _ = tokio::task::spawn_blocking(stop).await;
    }

    /// What stops one VMM process, blocking: a jailed one is signalled
    /// through its jail (the helper signals only what it launched).
    pub fn stopper(
        &self,
        vm: &str,
        pid: ProcessId,
        jailed: bool,
    ) -> impl FnOnce() + Send + 'static {
        let launcher = self.launcher.clone();
        let jails = self.jails.clone().filter(|_| jailed);
        let vm = vm.to_string();
        move || match jails {
            Some(jails) => terminate(
                |signal| {
                    if let Err(e) = jails.signal(&vm, signal) {
                        tracing::warn!(vm = %vm, error = %e, "cannot signal the jailed VMM");
                    }
                },
                || launcher.alive(pid),
            ),
            None => kill_and_wait(launcher.as_ref(), pid),
        }
    }

    /// The backend a VM of this kind runs on.
    pub fn vmm(&self, kind: VmmKind) -> OpResult<Box<dyn Vmm>> {
        Ok(self.vmms.vmm(kind)?)
    }

    pub fn record(&self, name: &str) -> OpResult<VmRecord> {
        if let Some(vm) = self.store.get_vm(name)? {
            return Ok(vm);
        }
        let all = self.store.list_vms().unwrap_or_default();
        let hint = match suggest::closest(name, all.iter().map(|v| v.name.as_str())) {
            Some(near) => format!("; did you mean `{near}`?"),
            None => "; `banger vm ls` lists VMs".into(),
        };
        Err(VmError::NotFound {
            name: name.into(),
            hint,
        }
        .into())
    }

    /// The live VMM of a VM, if it has one. A stale handle is cleared on the way.
    pub fn live(&self, name: &str) -> OpResult<Option<VmRuntime>> {
        let Some(rt) = self.store.get_runtime(name)? else {
            return Ok(None);
        };
        if self.launcher.alive(rt.process()) {
            return Ok(Some(rt));
        }
        match self.record(name) {
            Ok(vm) => self.release(&vm, &rt)?,
            Err(_) => self.store.clear_runtime(name)?,
        }
        Ok(None)
    }

    /// The VM by this name if it runs: the one answer to "is it running"
    /// that every command needing a guest asks.
    pub fn running(&self, name: &str) -> OpResult<VmRecord> {
        let vm = self.record(name)?;
        match self.live(name)? {
            Some(rt) if rt.paused => Err(VmError::Paused(vm.name).into()),
            Some(_) => Ok(vm),
            None => Err(VmError::Stopped(vm.name).into()),
        }
    }

    /// What a VMM that is gone leaves to tidy: its runtime row, its tap and
    /// route, its run files.
    pub fn release(&self, vm: &VmRecord, rt: &VmRuntime) -> OpResult<()> {
        self.store.clear_runtime(&vm.name)?;
        self.network.detach(rt.tap.as_deref(), vm.ip.as_deref());
        if rt.jailed {
            self.unjail(&vm.name);
        }
        self.clean_run_files(vm);
        Ok(())
    }

    /// Removes a VM's jail (chroot, mounts, cgroup), whatever is left of it.
    pub fn unjail(&self, name: &str) {
        if let Some(jails) = &self.jails {
            if let Err(e) = jails.teardown(name) {
                tracing::warn!(vm = name, error = %e, "could not remove the VM's jail");
            }
        }
    }

    /// Removes what exists only while a VM runs: its VMM's sockets, the
    /// per-boot initramfs, a root snapshot's device.
    pub fn clean_run_files(&self, vm: &VmRecord) {
        let files = self.vmm(vm.vmm).map(|v| v.run_files()).unwrap_or(&[]);
        remove_run_files(Path::new(&vm.dir), files);
        if vm.root_mode == RootMode::DmSnapshot {
            let state = Path::new(&vm.dir).join("dm.state");
            if let Err(e) = self
                .blockdevs
                .teardown_snapshot(&self.snapshot_owner(&vm.name), &state)
            {
                tracing::warn!(vm = %vm.name, error = %e, "could not tear down the root snapshot");
            }
        }
    }

    pub fn info(&self, vm: &VmRecord) -> OpResult<VmInfo> {
        let rt = self.live(&vm.name)?;
        self.info_with(vm, rt)
    }

    /// [`Self::info`] for a caller that has just read the VM's runtime.
    pub fn info_with(&self, vm: &VmRecord, rt: Option<VmRuntime>) -> OpResult<VmInfo> {
        let problem = match &rt {
            Some(_) => self
                .vmm(vm.vmm)
                .ok()
                .and_then(|v| v.problem(Path::new(&vm.dir)))
                .map(|why| {
                    format!(
                        "{why}; free space on the filesystem holding {} (`df -h {}`), then \
                         `banger vm restart {}`",
                        vm.dir, vm.dir, vm.name
                    )
                }),
            None => None,
        };
        Ok(VmInfo {
            name: vm.name.clone(),
            state: match (&rt, &problem) {
                (None, _) => VmState::Stopped,
                (Some(rt), None) if !rt.paused => VmState::Running,
                (Some(_), _) => VmState::Paused,
            },
            problem,
            image: vm.image.clone(),
            kernel: vm.kernel.clone(),
            vmm: vm.vmm,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_bytes: vm.disk_bytes,
            root_mode: vm.root_mode,
            dir: vm.dir.clone(),
            work_mount: WORK_MOUNT.into(),
            pid: rt.as_ref().map(|r| r.pid),
            created_at: vm.created_at.clone(),
            started_at: rt.as_ref().map(|r| r.started_at.clone()),
            started_from: rt.as_ref().and_then(|r| r.started_from.clone()),
            ip: vm.ip.clone(),
            host_key: Some(vm.host_key_pub.trim().to_string()),
            network: rt.as_ref().and_then(|r| r.network).map(|mode| VmNetwork {
                mode,
                lacks: match mode {
                    NetworkMode::User => crate::services::network::USER_MODE_LACKS
                        .map(String::from)
                        .to_vec(),
                    _ => Vec::new(),
                },
            }),
            jail: rt
                .as_ref()
                .filter(|r| r.jailed)
                .and_then(|_| self.vmm(vm.vmm).ok()?.jail_root(Path::new(&vm.dir)))
                .map(|p| p.display().to_string()),
            cpu_quota: vm.cpu_quota,
            tap: rt.and_then(|r| r.tap),
            workspace: self.store.get_workspace(&vm.name)?.map(Into::into),
        })
    }

    pub fn list(&self) -> OpResult<Vec<VmInfo>> {
        self.store
            .list_vms()?
            .iter()
            .map(|v| self.info(v))
            .collect()
    }

    /// The records of the VMs whose VMM runs now.
    pub fn running_records(&self) -> Vec<VmRecord> {
        self.store
            .list_runtimes()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|rt| self.store.get_vm(&rt.name).ok().flatten())
            .collect()
    }

    /// Rewrites the ssh config file and known_hosts from the VM records.
    pub fn write_ssh_config(&self) {
        let entries: Vec<ssh_config::Entry> = match self.store.list_vms() {
            Ok(vms) => vms
                .into_iter()
                .filter_map(|vm| {
                    Some(ssh_config::Entry {
                        ip: vm.ip?,
                        name: vm.name,
                        host_key: vm.host_key_pub,
                    })
                })
                .collect(),
            Err(_) => return,
        };
        if let Err(e) = ssh_config::write(&entries, self.network.domain(), &self.paths.state_dir) {
            tracing::warn!(error = %e, "cannot write the ssh config file");
        }
    }
}

/// TERM, a second to go, then KILL; blocks until the process is gone.
pub fn kill_and_wait(launcher: &dyn ProcessLauncher, pid: ProcessId) {
    terminate(
        |signal| {
            let _ = launcher.signal(pid, signal);
        },
        || launcher.alive(pid),
    )
}

/// TERM, a second to go, then KILL, by whatever way `signal` reaches the
/// process; blocks until `alive` says it is gone (or five more seconds).
pub fn terminate(signal: impl Fn(i32), alive: impl Fn() -> bool) {
    signal(libc::SIGTERM);
    for _ in 0..40 {
        if !alive() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    signal(libc::SIGKILL);
    for _ in 0..200 {
        if !alive() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

impl VmRegistry {
    /// Whose a VM's root snapshot device is: this daemon's uid, its state
    /// directory and the VM (the helper puts in the caller's uid itself).
    pub fn snapshot_owner(&self, vm: &str) -> banger_host::SnapshotOwner {
        banger_host::SnapshotOwner {
            uid: nix::unistd::geteuid().as_raw(),
            home: banger_proto::jail::home_id(&self.paths.state_dir),
            vm: vm.to_string(),
        }
    }
}

/// What exists only while a VM runs: the VMM's sockets and the per-boot initramfs.
pub fn remove_run_files(dir: &Path, vmm_files: &[&str]) {
    for f in vmm_files.iter().copied().chain(["initrd.cpio"]) {
        let _ = std::fs::remove_file(dir.join(f));
    }
}
