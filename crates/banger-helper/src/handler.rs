//! One request in, one reply out: the policy first, then the host operation
//! through the same traits a root daemon uses in-process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_host::jail::Opened;
use banger_host::net::{check_guest, check_tap};
use banger_host::{
    BlockDevices, HostError, HostNetwork, Instance, Jails, NetSetup, RealJails, SnapshotOwner,
};
use banger_proto::helper::{HelperReply, HelperRequest, HelperValue, JailPlace, HELPER_PROTOCOL};
use banger_proto::jail::{is_home_id, is_jail_name, JailRequest};

use crate::networks::Networks;
use crate::policy::{Caller, Policy, Refusal};

pub struct Helper {
    pub policy: Policy,
    net: Arc<dyn HostNetwork>,
    blocks: Arc<dyn BlockDevices>,
    state_dir: PathBuf,
    /// The network instances set up, each for one uid.
    networks: Networks,
    jail: Option<JailSetup>,
}

/// The jailer the helper runs, the Firecrackers it may hand the jailer,
/// and where its callers' jails live (each uid under its own directory).
#[derive(Debug, Clone)]
pub struct JailSetup {
    pub jailer: PathBuf,
    pub dir: PathBuf,
    /// Canonical paths, each checked by [`Policy::trusted_binary`] when the
    /// helper started: the jailer copies one into a caller's jail, so
    /// nothing a caller names is ever launched or copied.
    pub firecrackers: Vec<PathBuf>,
    /// Each jail's own uid comes from here (checked at start to hold no
    /// user or group), chosen under the host-wide lock `ids_lock`.
    pub ids: banger_host::jail_ids::JailIds,
    pub ids_lock: PathBuf,
}

enum Failure {
    Refused(String),
    Failed(String),
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Failure::Refused(r.0)
    }
}

impl From<HostError> for Failure {
    fn from(e: HostError) -> Self {
        match e {
            HostError::Refused(m) => Failure::Refused(m),
            other => Failure::Failed(other.to_string()),
        }
    }
}

type Handled = Result<HelperValue, Failure>;

impl Helper {
    pub fn new(
        policy: Policy,
        net: Arc<dyn HostNetwork>,
        blocks: Arc<dyn BlockDevices>,
        state_dir: PathBuf,
        jail: Option<JailSetup>,
    ) -> std::io::Result<Helper> {
        std::fs::create_dir_all(state_dir.join("dm"))?;
        let networks = Networks::load(&state_dir.join("networks.json"));
        let helper = Helper {
            policy,
            net,
            blocks,
            state_dir,
            networks,
            jail,
        };
        helper.sweep_jails();
        helper.prune_networks();
        Ok(helper)
    }

    /// Removes every instance whose state directory is gone and whose taps
    /// nobody holds, and forgets it: at start, and before each setup (an
    /// orphan may hold the subnet wanted). Nothing the caller says decides
    /// what goes; only the owner files and the taps.
    fn prune_networks(&self) {
        match self.net.prune_orphans() {
            Ok(pruned) => self.networks.forget_orphans(&pruned),
            Err(e) => tracing::warn!(error = %e, "could not look for orphaned banger networks"),
        }
    }

    /// Whether `owner` is the caller's own regular file inside the allowed
    /// directories, opened as the caller, holding `instance`'s id. One that
    /// is not is left out (the instance is then never removed as an
    /// orphan): the helper reads owner files as root later, so it only
    /// takes ones the caller could read and wrote.
    fn owner_checks_out(&self, caller: &Caller, owner: &Path, instance: &Instance) -> bool {
        use std::io::Read;
        let checked = self.policy.caller_file(caller, owner, false).and_then(|f| {
            let mut text = String::new();
            f.take(64)
                .read_to_string(&mut text)
                .map_err(|e| Refusal(e.to_string()))?;
            if text.trim() == instance.id() {
                Ok(())
            } else {
                Err(Refusal(format!(
                    "it does not hold the instance id {instance}"
                )))
            }
        });
        match checked {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(owner = %owner.display(), error = %e, "network owner file not taken: the instance will not be removed if its state directory goes");
                false
            }
        }
    }

    /// The jails of `uid`'s state directory `home`: their own directory,
    /// records and cgroup.
    fn jails_for(&self, uid: u32, gid: u32, home: &str) -> Result<RealJails, Failure> {
        let jail = self.jail_setup()?;
        check_home(home)?;
        Ok(RealJails {
            jailer: jail.jailer.clone(),
            base: jail.dir.join(uid.to_string()).join(home),
            records: self
                .state_dir
                .join("jails")
                .join(uid.to_string())
                .join(home),
            uid,
            gid,
            cgroup_parent: format!("banger/{uid}/{home}"),
            ids: jail.ids,
            ids_lock: jail.ids_lock.clone(),
        })
    }

    /// Jails whose Firecracker is gone (a helper restart, a reboot) are
    /// removed when the helper starts.
    fn sweep_jails(&self) {
        let Some(jail) = &self.jail else { return };
        let Ok(uids) = std::fs::read_dir(&jail.dir) else {
            return;
        };
        let homes = uids.flatten().flat_map(|uid| {
            let homes = std::fs::read_dir(uid.path())
                .into_iter()
                .flatten()
                .flatten();
            homes.map(move |home| (uid.file_name(), home.file_name()))
        });
        for (uid, home) in homes {
            let (Some(uid), Some(home)) = (
                uid.to_str().and_then(|u| u.parse::<u32>().ok()),
                home.to_str(),
            ) else {
                continue;
            };
            let Ok(jails) = self.jails_for(uid, uid, home) else {
                continue;
            };
            let Ok(execs) = std::fs::read_dir(&jails.base) else {
                continue;
            };
            for vm in execs
                .flatten()
                .filter_map(|e| std::fs::read_dir(e.path()).ok())
                .flatten()
                .flatten()
            {
                let Some(name) = vm.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !jails.running(&name) {
                    if let Err(e) = jails.teardown(&name) {
                        tracing::warn!(uid, vm = %name, error = %e, "cannot remove a stale jail");
                    }
                }
            }
        }
    }

    fn jail_launch(&self, caller: &Caller, request: JailRequest) -> Handled {
        let jails = self.jails_for(caller.uid, caller.gid, &request.home)?;
        self.policy.vm_name(&request.vm)?;
        let firecracker = self.firecracker(&request.firecracker)?;
        if let Some(tap) = &request.tap {
            // Lent to the jail's uid: only a tap of the caller's own network.
            self.networks.owned(caller, &check_tap(tap)?)?;
        }
        let exec_name = firecracker
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut opened = Vec::new();
        let mut names = std::collections::HashSet::new();
        for f in &request.files {
            if !is_jail_name(&f.name) || f.name == exec_name || !names.insert(f.name.clone()) {
                return Err(Failure::Refused(format!(
                    "`{}` cannot be a file in the jail (one plain name, used once, not `{exec_name}`)",
                    f.name
                )));
            }
            let file = if f.path.starts_with("/dev") {
                let owner = self.snapshot_owner(caller, &request.home, &request.vm)?;
                self.own_device(&owner, &f.path)?
            } else {
                self.policy.caller_file(caller, &f.path, f.writable)?
            };
            opened.push(Opened {
                file,
                name: f.name.clone(),
                writable: f.writable,
            });
        }
        let console = self.policy.caller_file(caller, &request.console, true)?;
        // Appended to, as the daemon's own VMMs' logs are.
        nix::fcntl::fcntl(
            &console,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_APPEND),
        )
        .map_err(|e| Failure::Failed(format!("the console log: {e}")))?;
        if let Some(q) = request.limits.cpu_quota {
            self.policy.cpu_quota(q)?;
        }
        if let Some(mib) = request.limits.memory_mib {
            let host = host_memory_mib();
            if mib == 0 || mib > host {
                return Err(Failure::Refused(format!(
                    "a memory ceiling of {mib} MiB is outside 1..={host} MiB (this host's memory)"
                )));
            }
        }
        let checked = JailRequest {
            firecracker,
            ..request
        };
        let id = jails.launch_opened(&checked, opened, console)?;
        Ok(HelperValue::Process {
            pid: id.pid,
            start_time: id.start_time,
        })
    }

    /// One of the Firecrackers the helper was started with, by its
    /// canonical path, still as trusted as it was then.
    /// The jailer and what goes with it, when the helper has one.
    fn jail_setup(&self) -> Result<&JailSetup, Failure> {
        self.jail.as_ref().ok_or_else(|| {
            Failure::Refused("this root helper has no jailer (start it with --jailer PATH)".into())
        })
    }

    fn firecracker(&self, path: &Path) -> Result<PathBuf, Failure> {
        let jail = self.jail_setup()?;
        let canonical = path.canonicalize().ok();
        match jail
            .firecrackers
            .iter()
            .find(|f| Some(*f) == canonical.as_ref())
        {
            Some(known) => Ok(self.policy.trusted_binary(known)?),
            None => Err(Failure::Refused(format!(
                "{} is not a Firecracker this helper launches ({}); restart the helper with \
                 --firecracker PATH to add one",
                path.display(),
                if jail.firecrackers.is_empty() {
                    "it has none".to_string()
                } else {
                    jail.firecrackers
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ))),
        }
    }

    /// The caller's snapshot device of VM `vm` of its state directory
    /// `home`: the uid is the connection's, never one the request names.
    fn snapshot_owner(
        &self,
        caller: &Caller,
        home: &str,
        vm: &str,
    ) -> Result<SnapshotOwner, Failure> {
        self.policy.vm_name(vm)?;
        check_home(home)?;
        Ok(SnapshotOwner {
            uid: caller.uid,
            home: home.into(),
            vm: vm.into(),
        })
    }

    /// The node of a snapshot device this helper set up for `owner`,
    /// opened; no other device reaches a jail.
    fn own_device(&self, owner: &SnapshotOwner, path: &Path) -> Result<std::fs::File, Failure> {
        let name = owner.name();
        if !self.dm_record(&name).exists() {
            return Err(Failure::Refused(format!(
                "{} is not a snapshot device this helper set up for VM `{}` of yours",
                path.display(),
                owner.vm
            )));
        }
        Ok(self.policy.vm_device(&name, path)?)
    }

    fn snapshot_setup(
        &self,
        owner: &SnapshotOwner,
        origin: &Path,
        cow: &Path,
        caller: &Caller,
    ) -> Handled {
        // Held open and handed to losetup by descriptor: what was checked
        // is what gets attached.
        let origin = self.policy.caller_file(caller, origin, false)?;
        let cow = self.policy.caller_file(caller, cow, true)?;
        let by_fd = |f: &std::fs::File| {
            use std::os::fd::AsRawFd;
            PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()))
        };
        let name = owner.name();
        // Recorded first: a device is never there without its owner known.
        let record = self.dm_record(&name);
        std::fs::write(
            &record,
            format!("{} {} {}\n", owner.uid, owner.home, owner.vm),
        )
        .map_err(|e| Failure::Failed(format!("recording the snapshot device: {e}")))?;
        match self.blocks.setup_snapshot(
            owner,
            &by_fd(&origin),
            &by_fd(&cow),
            &self.dm_state(&name),
        ) {
            Ok(device) => Ok(HelperValue::Device(device)),
            Err(e) => {
                let _ = std::fs::remove_file(&record);
                Err(e.into())
            }
        }
    }

    fn snapshot_teardown(&self, owner: &SnapshotOwner) -> Handled {
        let name = owner.name();
        // Only what this helper set up, for this very caller.
        if self.dm_record(&name).exists() {
            self.blocks
                .teardown_snapshot(owner, &self.dm_state(&name))?;
            let _ = std::fs::remove_file(self.dm_record(&name));
        }
        Ok(HelperValue::Done)
    }

    pub fn handle(&self, caller: &Caller, request: HelperRequest) -> HelperReply {
        match self.dispatch(caller, request) {
            Ok(value) => HelperReply::Ok(value),
            Err(Failure::Refused(m)) => HelperReply::Refused(m),
            Err(Failure::Failed(m)) => HelperReply::Failed(m),
        }
    }

    fn dispatch(&self, caller: &Caller, request: HelperRequest) -> Handled {
        use HelperRequest as R;
        match request {
            R::Ping => Ok(HelperValue::Pong {
                protocol: HELPER_PROTOCOL,
                version: env!("CARGO_PKG_VERSION").into(),
                uid: caller.uid,
                jails: self.jail.as_ref().map(|j| JailPlace {
                    jailer: j.jailer.clone(),
                    base: j.dir.join(caller.uid.to_string()),
                    firecrackers: j.firecrackers.clone(),
                }),
            }),
            R::NetSetup {
                instance,
                subnet,
                dns_port,
                domain,
                owner,
            } => {
                if !banger_host::net::is_domain(&domain) {
                    return Err(Failure::Refused(format!(
                        "`{domain}` is not a DNS label (like `vm`)"
                    )));
                }
                if let Some(owner) = &owner {
                    banger_host::net_orphans::check_owner(owner).map_err(Failure::Refused)?;
                }
                let instance = instance_of(&instance)?;
                let owner = owner.filter(|o| self.owner_checks_out(caller, o, &instance));
                let setup = NetSetup {
                    instance,
                    subnet: self.policy.subnet(&subnet)?,
                    dns_port: self.policy.dns_port(dns_port)?,
                    domain,
                    owner,
                };
                self.prune_networks();
                self.networks.set_up(caller, &setup, || {
                    self.net.setup(&setup).map_err(Failure::from)
                })?;
                Ok(HelperValue::Done)
            }
            R::NetTeardown { instance } => {
                let instance = instance_of(&instance)?;
                if !self.networks.known(&instance) {
                    return Ok(HelperValue::Done); // Nothing of it was made here.
                }
                self.networks.owned(caller, &instance)?;
                self.net.teardown(&instance)?;
                self.networks.forget(&instance);
                Ok(HelperValue::Done)
            }
            R::TapCreate { tap } => {
                self.networks.owned(caller, &check_tap(&tap)?)?;
                // The tap belongs to whoever asked, whatever they might claim.
                self.net.create_tap(&tap, caller.uid)?;
                Ok(HelperValue::Done)
            }
            R::TapDelete { tap } => {
                self.networks.owned(caller, &check_tap(&tap)?)?;
                self.net.delete_tap(&tap)?;
                Ok(HelperValue::Done)
            }
            R::TapList { instance } => {
                let instance = instance_of(&instance)?;
                self.networks.owned(caller, &instance)?;
                Ok(HelperValue::Taps(self.net.taps(&instance)?))
            }
            R::Route { tap, guest } => {
                let setup = self.networks.owned(caller, &check_tap(&tap)?)?;
                self.net.route(&tap, guest, &setup)?;
                Ok(HelperValue::Done)
            }
            R::Unroute { instance, guest } => {
                let setup = self.networks.owned(caller, &instance_of(&instance)?)?;
                check_guest(guest, &setup)?;
                self.net.unroute(&setup.instance, guest)?;
                Ok(HelperValue::Done)
            }
            R::SnapshotSupported => Ok(HelperValue::Bool(self.blocks.snapshot_supported())),
            R::SnapshotSetup {
                home,
                vm,
                origin,
                cow,
            } => {
                let owner = self.snapshot_owner(caller, &home, &vm)?;
                self.snapshot_setup(&owner, &origin, &cow, caller)
            }
            R::JailLaunch(request) => self.jail_launch(caller, request),
            R::JailSignal { home, vm, signal } => {
                self.policy.vm_name(&vm)?;
                if signal != libc::SIGTERM && signal != libc::SIGKILL {
                    return Err(Failure::Refused(format!(
                        "signal {signal} is not one the helper sends (TERM or KILL)"
                    )));
                }
                self.jails_for(caller.uid, caller.gid, &home)?
                    .signal(&vm, signal)?;
                Ok(HelperValue::Done)
            }
            R::JailTeardown { home, vm } => {
                self.policy.vm_name(&vm)?;
                self.jails_for(caller.uid, caller.gid, &home)?
                    .teardown(&vm)?;
                Ok(HelperValue::Done)
            }
            R::SnapshotTeardown { home, vm } => {
                let owner = self.snapshot_owner(caller, &home, &vm)?;
                self.snapshot_teardown(&owner)
            }
        }
    }

    /// Where the loop devices of a snapshot are recorded: the helper's own
    /// directory, never one a caller can write.
    fn dm_state(&self, name: &str) -> PathBuf {
        self.state_dir.join("dm").join(format!("{name}.state"))
    }

    /// The record that this helper set a device up, and for whom (uid,
    /// home, VM: also in its name). Root-only, like the loop records.
    fn dm_record(&self, name: &str) -> PathBuf {
        self.state_dir.join("dm").join(format!("{name}.owner"))
    }
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// A caller's state directory id (what its jails and devices are kept under).
fn check_home(home: &str) -> Result<(), Failure> {
    if !is_home_id(home) {
        return Err(Failure::Refused(format!(
            "`{home}` is not a state directory id"
        )));
    }
    Ok(())
}

fn instance_of(id: &str) -> Result<Instance, Failure> {
    Instance::parse(id).map_err(Failure::Refused)
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
