//! Kernel records.

use banger_proto::kernel::KernelInfo;
use rusqlite::{params, OptionalExtension, Row};

use super::Store;

const COLUMNS: &str = "name, version, source, vmlinux_path, modules_dir, config_path, is_default, size_bytes, created_at";

fn from_row(row: &Row<'_>) -> rusqlite::Result<KernelInfo> {
    Ok(KernelInfo {
        name: row.get(0)?,
        version: row.get(1)?,
        source: row.get(2)?,
        vmlinux_path: row.get(3)?,
        modules_dir: row.get(4)?,
        config_path: row.get(5)?,
        default: row.get::<_, i64>(6)? != 0,
        size_bytes: row.get::<_, i64>(7)? as u64,
        created_at: row.get(8)?,
    })
}

impl Store {
    /// Inserts a kernel; when it is the default, no other one stays default.
    pub fn put_kernel(&self, k: &KernelInfo) -> rusqlite::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if k.default {
            tx.execute("UPDATE kernels SET is_default = 0", [])?;
        }
        tx.execute(
            &format!(
                "INSERT OR REPLACE INTO kernels ({COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)"
            ),
            params![
                k.name,
                k.version,
                k.source,
                k.vmlinux_path,
                k.modules_dir,
                k.config_path,
                k.default as i64,
                k.size_bytes as i64,
                k.created_at
            ],
        )?;
        tx.commit()
    }

    pub fn get_kernel(&self, name: &str) -> rusqlite::Result<Option<KernelInfo>> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM kernels WHERE name = ?1"),
                [name],
                from_row,
            )
            .optional()
    }

    pub fn list_kernels(&self) -> rusqlite::Result<Vec<KernelInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM kernels ORDER BY name"))?;
        let rows = stmt.query_map([], from_row)?;
        rows.collect()
    }

    pub fn delete_kernel(&self, name: &str) -> rusqlite::Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM kernels WHERE name = ?1", [name])?
            > 0)
    }
}
