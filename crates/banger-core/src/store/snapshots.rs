//! Snapshot records: what a snapshot was taken of (the VM's image, kernel,
//! VMM and sizes, which a restore or fork must match) and where its files are.

use banger_proto::domain::{RootMode, VmmKind};
use rusqlite::{params, OptionalExtension, Row};

use super::vms::word;
use super::Store;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub name: String,
    /// The VM it was taken of.
    pub vm: String,
    pub image: String,
    pub kernel: String,
    pub vmm: VmmKind,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    pub root_mode: RootMode,
    /// The image file an overlay or dm-snapshot root layers over, kept
    /// while the snapshot is.
    pub origin: Option<String>,
    /// The source VM's host key when taken: what a restored guest presents
    /// until it is given its identity.
    pub host_key_pub: String,
    /// Memory and device state were saved (the VM ran): a restore resumes.
    /// Otherwise only disks, and a restore boots.
    pub with_memory: bool,
    /// Bytes allocated on the host by its files.
    pub size_bytes: u64,
    pub dir: String,
    pub created_at: String,
    /// A warm template: the image whose `vm run` it stands in for.
    pub template: Option<String>,
    /// A template's agent (a digest): a new agent makes it stale.
    pub agent: Option<String>,
}

const COLUMNS: &str = "name, vm, image, kernel, vmm, vcpus, memory_mib, disk_bytes, root_mode, \
                       origin, host_key_pub, with_memory, size_bytes, dir, created_at, \
                       template, agent";

fn from_row(row: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        name: row.get(0)?,
        vm: row.get(1)?,
        image: row.get(2)?,
        kernel: row.get(3)?,
        vmm: word(row, 4)?,
        vcpus: row.get(5)?,
        memory_mib: row.get::<_, i64>(6)? as u64,
        disk_bytes: row.get::<_, i64>(7)? as u64,
        root_mode: word(row, 8)?,
        origin: row.get(9)?,
        host_key_pub: row.get(10)?,
        with_memory: row.get(11)?,
        size_bytes: row.get::<_, i64>(12)? as u64,
        dir: row.get(13)?,
        created_at: row.get(14)?,
        template: row.get(15)?,
        agent: row.get(16)?,
    })
}

impl Store {
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> rusqlite::Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO snapshots ({COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)"
            ),
            params![
                s.name,
                s.vm,
                s.image,
                s.kernel,
                s.vmm.as_str(),
                s.vcpus,
                s.memory_mib as i64,
                s.disk_bytes as i64,
                s.root_mode.as_str(),
                s.origin,
                s.host_key_pub,
                s.with_memory,
                s.size_bytes as i64,
                s.dir,
                s.created_at,
                s.template,
                s.agent
            ],
        )?;
        Ok(())
    }

    pub fn get_snapshot(&self, name: &str) -> rusqlite::Result<Option<SnapshotRecord>> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM snapshots WHERE name = ?1"),
                [name],
                from_row,
            )
            .optional()
    }

    pub fn list_snapshots(&self) -> rusqlite::Result<Vec<SnapshotRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM snapshots ORDER BY name"))?;
        let rows = stmt.query_map([], from_row)?;
        rows.collect()
    }

    pub fn delete_snapshot(&self, name: &str) -> rusqlite::Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM snapshots WHERE name = ?1", [name])?
            > 0)
    }

    /// Marks a snapshot as `image`'s warm template, made with `agent`.
    pub fn set_template(&self, name: &str, image: &str, agent: &str) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE snapshots SET template = ?2, agent = ?3 WHERE name = ?1",
            params![name, image, agent],
        )?;
        Ok(())
    }

    /// The warm templates of `image`.
    pub fn templates_of(&self, image: &str) -> rusqlite::Result<Vec<SnapshotRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM snapshots WHERE template = ?1 ORDER BY name"
        ))?;
        let rows = stmt.query_map([image], from_row)?;
        rows.collect()
    }

    /// VMs and snapshots (as `snapshot NAME`) that boot or resume with
    /// `kernel`.
    pub fn kernel_users(&self, kernel: &str) -> rusqlite::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name FROM vms WHERE kernel = ?1 \
             UNION SELECT 'snapshot ' || name FROM snapshots WHERE kernel = ?1 ORDER BY 1",
        )?;
        let rows = stmt.query_map([kernel], |r| r.get(0))?;
        rows.collect()
    }

    /// VMs made from the snapshot that have not started yet (their first
    /// start resumes it).
    pub fn forks_waiting_on(&self, snapshot: &str) -> rusqlite::Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name FROM vms WHERE restore_from = ?1 ORDER BY name")?;
        let rows = stmt.query_map([snapshot], |r| r.get(0))?;
        rows.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_pin_their_origin() {
        let store = Store::open_in_memory().unwrap();
        let snap = SnapshotRecord {
            name: "s1".into(),
            vm: "web".into(),
            image: "alpine:3".into(),
            kernel: "k".into(),
            vmm: VmmKind::Qemu,
            vcpus: 2,
            memory_mib: 512,
            disk_bytes: 4 << 30,
            root_mode: RootMode::Overlay,
            origin: Some("/images/a/rootfs.ext4".into()),
            host_key_pub: "ssh-ed25519 AAAA".into(),
            with_memory: true,
            size_bytes: 1 << 20,
            dir: "/snaps/s1".into(),
            created_at: "2026-12-01T00:00:00Z".into(),
            template: None,
            agent: None,
        };
        store.insert_snapshot(&snap).unwrap();
        assert_eq!(store.get_snapshot("s1").unwrap(), Some(snap.clone()));
        assert_eq!(store.list_snapshots().unwrap(), vec![snap]);
        assert_eq!(
            store.vms_with_origin("/images/a/rootfs.ext4").unwrap(),
            vec!["snapshot s1".to_string()]
        );
        assert!(store.delete_snapshot("s1").unwrap());
        assert!(!store.delete_snapshot("s1").unwrap());
    }
}
