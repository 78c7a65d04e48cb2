//! `vm set`: a stopped VM's vCPUs, memory and disk sizes changed (a
//! running one stopped and started again around it when asked). Disks only
//! grow, offline: the file is extended and its ext4 grown by the daemon, so
//! the guest sees the new size at its next boot with nothing to run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_proto::domain::RootMode;
use banger_proto::vm::{SetParams, VmEvent, VmInfo};

use super::lifecycle::VmLifecycle;
use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::vm::{disk, sizing};

/// How long `--restart` waits for the clean stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One disk to grow: which, its file, from and to.
struct Growth {
    what: &'static str,
    file: PathBuf,
    from: u64,
    to: u64,
}

impl VmLifecycle {
    pub async fn set(&self, p: SetParams, events: Events<VmEvent>) -> OpResult<VmInfo> {
        if p.vcpus.is_none()
            && p.memory_mib.is_none()
            && p.disk_bytes.is_none()
            && p.work_disk_bytes.is_none()
            && p.cpu_quota.is_none()
        {
            return Err(OpError::invalid(
                "nothing to change: pass --vcpus, --memory, --disk, --work-disk or --cpu-quota",
            ));
        }
        let _guard = self.registry.lock(&p.name).await;
        let vm = self.registry.record(&p.name)?;
        let name = &vm.name;
        let running = self.registry.live(name)?.is_some();
        if running && !p.restart {
            return Err(OpError::conflict(format!(
                "VM `{name}` is running; stop it first (`banger vm stop {name}`), or pass \
                 --restart to stop it, change it and start it again"
            )));
        }
        if let Some(snap) = &vm.restore_from {
            return Err(OpError::conflict(format!(
                "VM `{name}` resumes snapshot `{snap}` at its first start, as the snapshot's \
                 machine (its CPUs, memory and disks); start it once (`banger vm start {name}`), \
                 stop it, then change it"
            )));
        }
        // Everything is checked before anything changes.
        let host = sizing::Host::probe();
        let vcpus = p
            .vcpus
            .map(|n| sizing::vcpus(n, vm.vmm, host))
            .transpose()?;
        let memory_mib = p
            .memory_mib
            .map(|mib| sizing::memory_mib(mib, host))
            .transpose()?;
        // 0 removes a quota; any other value is checked as at create.
        let cpu_quota = match p.cpu_quota {
            Some(0) => Some(None),
            Some(q) => {
                self.check_cpu_quota(vm.vmm, q)?;
                Some(Some(q))
            }
            None => None,
        };
        let dir = Path::new(&vm.dir);
        let mut growths = Vec::new();
        if let Some(to) = p.disk_bytes {
            if vm.root_mode == RootMode::DmSnapshot {
                return Err(OpError::conflict(format!(
                    "VM `{name}`'s root is a dm-snapshot of its image, always the image's \
                         size; its work disk can grow (--work-disk), or make a VM with \
                     --root-mode overlay or reflink for a larger root"
                )));
            }
            let file = dir.join(disk::own_root_file(vm.root_mode));
            growths.extend(growth("root disk", "--disk", file, to)?);
        }
        if let Some(to) = p.work_disk_bytes {
            sizing::work_disk_bytes(to)?;
            growths.extend(growth(
                "work disk",
                "--work-disk",
                dir.join(disk::WORK_FILE),
                to,
            )?);
        }
        if let Some(to) = p.disk_bytes {
            sizing::disk_bytes(to, 0)?;
        }
        let needed: u64 = growths.iter().map(|g| g.to - g.from).sum();
        if let Some(free) = crate::rootfs::extract::free_bytes(dir) {
            if needed > free {
                return Err(OpError::invalid(format!(
                    "growing VM `{name}`'s disks by {} needs that much free space where they \
                     live ({}), which has {}; free some, or grow them less",
                    banger_proto::human_bytes(needed),
                    dir.display(),
                    banger_proto::human_bytes(free)
                )));
            }
        }

        if running {
            self.stop_locked(&vm, STOP_TIMEOUT).await?;
        }
        let runner = self.runner.clone();
        let grown = tokio::task::spawn_blocking(move || -> Result<(), OpError> {
            for g in &growths {
                tracing::info!(disk = g.what, from = g.from, to = g.to, "growing");
                disk::grow_used(runner.as_ref(), &g.file, g.to).map_err(|e| {
                    OpError::internal(format!(
                        "growing the {} ({}): {e}",
                        g.what,
                        g.file.display()
                    ))
                })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| OpError::internal(format!("growing disks: {e}")))?;
        grown?;
        let mut changed = vm.clone();
        changed.vcpus = vcpus.unwrap_or(vm.vcpus);
        changed.memory_mib = memory_mib.unwrap_or(vm.memory_mib);
        if let Some(to) = p.disk_bytes {
            changed.disk_bytes = to.max(vm.disk_bytes);
        }
        self.registry.store.set_vm_sizes(
            name,
            changed.vcpus,
            changed.memory_mib,
            changed.disk_bytes,
        )?;
        if let Some(quota) = cpu_quota {
            changed.cpu_quota = quota;
            self.registry.store.set_cpu_quota(name, quota)?;
        }
        tracing::info!(
            vcpus = changed.vcpus,
            memory_mib = changed.memory_mib,
            disk = changed.disk_bytes,
            "changed"
        );
        if running {
            return self.start_locked(&changed, None, events).await;
        }
        self.registry.info(&changed)
    }
}

/// What growing `file` to `to` takes; none when it is that size already.
/// Shrinking is refused: ext4 cannot shrink while the guest's data may be
/// anywhere on the disk, and a smaller file would cut it off.
fn growth(what: &'static str, flag: &str, file: PathBuf, to: u64) -> OpResult<Option<Growth>> {
    let from = std::fs::metadata(&file)
        .map_err(|e| OpError::internal(format!("{}: {e}", file.display())))?
        .len();
    if to < from {
        return Err(OpError::invalid(format!(
            "{flag} {}: the {what} is {} and disks only grow (the guest's files may be \
             anywhere on it); give at least {}",
            banger_proto::human_bytes(to),
            banger_proto::human_bytes(from),
            banger_proto::human_bytes(from)
        )));
    }
    Ok((to > from).then_some(Growth {
        what,
        file,
        from,
        to,
    }))
}
