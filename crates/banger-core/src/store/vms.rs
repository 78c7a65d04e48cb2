//! VM records (durable) and their runtime handles (transient: pid and start
//! time of the VMM, valid only while that process lives).

use banger_proto::domain::{RootMode, VmmKind};
use rusqlite::{params, OptionalExtension, Row};

use super::Store;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    pub name: String,
    pub image: String,
    pub kernel: String,
    pub vmm: VmmKind,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    pub root_mode: RootMode,
    pub dir: String,
    pub host_key_pub: String,
    pub created_at: String,
    /// The guest's address; none when the VM was made without networking.
    pub ip: Option<String>,
    /// dm-snapshot only: the image rootfs the VM's COW file layers over. A
    /// re-pulled or removed image leaves it in place while a VM names it.
    pub origin: Option<String>,
    /// A fork not yet started: the snapshot its first start resumes from.
    pub restore_from: Option<String>,
    /// CPU time its jailed VMM may use, as a percentage of one host CPU.
    pub cpu_quota: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRuntime {
    pub name: String,
    pub pid: u32,
    pub start_time: u64,
    pub started_at: String,
    /// The host tap backing the VM's network device.
    pub tap: Option<String>,
    /// Paused by `vm pause` (or left so by a snapshot of a paused VM).
    pub paused: bool,
    /// `boot`, or the snapshot (`snapshot NAME`) or warm template
    /// (`template NAME`) this VMM resumed.
    pub started_from: Option<String>,
    /// Its agent was held for a snapshot and not yet released.
    pub held: bool,
    /// How its VMM was given a network; none without one.
    pub network: Option<banger_proto::domain::NetworkMode>,
    /// Its VMM runs in a jail: signalled and torn down through the jailer's
    /// owner (the root helper), not as a plain process.
    pub jailed: bool,
}

impl VmRuntime {
    /// The VMM process this row records.
    pub fn process(&self) -> banger_host::ProcessId {
        banger_host::ProcessId {
            pid: self.pid,
            start_time: self.start_time,
        }
    }
}

const VM_COLUMNS: &str =
    "name, image, kernel, vmm, vcpus, memory_mib, disk_bytes, cow_strategy, dir, host_key_pub, created_at, ip, origin, restore_from, cpu_quota";

fn vm_from_row(row: &Row<'_>) -> rusqlite::Result<VmRecord> {
    Ok(VmRecord {
        name: row.get(0)?,
        image: row.get(1)?,
        kernel: row.get(2)?,
        vmm: word(row, 3)?,
        vcpus: row.get(4)?,
        memory_mib: row.get::<_, i64>(5)? as u64,
        disk_bytes: row.get::<_, i64>(6)? as u64,
        root_mode: word(row, 7)?,
        dir: row.get(8)?,
        host_key_pub: row.get(9)?,
        created_at: row.get(10)?,
        ip: row.get(11)?,
        origin: row.get(12)?,
        restore_from: row.get(13)?,
        cpu_quota: row.get(14)?,
    })
}

/// A column holding one of the domain words; another word is a database
/// this banger cannot read (written by a newer one).
pub(super) fn word<T: std::str::FromStr<Err = String>>(
    row: &Row<'_>,
    i: usize,
) -> rusqlite::Result<T> {
    let text: String = row.get(i)?;
    text.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    })
}

fn runtime_from_row(row: &Row<'_>) -> rusqlite::Result<VmRuntime> {
    Ok(VmRuntime {
        name: row.get(0)?,
        pid: row.get(1)?,
        start_time: row.get::<_, i64>(2)? as u64,
        started_at: row.get(3)?,
        tap: row.get(4)?,
        paused: row.get(5)?,
        started_from: row.get(6)?,
        held: row.get(7)?,
        network: row
            .get::<_, Option<String>>(8)?
            .and_then(|w| w.parse().ok()),
        jailed: row.get(9)?,
    })
}

impl Store {
    pub fn insert_vm(&self, vm: &VmRecord) -> rusqlite::Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO vms ({VM_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)"
            ),
            params![
                vm.name,
                vm.image,
                vm.kernel,
                vm.vmm.as_str(),
                vm.vcpus,
                vm.memory_mib as i64,
                vm.disk_bytes as i64,
                vm.root_mode.as_str(),
                vm.dir,
                vm.host_key_pub,
                vm.created_at,
                vm.ip,
                vm.origin,
                vm.restore_from,
                vm.cpu_quota
            ],
        )?;
        Ok(())
    }

    pub fn get_vm(&self, name: &str) -> rusqlite::Result<Option<VmRecord>> {
        self.conn()
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM vms WHERE name = ?1"),
                [name],
                vm_from_row,
            )
            .optional()
    }

    pub fn list_vms(&self) -> rusqlite::Result<Vec<VmRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {VM_COLUMNS} FROM vms ORDER BY name"))?;
        let rows = stmt.query_map([], vm_from_row)?;
        rows.collect()
    }

    pub fn delete_vm(&self, name: &str) -> rusqlite::Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM vms WHERE name = ?1", [name])?
            > 0)
    }

    /// Names of VMs built from `image`.
    pub fn vms_using_image(&self, image: &str) -> rusqlite::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name FROM vms WHERE image = ?1 ORDER BY name")?;
        let rows = stmt.query_map([image], |r| r.get(0))?;
        rows.collect()
    }

    /// Names of VMs (and `snapshot NAME`s) whose origin is `rootfs`.
    pub fn vms_with_origin(&self, rootfs: &str) -> rusqlite::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name FROM vms WHERE origin = ?1 \
             UNION SELECT 'snapshot ' || name FROM snapshots WHERE origin = ?1 ORDER BY 1",
        )?;
        let rows = stmt.query_map([rootfs], |r| r.get(0))?;
        rows.collect()
    }

    pub fn set_runtime(&self, rt: &VmRuntime) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO vm_runtime (name, pid, start_time, started_at, tap, paused, started_from, held, network, jailed) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
            params![rt.name, rt.pid, rt.start_time as i64, rt.started_at, rt.tap, rt.paused, rt.started_from, rt.held, rt.network.map(|m| m.as_str()), rt.jailed],
        )?;
        Ok(())
    }

    pub fn get_runtime(&self, name: &str) -> rusqlite::Result<Option<VmRuntime>> {
        self.conn()
            .query_row(
                "SELECT name, pid, start_time, started_at, tap, paused, started_from, held, network, jailed FROM vm_runtime WHERE name = ?1",
                [name],
                runtime_from_row,
            )
            .optional()
    }

    pub fn list_runtimes(&self) -> rusqlite::Result<Vec<VmRuntime>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, pid, start_time, started_at, tap, paused, started_from, held, network, jailed FROM vm_runtime",
        )?;
        let rows = stmt.query_map([], runtime_from_row)?;
        rows.collect()
    }

    pub fn setting(&self, key: &str) -> rusqlite::Result<Option<String>> {
        self.conn()
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
    }

    pub fn set_setting(&self, key: &str, value: &str) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn set_paused(&self, name: &str, paused: bool) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE vm_runtime SET paused = ?2 WHERE name = ?1",
            params![name, paused],
        )?;
        Ok(())
    }

    pub fn set_held(&self, name: &str, held: bool) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE vm_runtime SET held = ?2 WHERE name = ?1",
            params![name, held],
        )?;
        Ok(())
    }

    /// A fork's first start happened (or a restore was given up): it boots
    /// from its own disks from now on.
    /// `vm set`: the sizes a VM boots with next.
    pub fn set_vm_sizes(
        &self,
        name: &str,
        vcpus: u32,
        memory_mib: u64,
        disk_bytes: u64,
    ) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE vms SET vcpus = ?2, memory_mib = ?3, disk_bytes = ?4 WHERE name = ?1",
            params![name, vcpus, memory_mib as i64, disk_bytes as i64],
        )?;
        Ok(())
    }

    /// `vm set --cpu-quota`: the quota its next jail gets.
    pub fn set_cpu_quota(&self, name: &str, quota: Option<u32>) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE vms SET cpu_quota = ?2 WHERE name = ?1",
            params![name, quota],
        )?;
        Ok(())
    }

    pub fn set_restore_from(&self, name: &str, snapshot: Option<&str>) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE vms SET restore_from = ?2 WHERE name = ?1",
            params![name, snapshot],
        )?;
        Ok(())
    }

    pub fn clear_runtime(&self, name: &str) -> rusqlite::Result<()> {
        self.conn()
            .execute("DELETE FROM vm_runtime WHERE name = ?1", [name])?;
        Ok(())
    }
}
