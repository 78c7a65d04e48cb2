//! `vm start` as named phases, each undone if a later one fails: the boot
//! config (the initramfs with the agent and its config), the root disk,
//! the network, the launch, and waiting for the guest to be ready.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_host::ProcessId;
use banger_proto::agent::{BootConfig, Identity, Transport, AGENT_PROTOCOL};
use banger_proto::domain::NetworkMode;
use banger_proto::vm::{RootMode, VmEvent, VmInfo};

use crate::vm::disk::{self, UPPER_FILE};

use super::boot_log::{boot_failed, mark_boot};
use super::lifecycle::{step, VmLifecycle};
use super::registry::{remove_run_files, WORK_MOUNT};
use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::ids;
use crate::kernel::initramfs;
use crate::steps::Steps;
use crate::store::{SnapshotRecord, VmRecord, VmRuntime};
use crate::vm::agent_client::{self, AgentSession, Ctl};
use crate::vm::console;
use crate::vm::keys;
use crate::vm::vmm::{ArmedWatch, BootSpec, CtlEndpoint, Disk, FatalWatch, Nic, NicBackend, Vmm};
use banger_proto::kernel::KernelInfo;

const STEPS_START: u32 = 5;

/// A boot whose guest died on KVM: QEMU's line saying so, and whether
/// banger chose KVM (and so may boot again without it).
struct KvmDeath {
    line: String,
    retry: bool,
}

/// A snapshot's copy of the initramfs its VM booted with.
pub(super) const INITRD_FILE: &str = "initrd.cpio";

/// The guest's names for the disks [`VmLifecycle::disks`] lists.
const ROOT_DEVICE: &str = "/dev/vda";
const WORK_DEVICE: &str = "/dev/vdb";
const UPPER_DEVICE: &str = "/dev/vdc";

impl VmLifecycle {
    pub async fn start(&self, name: &str, events: Events<VmEvent>) -> OpResult<VmInfo> {
        let _guard = self.registry.lock(name).await;
        let vm = self.registry.record(name)?;
        if self.registry.live(name)?.is_some() {
            return self.registry.info(&vm);
        }
        // A fork's first start resumes its snapshot; a fork whose snapshot
        // was removed (`snapshot rm -f`) boots from the disks it copied.
        let restore = match &vm.restore_from {
            Some(snap) => match self.registry.store.get_snapshot(snap)? {
                Some(snap) if snap.with_memory => Some(snap),
                _ => None,
            },
            None => None,
        };
        self.start_locked(&vm, restore.as_ref(), events).await
    }

    /// Starts a VM whose lock the caller holds: a boot, or with `restore` a
    /// resume of that snapshot's saved state (whose disks the VM already
    /// has) under the VM's own identity. A guest that dies of a KVM
    /// internal error on an accelerator banger chose marks KVM unusable
    /// here and is started again at once under TCG, saying so.
    pub(super) async fn start_locked(
        &self,
        vm: &VmRecord,
        restore: Option<&SnapshotRecord>,
        events: Events<VmEvent>,
    ) -> OpResult<VmInfo> {
        let died = std::sync::Mutex::new(None);
        let first = self.start_once(vm, restore, events.clone(), &died).await;
        let death = died.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (first, death) {
            (Err(_), Some(KvmDeath { line, retry: true })) => {
                crate::vm::accel::mark_unusable(&self.registry.paths.state_dir, &line);
                let message = format!(
                    "the guest died on KVM ({line}): KVM cannot run guest kernels on this host, \
                     so banger uses TCG (software emulation, slower) from now on; booting again \
                     under TCG (`banger doctor` says so; qemu.accel = \"tcg\" skips KVM)"
                );
                tracing::warn!(vm = %vm.name, %line, "a guest died on KVM: retrying under TCG");
                events.emit(&VmEvent::Notice { message });
                self.start_once(vm, restore, events, &died).await
            }
            (first, _) => first,
        }
    }

    async fn start_once(
        &self,
        vm: &VmRecord,
        restore: Option<&SnapshotRecord>,
        events: Events<VmEvent>,
        died: &std::sync::Mutex<Option<KvmDeath>>,
    ) -> OpResult<VmInfo> {
        let vm = vm.clone();
        let vmm = self.registry.vmm(vm.vmm)?;
        self.registry.network.check_vmm(vm.vmm)?;
        let kernel = self.kernels.get(&vm.kernel)?;
        self.registry.clean_run_files(&vm);
        let mut steps = Steps::new(self.fail_point());

        step(&events, "initramfs", 1, STEPS_START);
        let initrd = match restore {
            // The guest's memory holds what the snapshot's initramfs put
            // there; QEMU is given that file again so the machines match.
            // Kept in the VM's directory while it runs, like a booted VM's:
            // a snapshot of the restored VM copies it from there.
            Some(snap) => {
                steps.begin("initramfs")?;
                let initrd = Path::new(&vm.dir).join(INITRD_FILE);
                let _ = std::fs::remove_file(&initrd);
                crate::vm::disk::clone_file(&Path::new(&snap.dir).join(INITRD_FILE), &initrd)
                    .map_err(|e| {
                        OpError::writing(format!("copying the initramfs: {e}"), Path::new(&vm.dir))
                    })?;
                let (dir, files) = (PathBuf::from(&vm.dir), vmm.run_files());
                steps.undo("initramfs", move || remove_run_files(&dir, files));
                initrd
            }
            None => {
                self.write_initramfs(&vm, &kernel, vmm.as_ref(), &mut steps)
                    .await?
            }
        };
        let disks = self.disks(&vm, &mut steps)?;
        steps.begin("network")?;
        let nic = self.registry.network.attach(vm.ip.as_deref())?;
        let (network, undo_nic, undo_ip) = (
            self.registry.network.clone(),
            nic.as_ref().and_then(|n| n.tap().map(String::from)),
            vm.ip.clone(),
        );
        steps.undo("network", move || {
            network.detach(undo_nic.as_deref(), undo_ip.as_deref())
        });
        let identity = match restore {
            Some(_) => Some(self.identity(&vm, nic.as_ref().map(|n| n.mac.clone()))?),
            None => None,
        };

        step(&events, "launch", 2, STEPS_START);
        let dir = PathBuf::from(&vm.dir);
        let spec = BootSpec {
            dir: dir.clone(),
            vmlinux: PathBuf::from(&kernel.vmlinux_path),
            initrd,
            disks,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            console_log: console::path(&dir),
            nic,
            restore: restore.map(|snap| PathBuf::from(&snap.dir)),
            cpu_quota: vm.cpu_quota,
        };
        let started_from = match restore {
            None => "boot".to_string(),
            Some(snap) if snap.template.is_some() => format!("template {}", snap.name),
            Some(snap) => format!("snapshot {}", snap.name),
        };
        // Armed before the launch: only this boot's words count.
        let watch = vmm.fatal_watch(&dir).map(FatalWatch::from_now);
        let pid = self.launch(&vm, vmm.as_ref(), &spec, started_from, &mut steps)?;
        // Listening before the guest can connect: after the launch, since a
        // jailed VMM's sockets live in the jail it makes.
        let ctl = control_endpoint(vmm.as_ref(), Path::new(&vm.dir))?;
        steps.begin("configure")?;
        let launcher = self.registry.launcher.clone();
        let alive = move || launcher.alive(pid);
        if let Err(e) = vmm.configure(&spec, &alive).await {
            return Err(boot_failed(&vm, "configure", e));
        }

        step(&events, "agent", 3, STEPS_START);
        let ready = self
            .await_ready(
                &vm,
                vmm.as_ref(),
                ctl,
                pid,
                watch.clone(),
                identity,
                &events,
                &mut steps,
            )
            .await;
        let session = match (ready, watch) {
            (Ok(session), watch) => {
                if watch.is_some_and(|w| w.watch.retry_without_kvm) {
                    crate::vm::accel::mark_kernel_ran(&self.registry.paths.state_dir);
                }
                session
            }
            (Err(e), Some(watch)) => match watch.fired() {
                Some(line) => {
                    *died.lock().unwrap_or_else(|p| p.into_inner()) = Some(KvmDeath {
                        line: line.clone(),
                        retry: watch.watch.retry_without_kvm,
                    });
                    return Err(boot_failed(
                        &vm,
                        "kernel",
                        format!(
                            "its guest died on KVM ({line}): this host's KVM cannot run it; \
                             set qemu.accel = \"tcg\" (or BANGER_QEMU_ACCEL=tcg)"
                        ),
                    ));
                }
                None => return Err(e),
            },
            (Err(e), None) => return Err(e),
        };
        // The workspace is in place before the first command; a failure here
        // is said, and the next exec tries again.
        if let Some(ws) = self.workspaces.record(&vm.name)? {
            let told = events.clone();
            let progress: crate::services::workspace::Progress =
                std::sync::Arc::new(move |p| told.emit(&VmEvent::Workspace(p)));
            if let Err(e) = self
                .workspaces
                .sync_with(&vm, &ws, &session, Default::default(), Some(progress))
                .await
            {
                tracing::warn!(vm = %vm.name, error = %e.message, "workspace sync at start failed");
            }
        }
        self.sessions.keep(&vm.name, session).await;
        step(&events, "ready", 5, STEPS_START);
        if vm.restore_from.is_some() {
            self.registry.store.set_restore_from(&vm.name, None)?;
        }
        steps.commit();
        let network = self.registry.network.clone();
        tokio::task::spawn_blocking(move || network.refill());
        tracing::info!(vm = %vm.name, pid = pid.pid, "VM running");
        self.registry.info(&vm)
    }

    /// Phase 1: this boot's initramfs, the kernel's modules and the agent
    /// followed by the VM's boot config.
    async fn write_initramfs(
        &self,
        vm: &VmRecord,
        kernel: &KernelInfo,
        vmm: &dyn Vmm,
        steps: &mut Steps,
    ) -> OpResult<PathBuf> {
        steps.begin("initramfs")?;
        let dir = PathBuf::from(&vm.dir);
        let agent = crate::agent_bin::locate(self.registry.config.agent_binary.as_deref())?;
        let mut bytes = self.kernels.initramfs(kernel, &agent).await?;
        let host_key = std::fs::read_to_string(dir.join("host_key"))
            .map_err(|e| OpError::internal(format!("reading the VM's host key: {e}")))?;
        let state_dir = &self.registry.paths.state_dir;
        let client_key = keys::client_key(state_dir)?;
        let image_env = self
            .images
            .inspect(std::slice::from_ref(&vm.image))
            .map(|mut i| i.remove(0).config.env)
            .unwrap_or_default();
        let boot = BootConfig {
            protocol: AGENT_PROTOCOL,
            hostname: vm.name.clone(),
            root_device: ROOT_DEVICE.into(),
            root_upper: (vm.root_mode == RootMode::Overlay).then(|| UPPER_DEVICE.into()),
            work_device: Some(WORK_DEVICE.into()),
            work_mount: Some(WORK_MOUNT.into()),
            host_key,
            authorized_keys: vec![keys::public_openssh(&client_key)?],
            user_keys: crate::vm::user_keys::load(&self.registry.config.ssh, self.runner.as_ref()),
            transport: vmm.transport(),
            env: image_env,
            network: self.registry.network.guest(vm.ip.as_deref())?,
        };
        let initrd = dir.join(INITRD_FILE);
        bytes.extend_from_slice(&initramfs::vm_archive(
            &serde_json::to_vec(&boot).expect("serialises"),
        ));
        keys::write_private(&initrd, "")?;
        std::fs::write(&initrd, bytes)?;
        let files = vmm.run_files();
        steps.undo("initramfs", move || remove_run_files(&dir, files));
        Ok(initrd)
    }

    /// Phase 2: the disks the VMM gets, in the guest's order (the devices
    /// below): the root (the VM's own file, a snapshot device over its
    /// image, or with an overlay root the image itself, read-only), the work
    /// disk, and an overlay root's writable layer.
    fn disks(&self, vm: &VmRecord, steps: &mut Steps) -> OpResult<Vec<Disk>> {
        let dir = PathBuf::from(&vm.dir);
        let disk = |id, path, read_only| Disk {
            id,
            path,
            read_only,
        };
        let work = disk("work", dir.join(disk::WORK_FILE), false);
        let root = match vm.root_mode {
            RootMode::Overlay => {
                let image = disk("image", self.origin(vm)?, true);
                return Ok(vec![
                    image,
                    work,
                    disk("upper", dir.join(UPPER_FILE), false),
                ]);
            }
            RootMode::DmSnapshot => self.snapshot_device(vm, steps)?,
            RootMode::Reflink | RootMode::Copy => dir.join(disk::ROOT_FILE),
        };
        Ok(vec![disk("root", root, false), work])
    }

    /// The image file the VM was made from, never a newer pull of its name.
    fn origin(&self, vm: &VmRecord) -> OpResult<PathBuf> {
        Ok(PathBuf::from(match &vm.origin {
            Some(origin) => origin.clone(),
            None => {
                self.images
                    .inspect(std::slice::from_ref(&vm.image))?
                    .remove(0)
                    .rootfs_path
            }
        }))
    }

    fn snapshot_device(&self, vm: &VmRecord, steps: &mut Steps) -> OpResult<PathBuf> {
        steps.begin("snapshot")?;
        let dir = PathBuf::from(&vm.dir);
        let origin = self.origin(vm)?;
        let state = dir.join("dm.state");
        let blockdevs = self.registry.blockdevs.clone();
        let owner = self.registry.snapshot_owner(&vm.name);
        let dev = blockdevs
            .setup_snapshot(&owner, &origin, &dir.join(disk::COW_FILE), &state)
            .map_err(|e| OpError::internal(format!("setting up the root disk snapshot: {e}")))?;
        steps.undo("snapshot", move || {
            let _ = blockdevs.teardown_snapshot(&owner, &state);
        });
        Ok(dev)
    }

    /// Phase 4: the VMM process (in its jail, for a jailed backend),
    /// recorded as the VM's runtime.
    fn launch(
        &self,
        vm: &VmRecord,
        vmm: &dyn Vmm,
        spec: &BootSpec,
        started_from: String,
        steps: &mut Steps,
    ) -> OpResult<ProcessId> {
        steps.begin("launch")?;
        if let Err(e) = console::rotate_if_big(&spec.dir) {
            tracing::warn!(vm = %vm.name, error = %e, "cannot rotate the console log");
        }
        mark_boot(&spec.console_log);
        // From the moment the VMM runs, the guest may change its workspace:
        // the count a clean stop takes is void until the next clean stop.
        if let Some(before) = self.workspaces.guest_may_change(&vm.name) {
            let (workspaces, name) = (self.workspaces.clone(), vm.name.clone());
            steps.undo("workspace count", move || {
                workspaces.restore_guest_count(&name, before)
            });
        }
        let jail = vmm.jail(spec)?;
        let jailed = jail.is_some();
        let pid = match jail {
            Some(request) => {
                let jails = self.registry.jails.clone().ok_or_else(|| {
                    OpError::internal("a jailed VMM was asked for, but no jailer is set up")
                })?;
                // A launch that failed midway may leave a jail: it goes too.
                let (undo_jails, undo_name) = (jails.clone(), vm.name.clone());
                steps.undo("jail", move || {
                    let _ = undo_jails.teardown(&undo_name);
                });
                jails.launch(&request).map_err(|e| {
                    boot_failed(
                        vm,
                        "launch",
                        format!("launching {} in its jail: {e}", vm.vmm),
                    )
                })?
            }
            None => self
                .registry
                .launcher
                .launch(&vmm.command(spec)?)
                .map_err(|e| OpError::internal(format!("launching {}: {e}", vm.vmm)))?,
        };
        steps.undo("launch", self.registry.stopper(&vm.name, pid, jailed));

        steps.begin("runtime")?;
        let store = self.registry.store.clone();
        store.set_runtime(&VmRuntime {
            name: vm.name.clone(),
            pid: pid.pid,
            start_time: pid.start_time,
            started_at: ids::now_rfc3339(),
            tap: spec
                .nic
                .as_ref()
                .and_then(|n: &Nic| n.tap().map(String::from)),
            network: spec.nic.as_ref().map(|n| match n.backend {
                NicBackend::Tap(_) => NetworkMode::Bridged,
                NicBackend::User => NetworkMode::User,
            }),
            paused: false,
            started_from: Some(started_from),
            held: false,
            jailed,
        })?;
        let undo_name = vm.name.clone();
        steps.undo("runtime", move || {
            let _ = store.clear_runtime(&undo_name);
        });
        Ok(pid)
    }

    /// Phase 5: the agent reports the guest ready, and its SSH session is
    /// up. A restored guest is first given its `identity`, and only then
    /// connected to (its SSH port still holds the snapshot's session).
    #[allow(clippy::too_many_arguments)]
    async fn await_ready(
        &self,
        vm: &VmRecord,
        vmm: &dyn Vmm,
        ctl: Ctl,
        pid: ProcessId,
        watch: Option<ArmedWatch>,
        identity: Option<Identity>,
        events: &Events<VmEvent>,
        steps: &mut Steps,
    ) -> OpResult<AgentSession> {
        steps.begin("agent")?;
        let launcher = self.registry.launcher.clone();
        // A VMM whose guest died (KVM's internal error halts it, QEMU stays
        // up) counts as gone: the boot fails now, not at the timeout.
        let alive =
            move || launcher.alive(pid) && watch.as_ref().is_none_or(|w| w.fired().is_none());
        let timeout = Duration::from_secs(self.registry.config.boot_timeout_secs.unwrap_or(60));
        // The handshake runs while the guest finishes booting: the agent
        // serves SSH before its disks are mounted. A virtio-serial port holds
        // the host's bytes until the guest opens it, so there the daemon
        // connects at launch; over vsock it waits for the agent's "ssh" report.
        let restoring = identity.is_some();
        let connect_at_launch = vmm.transport() == Transport::VirtioSerial && !restoring;
        let (ssh_up, ssh_signal) = tokio::sync::oneshot::channel::<()>();
        let mut ssh_up = Some(ssh_up);
        let give = match &identity {
            Some(identity) => agent_client::Give::Always(identity),
            None => agent_client::Give::Nothing,
        };
        let waiting = agent_client::wait_ready_as(ctl, give, timeout, &alive, move |stage| {
            events.emit(&VmEvent::Agent {
                stage: stage.to_string(),
            });
            if stage == "ssh" {
                if let Some(tx) = ssh_up.take() {
                    let _ = tx.send(());
                }
            }
        });
        let early = async {
            if restoring || (!connect_at_launch && ssh_signal.await.is_err()) {
                return None;
            }
            let started = std::time::Instant::now();
            let session = tokio::time::timeout(timeout, self.sessions.open_early(vm, vmm, &alive))
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
            return Err(boot_failed(vm, &failure.stage, &failure.message));
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

        step(events, "ssh", 4, STEPS_START);
        steps.begin("ssh")?;
        match early {
            Some(Ok(session)) => Ok(session),
            // The "ssh" report was coalesced away, or the early attempt lost a race.
            early => {
                if let Some(Err(e)) = early {
                    tracing::info!(vm = %vm.name, error = %e, "early SSH connect failed; trying again");
                }
                self.sessions.open(vm, vmm).await.map_err(|e| {
                    let why = if alive() {
                        e.to_string()
                    } else {
                        format!("{e} (the VMM has exited)")
                    };
                    boot_failed(vm, "ssh", why)
                })
            }
        }
    }
}

impl VmLifecycle {
    /// Who a restored VM is to become: its own name, host key and address
    /// (whatever VM the snapshot was taken of), the time now, fresh entropy.
    pub(super) fn identity(&self, vm: &VmRecord, mac: Option<String>) -> OpResult<Identity> {
        let host_key = std::fs::read_to_string(Path::new(&vm.dir).join("host_key"))
            .map_err(|e| OpError::internal(format!("reading the VM's host key: {e}")))?;
        let mut entropy = [0u8; 64];
        rand::fill(&mut entropy[..]);
        let unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        Ok(Identity {
            hostname: vm.name.clone(),
            host_key,
            network: self.registry.network.guest(vm.ip.as_deref())?,
            mac,
            unix_time_ns,
            entropy: entropy.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

/// Where the agent's control connection comes in. Firecracker forwards it
/// to a socket that must be listening before the guest boots.
pub(super) fn control_endpoint(vmm: &dyn Vmm, dir: &Path) -> OpResult<Ctl> {
    Ok(match vmm.ctl(dir) {
        CtlEndpoint::Connect(path) => Ctl::Connect(path),
        CtlEndpoint::Listen(path) => {
            let _ = std::fs::remove_file(&path);
            let short = crate::vm::sockpath::SockPath::new(&path)?;
            let listener = tokio::net::UnixListener::bind(short.path())
                .map_err(|e| OpError::internal(format!("listening on {}: {e}", path.display())))?;
            if vmm.jail_root(dir).is_some() {
                // The jail's Firecracker runs as a uid of its own, granted
                // this socket by the jail root's default ACL: a mode without
                // group bits would mask that grant away.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o770)).map_err(
                    |e| OpError::internal(format!("opening {} to the jail: {e}", path.display())),
                )?;
            }
            Ctl::Listener(listener)
        }
    })
}
