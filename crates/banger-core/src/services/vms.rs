//! The VM service: create, start, stop, restart, remove, list, inspect, logs
//! and exec. Durable records live in `vms`; the VMM's pid and start time in
//! `vm_runtime`, trusted only while that very process lives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_host::{ProcessId, ProcessLauncher, ProcessRunner};
use banger_proto::agent::{BootConfig, ExecRequest, Transport, AGENT_PROTOCOL};
use banger_proto::vm::{
    CreateParams, ExecEvent, ExecInput, ExecParams, ExecResult, ForwardEvent, LogEvent, LogsResult,
    PortForwardParams, PortForwardResult, VmEvent, VmInfo,
};
use base64::Engine;

use crate::config::Config;
use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::ids;
use crate::kernel::initramfs;
use crate::paths::Paths;
use crate::services::images::ImageService;
use crate::services::kernels::KernelService;
use crate::services::network::NetworkService;
use crate::steps::{FailPoint, Steps};
use crate::store::{Store, VmRecord, VmRuntime};
use crate::suggest;
use crate::vm::agent_client::{self, AgentSession, Ctl, Input, Output};
use crate::vm::console;
use crate::vm::firecracker::Firecracker;
use crate::vm::ssh_config;
use crate::vm::vmm::{Accel, BootSpec, CtlEndpoint, Qemu, Vmm};
use crate::vm::{disk, keys, name, sizing};

pub const WORK_MOUNT: &str = "/work";
/// Two: the guest agent's SSH handshake then overlaps mounting the disks,
/// which makes `vm run` to first exec faster (see scripts/bench-boot).
const DEFAULT_VCPUS: u32 = 2;
const DEFAULT_MEMORY_MIB: u64 = 512;
const MIN_DISK_BYTES: u64 = 4 << 30;
const WORK_DISK_BYTES: u64 = 8 << 30;
const STEPS_START: u32 = 5;

/// How long reconnecting to a running VM's agent may take (normally well
/// under a second, even emulated).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// One try at the handshake within [`CONNECT_TIMEOUT`] (it takes tens of
/// milliseconds on an idle guest).
const CONNECT_ATTEMPT: Duration = Duration::from_secs(4);
/// Between tries: several times the agent's 20 ms look at the port.
const RECONNECT_GAP: Duration = Duration::from_millis(250);

pub struct VmService {
    paths: Paths,
    config: Config,
    store: Arc<Store>,
    runner: Arc<dyn ProcessRunner>,
    launcher: Arc<dyn ProcessLauncher>,
    blockdevs: Arc<dyn banger_host::BlockDevices>,
    images: Arc<ImageService>,
    kernels: Arc<KernelService>,
    network: Arc<NetworkService>,
    /// Held from choosing a new VM's address until its record is stored.
    addresses: Mutex<()>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    sessions: tokio::sync::Mutex<HashMap<String, AgentSession>>,
    /// One reconnect per VM at a time (the agent serves one host connection
    /// on virtio-serial), without holding up other VMs' commands.
    connecting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    fail_point: Mutex<FailPoint>,
}

/// The lock for `name` in `locks`, dropping entries nobody holds.
fn named_lock(
    locks: &Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    name: &str,
) -> Arc<tokio::sync::Mutex<()>> {
    let mut locks = locks.lock().unwrap_or_else(|p| p.into_inner());
    locks.retain(|_, l| Arc::strong_count(l) > 1);
    locks.entry(name.to_string()).or_default().clone()
}

fn step(events: &Events<VmEvent>, step: &str, n: u32, of: u32) {
    tracing::info!(step, "step {n}/{of}");
    events.emit(&VmEvent::Step {
        step: step.into(),
        n,
        of,
    });
}

impl VmService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        paths: Paths,
        config: Config,
        store: Arc<Store>,
        runner: Arc<dyn ProcessRunner>,
        launcher: Arc<dyn ProcessLauncher>,
        blockdevs: Arc<dyn banger_host::BlockDevices>,
        images: Arc<ImageService>,
        kernels: Arc<KernelService>,
        network: Arc<NetworkService>,
    ) -> VmService {
        VmService {
            paths,
            config,
            store,
            runner,
            launcher,
            blockdevs,
            images,
            kernels,
            network,
            addresses: Mutex::default(),
            locks: Mutex::default(),
            sessions: tokio::sync::Mutex::default(),
            connecting: Mutex::default(),
            fail_point: Mutex::default(),
        }
    }

    /// Test seam: the next create/start steps fail at the named step.
    pub fn set_fail_point(&self, step: Option<&str>) {
        *self.fail_point.lock().unwrap_or_else(|p| p.into_inner()) =
            FailPoint(step.map(str::to_owned));
    }

    fn fail_point(&self) -> FailPoint {
        self.fail_point
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn clean_run_files(&self, vm: &VmRecord) {
        let files = self.vmm(&vm.vmm).map(|v| v.run_files()).unwrap_or(&[]);
        remove_run_files(Path::new(&vm.dir), files);
        if vm.cow_strategy == disk::CowStrategy::DmSnapshot.as_str() {
            let state = Path::new(&vm.dir).join("dm.state");
            if let Err(e) = self.blockdevs.teardown_snapshot(&dm_name(&vm.name), &state) {
                tracing::warn!(vm = %vm.name, error = %e, "could not tear down the root snapshot");
            }
        }
    }

    fn vms_dir(&self) -> PathBuf {
        self.paths.state_dir.join("vms")
    }

    async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.vm_lock(name).lock_owned().await
    }

    /// The VM's lock if nobody holds it (a start or stop in progress does).
    fn try_lock(&self, name: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.vm_lock(name).try_lock_owned().ok()
    }

    fn vm_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        named_lock(&self.locks, name)
    }

    fn vmm(&self, kind: &str) -> OpResult<Box<dyn Vmm>> {
        match kind {
            "qemu" => Ok(Box::new(Qemu {
                binary: self
                    .config
                    .qemu
                    .binary
                    .clone()
                    .unwrap_or_else(|| "qemu-system-x86_64".into()),
                accel: Accel::choose(self.config.qemu.accel.as_deref().unwrap_or("auto"))
                    .map_err(OpError::invalid)?,
            })),
            "firecracker" => Ok(Box::new(Firecracker {
                binary: std::env::var("BANGER_FIRECRACKER_BIN")
                    .ok()
                    .filter(|b| !b.is_empty())
                    .or_else(|| self.config.firecracker_binary.clone())
                    .unwrap_or_else(|| "firecracker".into()),
            })),
            other => Err(OpError::invalid(format!(
                "unknown VMM `{other}` (use qemu or firecracker)"
            ))),
        }
    }

    fn record(&self, name: &str) -> OpResult<VmRecord> {
        self.store.get_vm(name)?.ok_or_else(|| {
            let all = self.store.list_vms().unwrap_or_default();
            let hint = match suggest::closest(name, all.iter().map(|v| v.name.as_str())) {
                Some(near) => format!("; did you mean `{near}`?"),
                None => "; `banger vm ls` lists VMs".into(),
            };
            OpError::not_found(format!("no VM named `{name}`{hint}"))
        })
    }

    /// The live VMM of a VM, if it has one. A stale handle is cleared on the way.
    fn live(&self, name: &str) -> OpResult<Option<VmRuntime>> {
        let Some(rt) = self.store.get_runtime(name)? else {
            return Ok(None);
        };
        if self.launcher.alive(ProcessId {
            pid: rt.pid,
            start_time: rt.start_time,
        }) {
            return Ok(Some(rt));
        }
        match self.record(name) {
            Ok(vm) => self.release(&vm, &rt)?,
            Err(_) => self.store.clear_runtime(name)?,
        }
        Ok(None)
    }

    /// What a VMM that is gone leaves to tidy: its runtime row, its tap and
    /// route, its run files.
    fn release(&self, vm: &VmRecord, rt: &VmRuntime) -> OpResult<()> {
        self.store.clear_runtime(&vm.name)?;
        self.network.detach(rt.tap.as_deref(), vm.ip.as_deref());
        self.clean_run_files(vm);
        Ok(())
    }

    fn info(&self, vm: &VmRecord) -> OpResult<VmInfo> {
        let rt = self.live(&vm.name)?;
        let problem = match &rt {
            Some(_) => self
                .vmm(&vm.vmm)
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
                (None, _) => "stopped",
                (Some(_), Some(_)) => "paused",
                (Some(_), None) => "running",
            }
            .into(),
            problem,
            image: vm.image.clone(),
            kernel: vm.kernel.clone(),
            vmm: vm.vmm.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_bytes: vm.disk_bytes,
            cow_strategy: vm.cow_strategy.clone(),
            dir: vm.dir.clone(),
            work_mount: WORK_MOUNT.into(),
            pid: rt.as_ref().map(|r| r.pid),
            created_at: vm.created_at.clone(),
            started_at: rt.as_ref().map(|r| r.started_at.clone()),
            ip: vm.ip.clone(),
            tap: rt.and_then(|r| r.tap),
        })
    }

    pub fn list(&self) -> OpResult<Vec<VmInfo>> {
        self.store
            .list_vms()?
            .iter()
            .map(|v| self.info(v))
            .collect()
    }

    pub fn inspect(&self, names: &[String]) -> OpResult<Vec<VmInfo>> {
        names.iter().map(|n| self.info(&self.record(n)?)).collect()
    }

    /// After a daemon restart: VMs whose VMM still runs are kept (their SSH
    /// connection is re-made on first use); dead ones are marked stopped and
    /// their leftovers cleaned.
    /// A VMM that a daemon killed between spawn and the runtime row still
    /// runs unrecorded, holding its tap and disks: it is found by the VM
    /// directory on its command line and stopped.
    pub fn recover(&self) -> OpResult<()> {
        for rt in self.store.list_runtimes()? {
            if self.live(&rt.name)?.is_some() {
                tracing::info!(vm = %rt.name, pid = rt.pid, "re-attached to a running VM");
            } else {
                tracing::info!(vm = %rt.name, "VM died while the daemon was away; marked stopped");
            }
        }
        // A create the daemon died in (no record was written) leaves its
        // directory, which would block the name: it goes.
        let recorded: Vec<String> = self.store.list_vms()?.into_iter().map(|v| v.name).collect();
        if let Ok(dirs) = std::fs::read_dir(self.vms_dir()) {
            for entry in dirs.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !recorded.contains(&name) {
                    tracing::warn!(vm = %name, "removing a VM directory no record names (a create that did not finish)");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        for vm in self.store.list_vms()? {
            if self.live(&vm.name)?.is_some() {
                continue;
            }
            for orphan in self.launcher.find_naming(&format!("{}/", vm.dir)) {
                tracing::warn!(
                    vm = %vm.name,
                    pid = orphan.pid,
                    "a VMM launched for this VM was never recorded (the daemon died mid-start); stopping it"
                );
                kill_and_wait(self.launcher.as_ref(), orphan);
            }
            // A start the daemon died in may have left its per-boot files.
            self.clean_run_files(&vm);
        }
        self.write_ssh_config();
        Ok(())
    }

    /// Rewrites the ssh config file and known_hosts from the VM records.
    fn write_ssh_config(&self) {
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

    /// Keeps every running VM's user keys in step with the user's key files;
    /// runs for the daemon's life.
    pub async fn sync_user_keys(self: Arc<Self>, every: Duration) {
        let mut pushed: HashMap<String, Vec<String>> = HashMap::new();
        loop {
            let (config, runner) = (self.config.ssh.clone(), self.runner.clone());
            let keys = tokio::task::spawn_blocking(move || {
                crate::vm::user_keys::load(&config, runner.as_ref())
            })
            .await
            .unwrap_or_default();
            let running: Vec<VmRecord> = self
                .store
                .list_runtimes()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|rt| self.store.get_vm(&rt.name).ok().flatten())
                .collect();
            pushed.retain(|name, _| running.iter().any(|v| &v.name == name));
            // Every VM at once, each bounded: a frozen guest costs its own
            // push a few seconds and holds up no other VM.
            let pushes = running
                .into_iter()
                .filter(|vm| pushed.get(&vm.name) != Some(&keys))
                .map(|vm| {
                    let (this, keys) = (self.clone(), keys.clone());
                    async move {
                        let done = this.push_user_keys(&vm, &keys).await;
                        (vm.name, done)
                    }
                });
            for (name, done) in futures_util::future::join_all(pushes).await {
                if done {
                    pushed.insert(name, keys.clone());
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Keeps every running VM's console log under its cap (see
    /// [`console::rotate_if_big`]); runs for the daemon's life.
    pub async fn cap_console_logs(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let running = self.store.list_runtimes().unwrap_or_default();
            for rt in running {
                let Ok(Some(vm)) = self.store.get_vm(&rt.name) else {
                    continue;
                };
                let dir = PathBuf::from(&vm.dir);
                match tokio::task::spawn_blocking(move || console::rotate_if_big(&dir)).await {
                    Ok(Ok(true)) => tracing::info!(vm = %vm.name, "console log rotated"),
                    Ok(Err(e)) => {
                        tracing::warn!(vm = %vm.name, error = %e, "cannot rotate the console log")
                    }
                    _ => {}
                }
            }
        }
    }

    /// One VM's user keys, within [`GUEST_CALL_TIMEOUT`]; true once the
    /// agent has them.
    async fn push_user_keys(&self, vm: &VmRecord, keys: &[String]) -> bool {
        // A VM being started or stopped is left for the next round: its
        // agent serves one connection at a time, the starter's. The lock is
        // only looked at, not held: a stop or rm never waits for a push.
        if self.try_lock(&vm.name).is_none() {
            return false;
        }
        let push = async {
            let session = self.session(vm).await.map_err(|e| e.message)?;
            session.set_user_keys(keys).await
        };
        match tokio::time::timeout(GUEST_CALL_TIMEOUT, push).await {
            Ok(Ok(())) => {
                tracing::info!(vm = %vm.name, keys = keys.len(), "user keys updated");
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(vm = %vm.name, error = %e, "cannot update user keys");
                false
            }
            Err(_) => {
                tracing::warn!(vm = %vm.name, "the agent did not take the user keys in time (is the VM frozen?)");
                false
            }
        }
    }

    /// The VM's lock for an operation that must end: waits at most `limit`
    /// for whoever holds it (a start, a key push to a frozen guest), then
    /// kills the VM's VMM so the holder fails fast, and takes the lock.
    async fn lock_or_kill(&self, name: &str, limit: Duration) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.vm_lock(name);
        if let Ok(guard) = tokio::time::timeout(limit, lock.clone().lock_owned()).await {
            return guard;
        }
        if let Ok(Some(rt)) = self.store.get_runtime(name) {
            tracing::warn!(vm = name, "the VM is busy past the limit; killing its VMM");
            let launcher = self.launcher.clone();
            let pid = ProcessId {
                pid: rt.pid,
                start_time: rt.start_time,
            };
            let _ =
                tokio::task::spawn_blocking(move || kill_and_wait(launcher.as_ref(), pid)).await;
        }
        lock.lock_owned().await
    }

    pub async fn create(&self, params: CreateParams, events: Events<VmEvent>) -> OpResult<VmInfo> {
        name::validate(&params.name).map_err(OpError::invalid)?;
        let _guard = self.lock(&params.name).await;
        if self.store.get_vm(&params.name)?.is_some() {
            return Err(OpError::conflict(format!(
                "a VM named `{}` exists; pick another name or run `banger vm rm -f {}`",
                params.name, params.name
            )));
        }
        // Held until the record is written: `image rm` and a re-pull take
        // the same lock, so they see this VM as a user.
        let _image_guard = self.images.lock_name(&params.image).await;
        let image = self
            .images
            .inspect(std::slice::from_ref(&params.image))?
            .remove(0);
        let kernel = self.kernels.resolve(params.kernel.as_deref())?;
        let vmm_kind = params
            .vmm
            .clone()
            .or_else(|| self.config.default_vmm.clone())
            .unwrap_or_else(|| "qemu".into());
        self.vmm(&vmm_kind)?;
        // Checked, never silently changed: a size the VM cannot have is
        // refused here with the range, not at start.
        let host = sizing::Host::probe();
        let vcpus = match params.vcpus {
            Some(n) => sizing::vcpus(n, &vmm_kind, host).map_err(OpError::invalid)?,
            None => DEFAULT_VCPUS.min(host.cpus.max(1)),
        };
        let memory_mib = match params.memory_mib {
            Some(mib) => sizing::memory_mib(mib, host).map_err(OpError::invalid)?,
            None => DEFAULT_MEMORY_MIB,
        };
        let disk_bytes = match params.disk_bytes {
            Some(bytes) => sizing::disk_bytes(bytes, image.size_bytes).map_err(OpError::invalid)?,
            None => MIN_DISK_BYTES.max(image.size_bytes),
        };

        let mut steps = Steps::new(self.fail_point());
        let dir = self.vms_dir().join(&params.name);
        steps.begin("dir")?;
        std::fs::create_dir_all(self.vms_dir())?;
        std::fs::create_dir(&dir)
            .map_err(|e| OpError::internal(format!("creating {}: {e}", dir.display())))?;
        let undo_dir = dir.clone();
        steps.undo("dir", move || {
            let _ = std::fs::remove_dir_all(&undo_dir);
        });

        step(&events, "disks", 1, 2);
        // The two disks are independent: the work disk's mkfs runs while the
        // root disk is copied and grown. Both are done (or failed) before
        // any undo runs.
        steps.begin("root-disk")?;
        steps.begin("work-disk")?;
        let root = async {
            if self.blockdevs.snapshot_supported() {
                // The image's ext4 stays the read-only origin; writes land in a sparse COW file.
                let cow = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dir.join("cow.img"))?;
                cow.set_len(image.size_bytes)?;
                return Ok((disk::CowStrategy::DmSnapshot, image.size_bytes));
            }
            let (src, dst, runner) = (
                PathBuf::from(&image.rootfs_path),
                dir.join("root.ext4"),
                self.runner.clone(),
            );
            let strategy =
                tokio::task::spawn_blocking(move || -> Result<disk::CowStrategy, String> {
                    let strategy = disk::clone_or_copy(&src, &dst)
                        .map_err(|e| format!("copying the image's root disk: {e}"))?;
                    disk::grow(runner.as_ref(), &dst, disk_bytes)?;
                    Ok(strategy)
                })
                .await
                .map_err(|e| OpError::internal(e.to_string()))?
                .map_err(|e| OpError::writing(e, &dir))?;
            Ok::<_, OpError>((strategy, disk_bytes))
        };
        let (work, runner) = (dir.join("work.ext4"), self.runner.clone());
        let work = async {
            tokio::task::spawn_blocking(move || {
                disk::create_work_disk(runner.as_ref(), &work, WORK_DISK_BYTES)
            })
            .await
            .map_err(|e| OpError::internal(e.to_string()))?
            .map_err(|e| OpError::writing(e, &dir))
        };
        let (root, work) = tokio::join!(root, work);
        let (strategy, disk_bytes) = root?;
        work?;

        step(&events, "keys", 2, 2);
        steps.begin("host-key")?;
        let host_key = keys::generate().map_err(OpError::internal)?;
        keys::write_private(
            &dir.join("host_key"),
            &keys::to_openssh(&host_key).map_err(OpError::internal)?,
        )?;

        steps.begin("record")?;
        let addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let ip = self.network.allocate()?;
        let record = VmRecord {
            name: params.name.clone(),
            image: image.name.clone(),
            kernel: kernel.name.clone(),
            vmm: vmm_kind,
            vcpus,
            memory_mib,
            disk_bytes,
            cow_strategy: strategy.as_str().into(),
            dir: dir.display().to_string(),
            host_key_pub: keys::public_openssh(&host_key).map_err(OpError::internal)?,
            created_at: ids::now_rfc3339(),
            ip,
            origin: (strategy == disk::CowStrategy::DmSnapshot).then(|| image.rootfs_path.clone()),
        };
        self.store.insert_vm(&record)?;
        drop(addresses);
        let (store, undo_name) = (self.store.clone(), record.name.clone());
        steps.undo("record", move || {
            let _ = store.delete_vm(&undo_name);
        });
        steps.commit();
        self.write_ssh_config();
        tracing::info!(vm = %record.name, cow = %record.cow_strategy, "VM created");
        drop(_guard);
        if params.start {
            return self.start(&record.name, events).await;
        }
        self.info(&record)
    }

    pub async fn start(&self, name: &str, events: Events<VmEvent>) -> OpResult<VmInfo> {
        let _guard = self.lock(name).await;
        let vm = self.record(name)?;
        if self.live(name)?.is_some() {
            return self.info(&vm);
        }
        let vmm = self.vmm(&vm.vmm)?;
        let kernel = self.kernels.get(&vm.kernel)?;
        let dir = PathBuf::from(&vm.dir);
        self.clean_run_files(&vm);
        let mut steps = Steps::new(self.fail_point());

        step(&events, "initramfs", 1, STEPS_START);
        steps.begin("initramfs")?;
        let agent = crate::agent_bin::locate().map_err(OpError::internal)?;
        let mut bytes = self.kernels.initramfs(&kernel, &agent).await?;
        let host_key = std::fs::read_to_string(dir.join("host_key"))
            .map_err(|e| OpError::internal(format!("reading the VM's host key: {e}")))?;
        let client_key = keys::client_key(&self.paths.state_dir).map_err(OpError::internal)?;
        let image_env = self
            .images
            .inspect(std::slice::from_ref(&vm.image))
            .map(|mut i| i.remove(0).config.env)
            .unwrap_or_default();
        let boot = BootConfig {
            protocol: AGENT_PROTOCOL,
            hostname: vm.name.clone(),
            root_device: "/dev/vda".into(),
            work_device: Some("/dev/vdb".into()),
            work_mount: Some(WORK_MOUNT.into()),
            host_key,
            authorized_keys: vec![keys::public_openssh(&client_key).map_err(OpError::internal)?],
            user_keys: crate::vm::user_keys::load(&self.config.ssh, self.runner.as_ref()),
            transport: vmm.transport(),
            env: image_env,
            network: self.network.guest(vm.ip.as_deref())?,
        };
        let initrd = dir.join("initrd.cpio");
        bytes.extend_from_slice(&initramfs::vm_archive(
            &serde_json::to_vec(&boot).expect("serialises"),
        ));
        keys::write_private(&initrd, "")?;
        std::fs::write(&initrd, bytes)?;
        let (undo_dir, files) = (dir.clone(), vmm.run_files());
        steps.undo("initramfs", move || remove_run_files(&undo_dir, files));
        // Firecracker forwards the agent's control connection to a socket
        // that must be listening before the guest boots.
        let ctl = match vmm.ctl(&dir) {
            CtlEndpoint::Connect(path) => Ctl::Connect(path),
            CtlEndpoint::Listen(path) => {
                let _ = std::fs::remove_file(&path);
                let short = crate::vm::sockpath::SockPath::new(&path)?;
                Ctl::Listener(tokio::net::UnixListener::bind(short.path()).map_err(|e| {
                    OpError::internal(format!("listening on {}: {e}", path.display()))
                })?)
            }
        };

        let root_disk = if vm.cow_strategy == disk::CowStrategy::DmSnapshot.as_str() {
            steps.begin("snapshot")?;
            // The origin the COW file was made against, never a newer pull.
            let origin = match &vm.origin {
                Some(origin) => origin.clone(),
                None => {
                    self.images
                        .inspect(std::slice::from_ref(&vm.image))?
                        .remove(0)
                        .rootfs_path
                }
            };
            let state = dir.join("dm.state");
            let dev = self
                .blockdevs
                .setup_snapshot(
                    &dm_name(&vm.name),
                    Path::new(&origin),
                    &dir.join("cow.img"),
                    &state,
                )
                .map_err(|e| {
                    OpError::internal(format!("setting up the root disk snapshot: {e}"))
                })?;
            let (blockdevs, name) = (self.blockdevs.clone(), dm_name(&vm.name));
            steps.undo("snapshot", move || {
                let _ = blockdevs.teardown_snapshot(&name, &state);
            });
            dev
        } else {
            dir.join("root.ext4")
        };

        steps.begin("network")?;
        let nic = self.network.attach(vm.ip.as_deref())?;
        let (network, undo_nic, undo_ip) = (
            self.network.clone(),
            nic.as_ref().map(|n| n.tap.clone()),
            vm.ip.clone(),
        );
        steps.undo("network", move || {
            network.detach(undo_nic.as_deref(), undo_ip.as_deref())
        });

        step(&events, "launch", 2, STEPS_START);
        steps.begin("launch")?;
        let console = dir.join("console.log");
        if let Err(e) = console::rotate_if_big(&dir) {
            tracing::warn!(vm = %vm.name, error = %e, "cannot rotate the console log");
        }
        append_marker(
            &console,
            &format!("{BOOT_MARKER}{} ---", ids::now_rfc3339()),
        );
        let spec = BootSpec {
            dir: dir.clone(),
            vmlinux: PathBuf::from(&kernel.vmlinux_path),
            initrd: initrd.clone(),
            root_disk,
            work_disk: dir.join("work.ext4"),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            console_log: console.clone(),
            nic: nic.clone(),
        };
        let command = vmm.command(&spec).map_err(OpError::invalid)?;
        let pid = self
            .launcher
            .launch(&command)
            .map_err(|e| OpError::internal(format!("launching {}: {e}", vm.vmm)))?;
        let launcher = self.launcher.clone();
        steps.undo("launch", move || kill_and_wait(launcher.as_ref(), pid));

        steps.begin("runtime")?;
        self.store.set_runtime(&VmRuntime {
            name: vm.name.clone(),
            pid: pid.pid,
            start_time: pid.start_time,
            started_at: ids::now_rfc3339(),
            tap: nic.as_ref().map(|n| n.tap.clone()),
        })?;
        let (store, undo_name) = (self.store.clone(), vm.name.clone());
        steps.undo("runtime", move || {
            let _ = store.clear_runtime(&undo_name);
        });

        steps.begin("configure")?;
        let launcher = self.launcher.clone();
        let alive = move || launcher.alive(pid);
        if let Err(e) = vmm.configure(&spec, &alive).await {
            return Err(boot_failed(&vm, "configure", &e));
        }

        step(&events, "agent", 3, STEPS_START);
        steps.begin("agent")?;
        let timeout = Duration::from_secs(self.config.boot_timeout_secs.unwrap_or(60));
        // The handshake runs while the guest finishes booting: the agent
        // serves SSH before its disks are mounted. A virtio-serial port holds
        // the host's bytes until the guest opens it, so there the daemon
        // connects at launch; over vsock it waits for the agent's "ssh" report.
        let connect_at_launch = vmm.transport() == Transport::VirtioSerial;
        let (ssh_up, ssh_signal) = tokio::sync::oneshot::channel::<()>();
        let mut ssh_up = Some(ssh_up);
        let events_ref = &events;
        let waiting = agent_client::wait_ready(ctl, timeout, &alive, move |stage| {
            events_ref.emit(&VmEvent::Agent {
                stage: stage.to_string(),
            });
            if stage == "ssh" {
                if let Some(tx) = ssh_up.take() {
                    let _ = tx.send(());
                }
            }
        });
        let early = async {
            if !connect_at_launch && ssh_signal.await.is_err() {
                return None;
            }
            let started = std::time::Instant::now();
            let session =
                tokio::time::timeout(timeout, self.open_session_early(&vm, vmm.as_ref(), &alive))
                    .await
                    .ok();
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "early SSH handshake"
            );
            session
        };
        // Readiness decides: a failed boot is reported at once, without
        // waiting on a handshake that will never finish.
        let mut early = std::pin::pin!(early);
        let mut early_done = None;
        let ready = {
            // Dropped before `early` is awaited below: it owns the "ssh"
            // signal's sender, so an early connect still waiting gives up.
            let mut waiting = std::pin::pin!(waiting);
            loop {
                tokio::select! {
                    ready = &mut waiting => break ready,
                    session = &mut early, if early_done.is_none() => early_done = Some(session),
                }
            }
        };
        if let Err(failure) = ready {
            return Err(boot_failed(&vm, &failure.stage, &failure.message));
        }
        let early = match early_done {
            Some(session) => session,
            // Normally moments away; a handshake stuck past this is dropped
            // (the agent then serves the fresh connection made below).
            None => tokio::time::timeout(Duration::from_secs(10), early)
                .await
                .ok()
                .flatten(),
        };

        step(&events, "ssh", 4, STEPS_START);
        steps.begin("ssh")?;
        let session = match early {
            Some(Ok(session)) => session,
            // The "ssh" report was coalesced away, or the early attempt lost a race.
            early => {
                if let Some(Err(e)) = early {
                    tracing::info!(vm = %vm.name, error = %e, "early SSH connect failed; trying again");
                }
                self.open_session(&vm, vmm.as_ref()).await.map_err(|e| {
                    let e = if alive() {
                        e
                    } else {
                        format!("{e} (the VMM has exited)")
                    };
                    boot_failed(&vm, "ssh", &e)
                })?
            }
        };
        self.sessions.lock().await.insert(vm.name.clone(), session);
        step(&events, "ready", 5, STEPS_START);
        steps.commit();
        let network = self.network.clone();
        tokio::task::spawn_blocking(move || network.refill());
        tracing::info!(vm = %vm.name, pid = pid.pid, "VM running");
        self.info(&vm)
    }

    /// A fresh connection to a running VM's agent. Bounded: a guest that
    /// never answers must not stall that VM's commands (or `vm rm -f`).
    ///
    /// A virtio-serial port has no connections, only "a host is attached":
    /// when one host leaves and the next attaches before the agent looked
    /// (a daemon restarting, a cancelled attempt followed by another), the
    /// agent never sees the gap and the handshake stalls. So each attempt is
    /// short, and a failed one is followed by a pause the agent cannot miss
    /// before the next.
    async fn connect(&self, vm: &VmRecord, vmm: &dyn Vmm) -> OpResult<AgentSession> {
        let attempts = async {
            loop {
                match tokio::time::timeout(CONNECT_ATTEMPT, self.open_session(vm, vmm)).await {
                    Ok(Ok(session)) => return Ok(session),
                    Ok(Err(e)) if !self.launcher_alive(vm) => return Err(e),
                    Ok(Err(e)) => {
                        tracing::info!(vm = %vm.name, error = %e, "SSH attempt failed; retrying")
                    }
                    Err(_) => tracing::info!(vm = %vm.name, "SSH attempt stalled; retrying"),
                }
                tokio::time::sleep(RECONNECT_GAP).await;
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempts).await {
            Ok(session) => {
                session.map_err(|e| OpError::internal(format!("VM `{}`: {e}", vm.name)))
            }
            Err(_) => Err(OpError::internal(format!(
                "VM `{}`: its agent did not complete the SSH handshake within {}s; see `banger vm logs {}`",
                vm.name,
                CONNECT_TIMEOUT.as_secs(),
                vm.name
            ))),
        }
    }

    /// The boot-time session: the VMM may not be listening yet.
    async fn open_session_early(
        &self,
        vm: &VmRecord,
        vmm: &dyn Vmm,
        alive: &(dyn Fn() -> bool + Sync),
    ) -> Result<AgentSession, String> {
        let stream = loop {
            match vmm.open_ssh(Path::new(&vm.dir)).await {
                Ok(stream) => break stream,
                Err(_) if alive() => tokio::time::sleep(Duration::from_millis(2)).await,
                Err(e) => return Err(e),
            }
        };
        self.handshake(vm, stream).await
    }

    async fn open_session(&self, vm: &VmRecord, vmm: &dyn Vmm) -> Result<AgentSession, String> {
        let stream = vmm.open_ssh(Path::new(&vm.dir)).await?;
        self.handshake(vm, stream).await
    }

    async fn handshake(
        &self,
        vm: &VmRecord,
        stream: tokio::net::UnixStream,
    ) -> Result<AgentSession, String> {
        let host_key = keys::parse_public(&vm.host_key_pub)?;
        let client_key = keys::client_key(&self.paths.state_dir)?;
        AgentSession::connect(stream, host_key, client_key)
            .await
            .map_err(|e| e.to_string())
    }

    /// Whether the VM's VMM still runs (a dead one is not worth a retry).
    fn launcher_alive(&self, vm: &VmRecord) -> bool {
        matches!(self.live(&vm.name), Ok(Some(_)))
    }

    /// The VM's SSH connection, made anew when there is none (after a
    /// daemon restart) or the old one closed.
    async fn session(&self, vm: &VmRecord) -> OpResult<AgentSession> {
        if self.live(&vm.name)?.is_none() {
            return Err(OpError::conflict(format!(
                "VM `{}` is stopped; run `banger vm start {}`",
                vm.name, vm.name
            )));
        }
        let open = |sessions: &HashMap<String, AgentSession>| {
            sessions.get(&vm.name).filter(|s| !s.is_closed()).cloned()
        };
        if let Some(session) = open(&*self.sessions.lock().await) {
            return Ok(session);
        }
        let _connecting = named_lock(&self.connecting, &vm.name).lock_owned().await;
        // Another caller may have connected while this one waited.
        if let Some(session) = open(&*self.sessions.lock().await) {
            return Ok(session);
        }
        let vmm = self.vmm(&vm.vmm)?;
        let session = self.connect(vm, vmm.as_ref()).await?;
        self.sessions
            .lock()
            .await
            .insert(vm.name.clone(), session.clone());
        Ok(session)
    }

    pub async fn stop(&self, name: &str, timeout: Duration) -> OpResult<VmInfo> {
        let _guard = self.lock_or_kill(name, timeout).await;
        let vm = self.record(name)?;
        self.stop_locked(&vm, timeout).await?;
        self.info(&vm)
    }

    async fn stop_locked(&self, vm: &VmRecord, timeout: Duration) -> OpResult<()> {
        let Some(rt) = self.live(&vm.name)? else {
            return Ok(());
        };
        let pid = ProcessId {
            pid: rt.pid,
            start_time: rt.start_time,
        };
        if !timeout.is_zero() {
            // Clean first: the agent syncs and unmounts before powering off.
            let connecting = tokio::time::timeout(timeout, self.session(vm));
            if let Ok(Ok(session)) = connecting.await {
                let _ = tokio::time::timeout(Duration::from_secs(2), session.poweroff()).await;
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let halfway = tokio::time::Instant::now() + timeout / 2;
            let mut asked_vmm = false;
            while self.launcher.alive(pid) && tokio::time::Instant::now() < deadline {
                if !asked_vmm && tokio::time::Instant::now() > halfway {
                    // The agent did not finish; ask the VMM (Ctrl-Alt-Del on Firecracker).
                    if let Ok(vmm) = self.vmm(&vm.vmm) {
                        vmm.request_shutdown(Path::new(&vm.dir)).await;
                    }
                    asked_vmm = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        crate::steps::kill_point("stop-kill");
        if self.launcher.alive(pid) {
            tracing::warn!(vm = %vm.name, "VM did not power off in time; killing its VMM");
            let launcher = self.launcher.clone();
            tokio::task::spawn_blocking(move || kill_and_wait(launcher.as_ref(), pid))
                .await
                .map_err(|e| OpError::internal(e.to_string()))?;
        }
        crate::steps::kill_point("stop-release");
        self.sessions.lock().await.remove(&vm.name);
        self.release(vm, &rt)?;
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
                self.record(name)?;
                if self.live(name)?.is_some() {
                    return Err(OpError::conflict(format!(
                        "VM `{name}` is running; stop it first (`banger vm stop {name}`) or pass -f"
                    )));
                }
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
            let _guard = self.lock_or_kill(name, wait).await;
            let dir = self.vms_dir().join(name);
            match self.store.get_vm(name)? {
                Some(vm) => {
                    self.stop_locked(&vm, Duration::ZERO).await?;
                    crate::steps::kill_point("rm-record");
                    self.store.delete_vm(name)?;
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
        self.write_ssh_config();
        Ok(removed)
    }

    /// Forwards a host port to a guest port until the caller hangs up or
    /// the VM stops.
    pub async fn port_forward(
        &self,
        p: PortForwardParams,
        events: Events<ForwardEvent>,
        input: crate::ops::Input,
    ) -> OpResult<PortForwardResult> {
        let vm = self.record(&p.name)?;
        self.session(&vm).await?;
        let ip: std::net::IpAddr = p
            .host_ip
            .as_deref()
            .unwrap_or("127.0.0.1")
            .parse()
            .map_err(|_| {
                OpError::invalid(format!(
                    "`{}` is not an IP address",
                    p.host_ip.as_deref().unwrap_or_default()
                ))
            })?;
        let listener = tokio::net::TcpListener::bind((ip, p.host_port))
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AddrInUse => OpError::conflict(format!(
                    "{ip}:{} is already in use on the host; pick another host port",
                    p.host_port
                )),
                _ => OpError::invalid(format!("cannot listen on {ip}:{}: {e}", p.host_port)),
            })?;
        let local = listener.local_addr()?;
        tracing::info!(vm = %vm.name, listen = %local, guest_port = p.guest_port, "forwarding");
        events.emit(&ForwardEvent {
            listening: local.to_string(),
            guest_port: p.guest_port,
        });
        let gone = caller_gone(&input);
        tokio::pin!(gone);
        let mut connections = 0;
        // Not reset by each accepted connection: a busy forward still
        // notices a stopped VM within a second.
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut gone => break,
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else { continue };
                    connections += 1;
                    let session = self.session(&vm).await?;
                    let port = p.guest_port;
                    tokio::spawn(async move {
                        match session.open_tcp(port).await {
                            Ok(channel) => {
                                let _ = tcp.set_nodelay(true);
                                banger_sshflow::forward(channel, tcp, banger_sshflow::WINDOW).await;
                            }
                            Err(e) => tracing::info!(error = %e, "nothing answered in the guest"),
                        }
                    });
                }
                _ = check.tick() => {
                    if self.live(&vm.name)?.is_none() {
                        return Err(OpError::conflict(format!("VM `{}` stopped", vm.name)));
                    }
                }
            }
        }
        Ok(PortForwardResult { connections })
    }

    pub async fn logs(
        &self,
        name: &str,
        tail: Option<usize>,
        follow: bool,
        events: Events<LogEvent>,
        input: crate::ops::Input,
    ) -> OpResult<LogsResult> {
        let vm = self.record(name)?;
        let dir = PathBuf::from(&vm.dir);
        let path = console::path(&dir);
        // The log is streamed in chunks, each sent once the one before it
        // reached the caller: a big log costs the daemon one chunk.
        let send = |bytes: &[u8]| {
            events.emit_tracked(&LogEvent {
                text: String::from_utf8_lossy(bytes).into_owned(),
            })
        };
        match tail {
            Some(n) => {
                let _ = send(&console::tail(&dir, n)?).await;
            }
            None => {
                let mut pending = None;
                for chunk in console::chunks(&dir) {
                    if let Some(before) = pending.replace(send(&chunk?)) {
                        let _ = before.await;
                    }
                }
                if let Some(last) = pending {
                    let _ = last.await;
                }
            }
        }
        if !follow {
            return Ok(LogsResult {
                text: String::new(),
            });
        }
        let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        loop {
            tokio::select! {
                _ = caller_gone(&input) => return Ok(LogsResult { text: String::new() }),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if len < offset {
                offset = 0; // Rotated: the new log starts from nothing.
            }
            if len > offset {
                use std::io::{Read, Seek, SeekFrom};
                let mut f = std::fs::File::open(&path)?;
                f.seek(SeekFrom::Start(offset))?;
                let mut chunk = Vec::new();
                f.take(len - offset).read_to_end(&mut chunk)?;
                offset = len;
                events.emit(&LogEvent {
                    text: String::from_utf8_lossy(&chunk).into_owned(),
                });
            }
            if self.live(name)?.is_none() {
                return Ok(LogsResult {
                    text: String::new(),
                });
            }
        }
    }

    pub async fn exec(
        &self,
        params: ExecParams,
        events: Events<ExecEvent>,
        input: crate::ops::Input,
    ) -> OpResult<ExecResult> {
        if params.argv.is_empty() && params.tty.is_none() {
            return Err(OpError::invalid(
                "no command given: `banger vm exec NAME -- CMD ARGS…`",
            ));
        }
        let vm = self.record(&params.name)?;
        let session = self.session(&vm).await?;
        let default_user = self
            .images
            .inspect(std::slice::from_ref(&vm.image))
            .ok()
            .and_then(|mut i| Some(i.remove(0).config.user).filter(|u| !u.is_empty()));
        let request = ExecRequest {
            argv: params.argv,
            env: params.env,
            cwd: params.cwd,
            user: params.user.or(default_user),
            flow: Some(agent_client::FLOW_WINDOW),
        };
        // Small and bounded: stdin moves at the pace the command reads it.
        let (tx, rx) = tokio::sync::mpsc::channel(crate::caller::QUEUED_LINES);
        let gone = input.as_ref().map(|i| i.gone());
        // Without a caller stream, stdin is empty; the sender lives until the
        // command ends so its absence is not taken for a vanished caller.
        let mut _no_input = None;
        if let Some(mut input) = input {
            tokio::spawn(async move {
                while let Some(value) = input.lines.recv().await {
                    let Ok(msg) = serde_json::from_value::<ExecInput>(value) else {
                        continue;
                    };
                    let translated = match msg {
                        ExecInput::Stdin(b64) => {
                            match base64::engine::general_purpose::STANDARD.decode(b64) {
                                Ok(bytes) => Input::Stdin(bytes),
                                Err(_) => continue,
                            }
                        }
                        ExecInput::StdinEof => Input::StdinEof,
                        ExecInput::Signal(name) => Input::Signal(name),
                        ExecInput::Resize(c, r) => Input::Resize(c, r),
                    };
                    if tx.send(translated).await.is_err() {
                        return;
                    }
                }
            });
        } else {
            let _ = tx.send(Input::StdinEof).await;
            _no_input = Some(tx);
        }
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let status = session
            .exec(&request, params.tty, rx, gone, |out| match out {
                Output::Stdout(b) => events.emit_tracked(&ExecEvent::Stdout(b64(&b))),
                Output::Stderr(b) => events.emit_tracked(&ExecEvent::Stderr(b64(&b))),
            })
            .await
            .map_err(|e| OpError::internal(format!("VM `{}`: {e}", vm.name)))?;
        Ok(ExecResult {
            exit_code: status.code,
            signal: status.signal,
        })
    }
}

/// How long one call into a guest may take while it holds the VM's lock.
const GUEST_CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn kill_and_wait(launcher: &dyn ProcessLauncher, pid: ProcessId) {
    let _ = launcher.signal(pid, libc::SIGTERM);
    for _ in 0..40 {
        if !launcher.alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = launcher.signal(pid, libc::SIGKILL);
    for _ in 0..200 {
        if !launcher.alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The device-mapper name of a VM's root snapshot.
fn dm_name(vm: &str) -> String {
    format!("banger-{vm}")
}

/// What exists only while a VM runs: the VMM's sockets and the per-boot initramfs.
fn remove_run_files(dir: &Path, vmm_files: &[&str]) {
    for f in vmm_files.iter().copied().chain(["initrd.cpio"]) {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

fn append_marker(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = lines[start..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// Resolves when the caller hangs up; never without a caller stream.
async fn caller_gone(input: &crate::ops::Input) {
    match input {
        Some(input) => input.hung_up().await,
        None => std::future::pending::<()>().await,
    }
}

/// A boot that failed after launch: the stage, why, and the end of the
/// serial console (and of the VMM's own log) so the cause is on screen.
fn boot_failed(vm: &VmRecord, stage: &str, message: &str) -> OpError {
    let dir = Path::new(&vm.dir);
    let mut tail = tail_lines(&dir.join("console.log"), 20);
    let vmm_log = tail_lines(&dir.join("vmm.log"), 10);
    if !vmm_log.trim().is_empty() {
        tail.push_str(&format!("--- {} said ---\n{vmm_log}", vm.vmm));
    }
    let name = &vm.name;
    OpError::internal(format!(
        "VM `{name}` failed to boot at stage `{stage}`: {message}\n--- last console lines ---\n{tail}\n--- (all of it: `banger vm logs {name}`)"
    ))
}

/// The last `n` lines of a log, read from its end (a console log may be
/// huge), and only of the latest boot: older boots' lines would point at
/// the wrong cause.
fn tail_lines(path: &Path, n: usize) -> String {
    let text = read_end(path, TAIL_BYTES);
    let text = String::from_utf8_lossy(&text);
    let this_boot = match text.rfind(BOOT_MARKER) {
        Some(at) => &text[at..],
        None => &text,
    };
    last_lines(this_boot, n)
}

/// What a boot failure shows of the logs, at most.
const TAIL_BYTES: u64 = 64 * 1024;
/// Opens every boot's lines in the console log.
const BOOT_MARKER: &str = "--- banger: boot at ";

/// At most the last `limit` bytes of a file.
fn read_end(path: &Path, limit: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(limit)));
    let mut out = Vec::new();
    let _ = file.take(limit).read_to_end(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_failure_shows_only_this_boots_console_lines() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        append_marker(&console, &format!("{BOOT_MARKER}yesterday ---"));
        append_marker(&console, "old boot: tap bgtap1 busy");
        append_marker(&console, &format!("{BOOT_MARKER}now ---"));
        append_marker(&console, "this boot: no root disk");
        let tail = tail_lines(&console, 20);
        assert!(
            tail.contains("this boot") && !tail.contains("old boot"),
            "{tail}"
        );
        // A huge log is read from its end only.
        let mut big = "x".repeat(200_000);
        big.push_str("\nlast line\n");
        std::fs::write(&console, big).unwrap();
        assert_eq!(tail_lines(&console, 1), "last line\n");
        assert!(read_end(&console, TAIL_BYTES).len() as u64 <= TAIL_BYTES);
    }
}
