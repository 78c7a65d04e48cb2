//! A VM's life: create (disks, keys, record, each step undone on failure),
//! stop, restart, remove, and recovery after a daemon restart. Start, the
//! longest, has its own file (`boot.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_host::ProcessRunner;
use banger_proto::vm::{CreateParams, VmEvent, VmInfo, VmmKind};

use super::error::VmError;
use super::registry::{kill_and_wait, VmRegistry};
use super::sessions::AgentSessions;
use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::ids;
use crate::services::images::ImageService;
use crate::services::kernels::KernelService;
use crate::services::workspace::WorkspaceService;
use crate::steps::{FailPoint, Steps};
use crate::store::VmRecord;
use crate::vm::{disk, keys, name, root_mode, sizing};
use banger_proto::domain::RootMode;
use banger_proto::image::ImageInfo;
use banger_proto::kernel::KernelInfo;

/// Two: the guest agent's SSH handshake then overlaps mounting the disks,
/// which makes `vm run` to first exec faster (see scripts/bench-boot).
const DEFAULT_VCPUS: u32 = 2;
const DEFAULT_MEMORY_MIB: u64 = 512;
const MIN_DISK_BYTES: u64 = 4 << 30;
const WORK_DISK_BYTES: u64 = 8 << 30;

/// What a new VM from an image gets (see [`VmLifecycle::plan`]).
#[derive(Clone)]
pub(super) struct Plan {
    pub kernel: KernelInfo,
    pub vmm: VmmKind,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    pub work_disk_bytes: u64,
    pub root_mode: RootMode,
}

pub struct VmLifecycle {
    pub(super) registry: Arc<VmRegistry>,
    pub(super) sessions: Arc<AgentSessions>,
    pub(super) images: Arc<ImageService>,
    pub(super) kernels: Arc<KernelService>,
    pub(super) runner: Arc<dyn ProcessRunner>,
    pub(super) workspaces: Arc<WorkspaceService>,
    /// Held from choosing a new VM's address until its record is stored.
    addresses: Mutex<()>,
    fail_point: Mutex<FailPoint>,
    /// `vm stats`: each VMM's CPU time and each guest's answer, when last asked.
    pub(super) stats_cache: Arc<super::stats::StatsCache>,
}

/// Reports a step of a create or start to the caller.
pub(super) fn step(events: &Events<VmEvent>, step: &str, n: u32, of: u32) {
    tracing::info!(step, "step {n}/{of}");
    events.emit(&VmEvent::Step {
        step: step.into(),
        n,
        of,
    });
}

impl VmLifecycle {
    pub fn new(
        registry: Arc<VmRegistry>,
        sessions: Arc<AgentSessions>,
        images: Arc<ImageService>,
        kernels: Arc<KernelService>,
        runner: Arc<dyn ProcessRunner>,
        workspaces: Arc<WorkspaceService>,
    ) -> VmLifecycle {
        VmLifecycle {
            registry,
            sessions,
            images,
            kernels,
            runner,
            workspaces,
            addresses: Mutex::default(),
            fail_point: Mutex::default(),
            stats_cache: Arc::default(),
        }
    }

    /// Test seam: the next create/start steps fail at the named step.
    pub fn set_fail_point(&self, step: Option<&str>) {
        *self.fail_point.lock().unwrap_or_else(|p| p.into_inner()) =
            FailPoint(step.map(str::to_owned));
    }

    pub(super) fn fail_point(&self) -> FailPoint {
        self.fail_point
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn list(&self) -> OpResult<Vec<VmInfo>> {
        self.registry.list()
    }

    /// What `vm inspect` shows: with a workspace, each side's pending
    /// changes too (the guest's counted live while it runs).
    pub async fn inspect(&self, names: &[String]) -> OpResult<Vec<VmInfo>> {
        let vms = names
            .iter()
            .map(|n| self.registry.record(n))
            .collect::<OpResult<Vec<_>>>()?;
        let mut infos = Vec::with_capacity(vms.len());
        for vm in vms {
            let mut info = self.registry.info(&vm)?;
            let ws = match info.workspace {
                Some(_) => self.workspaces.record(&vm.name)?,
                None => None,
            };
            if let (Some(shown), Some(ws)) = (info.workspace.as_mut(), ws) {
                let session = match info.state {
                    banger_proto::vm::VmState::Running => self.sessions.session(&vm).await.ok(),
                    _ => None,
                };
                let (host, guest) = self.workspaces.pending(&vm, &ws, session.as_ref()).await?;
                shown.host_changes = Some(host);
                shown.guest_changes = guest;
            }
            infos.push(info);
        }
        Ok(infos)
    }

    /// After a daemon restart: VMs whose VMM still runs are kept (their SSH
    /// connection is re-made on first use); dead ones are marked stopped and
    /// their leftovers cleaned.
    /// A VMM that a daemon killed between spawn and the runtime row still
    /// runs unrecorded, holding its tap and disks: it is found by the VM
    /// directory on its command line and stopped.
    pub fn recover(&self) -> OpResult<()> {
        for rt in self.registry.store.list_runtimes()? {
            if self.registry.live(&rt.name)?.is_some() {
                tracing::info!(vm = %rt.name, pid = rt.pid, "re-attached to a running VM");
            } else {
                tracing::info!(vm = %rt.name, "VM died while the daemon was away; marked stopped");
            }
        }
        // A create the daemon died in (no record was written) leaves its
        // directory, which would block the name: it goes.
        let recorded: Vec<String> = self
            .registry
            .store
            .list_vms()?
            .into_iter()
            .map(|v| v.name)
            .collect();
        if let Ok(dirs) = std::fs::read_dir(self.registry.vms_dir()) {
            for entry in dirs.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !recorded.contains(&name) {
                    tracing::warn!(vm = %name, "removing a VM directory no record names (a create that did not finish)");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        for vm in self.registry.store.list_vms()? {
            if self.registry.live(&vm.name)?.is_some() {
                continue;
            }
            for orphan in self.registry.launcher.find_naming(&format!("{}/", vm.dir)) {
                tracing::warn!(
                    vm = %vm.name,
                    pid = orphan.pid,
                    "a VMM launched for this VM was never recorded (the daemon died mid-start); stopping it"
                );
                kill_and_wait(self.registry.launcher.as_ref(), orphan);
            }
            // A jailed one is found by its jail, which goes with it.
            if vm.vmm == VmmKind::Firecracker {
                self.registry.unjail(&vm.name);
            }
            // A start the daemon died in may have left its per-boot files.
            self.registry.clean_run_files(&vm);
        }
        self.remove_unfinished_snapshots();
        self.registry.write_ssh_config();
        Ok(())
    }

    /// A CPU quota is applied by the jailer's cgroup: only jailed
    /// Firecracker VMs have one, and no more than the host's CPUs.
    pub(super) fn check_cpu_quota(&self, vmm: VmmKind, quota: u32) -> OpResult<()> {
        if vmm != VmmKind::Firecracker || self.registry.jails.is_none() {
            return Err(OpError::invalid(
                "--cpu-quota is applied through Firecracker's jailer: use --vmm firecracker \
                 with the jailer on (`banger doctor` says whether it is)",
            ));
        }
        let cpus = sizing::Host::probe().cpus;
        if quota == 0 || quota > cpus * 100 {
            return Err(OpError::invalid(format!(
                "--cpu-quota {quota} is outside 1..={} (percent of one CPU; this host has {cpus})",
                cpus * 100
            )));
        }
        Ok(())
    }

    pub async fn create(&self, params: CreateParams, events: Events<VmEvent>) -> OpResult<VmInfo> {
        if let Some(snapshot) = params.from.clone() {
            return self.create_fork(params, &snapshot, events).await;
        }
        name::validate(&params.name)?;
        let _guard = self.registry.lock(&params.name).await;
        if self.registry.store.get_vm(&params.name)?.is_some() {
            return Err(VmError::Exists(params.name).into());
        }
        // Held until the record is written: `image rm` and a re-pull take
        // the same lock, so they see this VM as a user.
        let _image_guard = self.images.lock_name(&params.image).await;
        let image = self
            .images
            .inspect(std::slice::from_ref(&params.image))?
            .remove(0);
        let Plan {
            kernel,
            vmm: vmm_kind,
            vcpus,
            memory_mib,
            disk_bytes,
            work_disk_bytes,
            root_mode,
        } = self.plan(&params, &image)?;
        if params.start {
            self.registry.network.check_vmm(vmm_kind)?;
        }
        if let Some(quota) = params.cpu_quota {
            self.check_cpu_quota(vmm_kind, quota)?;
        }
        let workspace = match &params.workspace {
            Some(dir) => Some(self.workspaces.check(
                dir,
                params.workspace_path.as_deref(),
                work_disk_bytes,
            )?),
            None if params.workspace_path.is_some() => {
                return Err(OpError::invalid("--workspace-path needs --workspace DIR"))
            }
            None => None,
        };
        // Booting is the slow way: a warm template of the image, made with
        // these very settings, is forked instead (`--cold` boots anyway).
        if params.start && !params.cold && params.cpu_quota.is_none() {
            let plan = Plan {
                kernel: kernel.clone(),
                vmm: vmm_kind,
                vcpus,
                memory_mib,
                disk_bytes,
                work_disk_bytes,
                root_mode,
            };
            if let Some(template) = self.template_for(&image, &plan).await? {
                let owner = Some(image.config.user.clone()).filter(|u| !u.is_empty());
                let ws = workspace.map(|(dir, path)| (dir, path, owner));
                let guards = vec![_guard, _image_guard];
                return self
                    .fork_into(&params.name, &template, ws, guards, true, events)
                    .await;
            }
        }

        let mut steps = Steps::new(self.fail_point());
        let dir = self.new_vm_dir(&params.name, &mut steps)?;

        step(&events, "disks", 1, 2);
        // The disks are independent: the work disk's mkfs runs while the
        // root disk is made. Both are done (or failed) before any undo runs.
        steps.begin("root-disk")?;
        steps.begin("work-disk")?;
        let root = async {
            let (image_file, runner) = (PathBuf::from(&image.rootfs_path), self.runner.clone());
            let in_dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                make_root(runner.as_ref(), root_mode, &image_file, &in_dir, disk_bytes)
            })
            .await?
            .map_err(|e| OpError::writing(e, &dir))
        };
        let (work, runner) = (dir.join(disk::WORK_FILE), self.runner.clone());
        let work = async {
            tokio::task::spawn_blocking(move || {
                disk::create_empty(runner.as_ref(), &work, work_disk_bytes, "work")
            })
            .await?
            .map_err(|e| OpError::writing(e, &dir))
        };
        let (root, work) = tokio::join!(root, work);
        root?;
        work?;

        step(&events, "keys", 2, 2);
        let record = VmRecord {
            name: params.name.clone(),
            image: image.name.clone(),
            kernel: kernel.name.clone(),
            vmm: vmm_kind,
            vcpus,
            memory_mib,
            disk_bytes,
            root_mode,
            dir: dir.display().to_string(),
            host_key_pub: String::new(),
            created_at: ids::now_rfc3339(),
            ip: None,
            // The file the VM layers over, kept while the VM is, whatever
            // becomes of the image's name.
            origin: matches!(root_mode, RootMode::DmSnapshot | RootMode::Overlay)
                .then(|| image.rootfs_path.clone()),
            restore_from: None,
            cpu_quota: params.cpu_quota,
        };
        let record = self.record_new_vm(record, &mut steps)?;
        if let Some((host_dir, guest_path)) = workspace {
            // Goes with the record (ON DELETE CASCADE), undone or not. Its
            // files belong to the image's default user.
            let owner = Some(image.config.user.clone()).filter(|u| !u.is_empty());
            self.workspaces
                .attach(&record.name, host_dir, guest_path, owner)?;
        }
        steps.commit();
        self.registry.write_ssh_config();
        tracing::info!(vm = %record.name, root_mode = %record.root_mode, "VM created");
        drop(_guard);
        if params.start {
            return self.start(&record.name, events).await;
        }
        self.registry.info(&record)
    }

    /// The kernel, VMM, sizes and root mode a VM made from `image` with
    /// `params` gets: checked, never silently changed (a size the VM cannot
    /// have is refused here with the range, not at start).
    pub(super) fn plan(&self, params: &CreateParams, image: &ImageInfo) -> OpResult<Plan> {
        let kernel = self.kernels.resolve(params.kernel.as_deref())?;
        let vmm = params
            .vmm
            .or(self.registry.config.default_vmm)
            .unwrap_or(VmmKind::Qemu);
        self.registry.vmm(vmm)?.installed()?;
        let host = sizing::Host::probe();
        let vcpus = match params.vcpus {
            Some(n) => sizing::vcpus(n, vmm, host)?,
            None => DEFAULT_VCPUS.min(host.cpus.max(1)),
        };
        let memory_mib = match params.memory_mib {
            Some(mib) => sizing::memory_mib(mib, host)?,
            None => DEFAULT_MEMORY_MIB,
        };
        let disk_bytes = match params.disk_bytes {
            Some(bytes) => sizing::disk_bytes(bytes, image.size_bytes)?,
            None => MIN_DISK_BYTES.max(image.size_bytes),
        };
        let work_disk_bytes = match params.work_disk_bytes {
            Some(bytes) => sizing::work_disk_bytes(bytes)?,
            None => WORK_DISK_BYTES,
        };
        let root_mode = self.root_mode(params.root_mode, &kernel)?;
        // A snapshot device is its origin's size.
        let disk_bytes = if root_mode == RootMode::DmSnapshot {
            image.size_bytes
        } else {
            disk_bytes
        };
        Ok(Plan {
            kernel,
            vmm,
            vcpus,
            memory_mib,
            disk_bytes,
            work_disk_bytes,
            root_mode,
        })
    }

    /// Step `dir`: a new VM's directory.
    pub(super) fn new_vm_dir(&self, name: &str, steps: &mut Steps) -> OpResult<PathBuf> {
        let dir = self.registry.vms_dir().join(name);
        steps.begin("dir")?;
        std::fs::create_dir_all(self.registry.vms_dir())?;
        std::fs::create_dir(&dir)
            .map_err(|e| OpError::internal(format!("creating {}: {e}", dir.display())))?;
        let undo_dir = dir.clone();
        steps.undo("dir", move || {
            let _ = std::fs::remove_dir_all(&undo_dir);
        });
        Ok(dir)
    }

    /// Steps `host-key` and `record`: a new VM's own SSH host key and
    /// address, and its record (`record` as made so far, without them).
    pub(super) fn record_new_vm(
        &self,
        mut record: VmRecord,
        steps: &mut Steps,
    ) -> OpResult<VmRecord> {
        steps.begin("host-key")?;
        let host_key = keys::generate()?;
        keys::write_private(
            &Path::new(&record.dir).join("host_key"),
            &keys::to_openssh(&host_key)?,
        )?;
        record.host_key_pub = keys::public_openssh(&host_key)?;

        steps.begin("record")?;
        let addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        record.ip = self.registry.network.allocate()?;
        self.registry.store.insert_vm(&record)?;
        drop(addresses);
        let (store, undo_name) = (self.registry.store.clone(), record.name.clone());
        steps.undo("record", move || {
            let _ = store.delete_vm(&undo_name);
        });
        Ok(record)
    }

    /// The mode asked for if this host and kernel can give it, else their best.
    fn root_mode(&self, asked: Option<RootMode>, kernel: &KernelInfo) -> OpResult<RootMode> {
        let support = root_mode::Support::probe(
            asked,
            Some(kernel),
            self.registry.blockdevs.as_ref(),
            &self.registry.vms_dir(),
        )?;
        Ok(root_mode::choose(asked, support)?)
    }

    pub async fn stop(&self, name: &str, timeout: Duration) -> OpResult<VmInfo> {
        let _guard = self.registry.lock_or_kill(name, timeout).await;
        let vm = self.registry.record(name)?;
        self.stop_locked(&vm, timeout).await?;
        self.registry.info(&vm)
    }

    pub(super) async fn stop_locked(&self, vm: &VmRecord, timeout: Duration) -> OpResult<()> {
        let Some(rt) = self.registry.live(&vm.name)? else {
            return Ok(());
        };
        let pid = rt.process();
        if rt.paused && !timeout.is_zero() {
            // A clean stop needs the guest running.
            if let Err(e) = self.unpause(vm).await {
                tracing::warn!(vm = %vm.name, error = %e.message, "cannot resume the VM to stop it cleanly");
            }
        }
        if !timeout.is_zero() {
            // Clean first: the agent syncs and unmounts before powering off.
            let connecting = tokio::time::timeout(timeout, self.sessions.session(vm));
            if let Ok(Ok(session)) = connecting.await {
                // What the guest changed in its workspace, counted while it
                // can be: `vm rm` refuses to lose it.
                let counting = self.workspaces.record_before_stop(vm, &session);
                let _ = tokio::time::timeout(timeout / 2, counting).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), session.poweroff()).await;
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let halfway = tokio::time::Instant::now() + timeout / 2;
            let mut asked_vmm = false;
            while self.registry.launcher.alive(pid) && tokio::time::Instant::now() < deadline {
                if !asked_vmm && tokio::time::Instant::now() > halfway {
                    // The agent did not finish; ask the VMM (Ctrl-Alt-Del on Firecracker).
                    if let Ok(vmm) = self.registry.vmm(vm.vmm) {
                        vmm.request_shutdown(Path::new(&vm.dir)).await;
                    }
                    asked_vmm = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        crate::steps::kill_point("stop-kill");
        if self.registry.launcher.alive(pid) {
            tracing::warn!(vm = %vm.name, "VM did not power off in time; killing its VMM");
            self.registry.kill(&rt).await;
        }
        crate::steps::kill_point("stop-release");
        self.sessions.forget(&vm.name).await;
        self.workspaces.forget(vm).await;
        self.registry.release(vm, &rt)?;
        tracing::info!(vm = %vm.name, "VM stopped");
        Ok(())
    }

    pub async fn restart(
        &self,
        name: &str,
        timeout: Duration,
        events: Events<VmEvent>,
    ) -> OpResult<VmInfo> {
        self.stop(name, timeout).await?;
        self.start(name, events).await
    }

    /// Removes VMs. Without `force`, a running VM or an unknown name fails the
    /// whole request before anything changes; with it, running VMs are
    /// stopped first and whatever is left of half-gone ones is cleaned.
    pub async fn remove(&self, names: &[String], force: bool) -> OpResult<Vec<String>> {
        if !force {
            for name in names {
                self.registry.record(name)?;
                if self.registry.live(name)?.is_some() {
                    return Err(VmError::Running(name.clone()).into());
                }
                self.refuse_unpulled(name)?;
            }
        }
        let mut removed = Vec::new();
        for name in names {
            // rm -f always wins: a start or a guest call holding the lock
            // gets a second, then the VMM is killed under it.
            let wait = if force {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(30)
            };
            let _guard = self.registry.lock_or_kill(name, wait).await;
            let dir = self.registry.vms_dir().join(name);
            match self.registry.store.get_vm(name)? {
                Some(vm) => {
                    self.stop_locked(&vm, Duration::ZERO).await?;
                    crate::steps::kill_point("rm-record");
                    self.registry.store.delete_vm(name)?;
                    crate::steps::kill_point("rm-files");
                    let _ = std::fs::remove_dir_all(&vm.dir);
                    if let Some(origin) = &vm.origin {
                        self.images.release_origin(origin);
                    }
                    removed.push(name.clone());
                }
                None => {
                    if name::validate(name).is_ok() && dir.exists() {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
            }
        }
        self.registry.write_ssh_config();
        Ok(removed)
    }
}

impl VmLifecycle {
    /// Refuses to remove a VM whose guest changed its workspace since the
    /// last pull (as counted at its stop), or whose changes were never
    /// counted because it stopped on its own: unknown is not "none".
    fn refuse_unpulled(&self, name: &str) -> OpResult<()> {
        let Some(ws) = self.workspaces.record(name)? else {
            return Ok(());
        };
        let keep = format!(
            "`banger vm start {name}` then `banger vm sync {name} --pull` keeps them, \
             `banger vm rm -f {name}` discards them"
        );
        match ws.guest_changes {
            Some(0) => Ok(()),
            Some(n) => Err(OpError::conflict(format!(
                "VM `{name}` has {n} change(s) in its workspace ({name}:{}) not pulled to {}; {keep}",
                ws.guest_path, ws.host_dir
            ))),
            None => Err(OpError::conflict(format!(
                "VM `{name}` stopped without `banger vm stop` (its guest powered off, crashed or \
                 was killed), so the changes in its workspace ({name}:{}) not pulled to {} are \
                 unknown; {keep}",
                ws.guest_path, ws.host_dir
            ))),
        }
    }
}

/// A new VM's root in the VM's directory: an overlay's empty writable layer,
/// a snapshot's sparse COW file, or a copy of the image grown to the disk size.
fn make_root(
    runner: &dyn ProcessRunner,
    mode: RootMode,
    image_file: &Path,
    dir: &Path,
    disk_bytes: u64,
) -> Result<(), disk::DiskError> {
    match mode {
        RootMode::Overlay => {
            disk::create_empty(runner, &dir.join(disk::UPPER_FILE), disk_bytes, "upper")
        }
        // `disk_bytes` is the image's size here: a snapshot device is its origin's.
        RootMode::DmSnapshot => {
            let cow = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(disk::COW_FILE))?;
            cow.set_len(disk_bytes)?;
            Ok(())
        }
        RootMode::Reflink | RootMode::Copy => {
            let root = dir.join(disk::ROOT_FILE);
            disk::copy_root(image_file, &root, mode).map_err(disk::DiskError::CopyRoot)?;
            disk::grow(runner, &root, disk_bytes)
        }
    }
}
