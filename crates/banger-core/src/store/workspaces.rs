//! Each VM's workspace: the host directory, where it lands in the guest, and
//! when it was last synced (the manifest itself is a file in the VM's
//! directory: it can be large, and only the workspace service reads it).

use rusqlite::{params, OptionalExtension};

use super::Store;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceRecord {
    pub vm: String,
    pub host_dir: String,
    pub guest_path: String,
    /// RFC 3339 UTC; none before the first sync.
    pub last_sync: Option<String>,
    /// The guest user owning the files (the image's default user).
    pub owner: Option<String>,
    /// Unpulled guest changes, as counted at the VM's last stop.
    pub guest_changes: Option<u64>,
}

impl From<WorkspaceRecord> for banger_proto::vm::WorkspaceInfo {
    fn from(w: WorkspaceRecord) -> Self {
        banger_proto::vm::WorkspaceInfo {
            host_dir: w.host_dir,
            guest_path: w.guest_path,
            last_sync: w.last_sync,
            host_changes: None,
            guest_changes: w.guest_changes,
        }
    }
}

impl Store {
    pub fn put_workspace(&self, w: &WorkspaceRecord) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO workspaces (vm, host_dir, guest_path, last_sync, owner, guest_changes) VALUES (?1,?2,?3,?4,?5,?6)",
            params![w.vm, w.host_dir, w.guest_path, w.last_sync, w.owner, w.guest_changes.map(|n| n as i64)],
        )?;
        Ok(())
    }

    pub fn get_workspace(&self, vm: &str) -> rusqlite::Result<Option<WorkspaceRecord>> {
        self.conn()
            .query_row(
                "SELECT vm, host_dir, guest_path, last_sync, owner, guest_changes FROM workspaces WHERE vm = ?1",
                [vm],
                |r| {
                    Ok(WorkspaceRecord {
                        vm: r.get(0)?,
                        host_dir: r.get(1)?,
                        guest_path: r.get(2)?,
                        last_sync: r.get(3)?,
                        owner: r.get(4)?,
                        guest_changes: r.get::<_, Option<i64>>(5)?.map(|n| n as u64),
                    })
                },
            )
            .optional()
    }

    pub fn set_workspace_guest_changes(
        &self,
        vm: &str,
        count: Option<u64>,
    ) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE workspaces SET guest_changes = ?2 WHERE vm = ?1",
            params![vm, count.map(|n| n as i64)],
        )?;
        Ok(())
    }

    pub fn set_workspace_synced(&self, vm: &str, at: &str) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE workspaces SET last_sync = ?2 WHERE vm = ?1",
            params![vm, at],
        )?;
        Ok(())
    }
}
