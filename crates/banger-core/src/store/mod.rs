//! The daemon's durable state in SQLite, with versioned migrations.

mod images;
mod kernels;
mod migrations;
mod snapshots;
mod vms;
mod workspaces;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

pub use images::ImageRecord;
pub use snapshots::SnapshotRecord;
pub use vms::{VmRecord, VmRuntime};
pub use workspaces::WorkspaceRecord;

/// A handle on the state database. Writes are short; one connection behind a
/// mutex is plenty for a per-user daemon.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> anyhow::Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> anyhow::Result<Store> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // With WAL, NORMAL never corrupts and survives a killed daemon; only a
        // power cut may lose the last commits. It saves an fsync per write on
        // the `vm start` path.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations::apply(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn schema_version(&self) -> anyhow::Result<u32> {
        Ok(self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }
}
