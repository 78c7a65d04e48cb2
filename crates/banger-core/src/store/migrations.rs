//! Schema migrations, applied in order and recorded in `PRAGMA user_version`.

use rusqlite::Connection;

/// Each entry moves the schema from version `index` to `index + 1`. Never edit a
/// released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: images
    "CREATE TABLE images (
        name          TEXT PRIMARY KEY,
        reference     TEXT NOT NULL,
        digest        TEXT NOT NULL,
        rootfs_path   TEXT NOT NULL,
        size_bytes    INTEGER NOT NULL,
        content_bytes INTEGER NOT NULL,
        config_json   TEXT NOT NULL,
        created_at    TEXT NOT NULL
    );",
    // 2: kernels
    "CREATE TABLE kernels (
        name          TEXT PRIMARY KEY,
        version       TEXT NOT NULL,
        source        TEXT NOT NULL,
        vmlinux_path  TEXT NOT NULL,
        modules_dir   TEXT,
        config_path   TEXT,
        is_default    INTEGER NOT NULL DEFAULT 0,
        size_bytes    INTEGER NOT NULL,
        created_at    TEXT NOT NULL
    );",
    // 3: VMs, with their transient handles kept apart
    "CREATE TABLE vms (
        name          TEXT PRIMARY KEY,
        image         TEXT NOT NULL,
        kernel        TEXT NOT NULL,
        vmm           TEXT NOT NULL,
        vcpus         INTEGER NOT NULL,
        memory_mib    INTEGER NOT NULL,
        disk_bytes    INTEGER NOT NULL,
        cow_strategy  TEXT NOT NULL,
        dir           TEXT NOT NULL,
        host_key_pub  TEXT NOT NULL,
        created_at    TEXT NOT NULL
    );
    CREATE TABLE vm_runtime (
        name          TEXT PRIMARY KEY REFERENCES vms(name) ON DELETE CASCADE,
        pid           INTEGER NOT NULL,
        start_time    INTEGER NOT NULL,
        started_at    TEXT NOT NULL
    );",
    // 4: networking: each VM's address (durable), its tap (transient), and
    // settings such as the subnet chosen once
    "ALTER TABLE vms ADD COLUMN ip TEXT;
    ALTER TABLE vm_runtime ADD COLUMN tap TEXT;
    CREATE TABLE settings (
        key           TEXT PRIMARY KEY,
        value         TEXT NOT NULL
    );",
    // 5: a dm-snapshot VM's origin (the image rootfs its COW layers over),
    // kept as long as the VM, whatever happens to the image
    "ALTER TABLE vms ADD COLUMN origin TEXT;",
    // 6: a VM's workspace: the host directory mirrored into the guest
    "CREATE TABLE workspaces (
        vm            TEXT PRIMARY KEY REFERENCES vms(name) ON DELETE CASCADE,
        host_dir      TEXT NOT NULL,
        guest_path    TEXT NOT NULL,
        last_sync     TEXT
    );",
    // 7: whom workspace files belong to in the guest, and the guest's
    // unpulled changes as the VM's last stop counted them
    "ALTER TABLE workspaces ADD COLUMN owner TEXT;
    ALTER TABLE workspaces ADD COLUMN guest_changes INTEGER;",
    // 8: snapshots (an image's warm template among them); a VM paused by
    // `vm pause`, and what its VMM started from; a fork's snapshot,
    // restored at its first start
    "CREATE TABLE snapshots (
        name          TEXT PRIMARY KEY,
        vm            TEXT NOT NULL,
        image         TEXT NOT NULL,
        kernel        TEXT NOT NULL,
        vmm           TEXT NOT NULL,
        vcpus         INTEGER NOT NULL,
        memory_mib    INTEGER NOT NULL,
        disk_bytes    INTEGER NOT NULL,
        root_mode     TEXT NOT NULL,
        origin        TEXT,
        host_key_pub  TEXT NOT NULL,
        with_memory   INTEGER NOT NULL,
        size_bytes    INTEGER NOT NULL,
        dir           TEXT NOT NULL,
        created_at    TEXT NOT NULL,
        template      TEXT,
        agent         TEXT
    );
    ALTER TABLE vm_runtime ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE vm_runtime ADD COLUMN started_from TEXT;
    ALTER TABLE vm_runtime ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE vms ADD COLUMN restore_from TEXT;",
    // How a running VM is networked (`bridged`, `user`; none without).
    "ALTER TABLE vm_runtime ADD COLUMN network TEXT;",
    // Firecracker through the jailer: the running VMM is in a jail, and a
    // VM's CPU quota (percent of one host CPU) for its jail's cgroup.
    "ALTER TABLE vm_runtime ADD COLUMN jailed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE vms ADD COLUMN cpu_quota INTEGER;",
];

pub fn apply(conn: &mut Connection) -> anyhow::Result<()> {
    let current: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let current = current as usize;
    if current > MIGRATIONS.len() {
        anyhow::bail!(
            "the state database has schema version {current}, newer than this banger \
             understands ({}); upgrade banger",
            MIGRATIONS.len()
        );
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (index + 1) as u32)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
fn latest() -> u32 {
    MIGRATIONS.len() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_idempotent_and_refuse_newer_schemas() {
        let mut conn = Connection::open_in_memory().unwrap();
        apply(&mut conn).unwrap();
        apply(&mut conn).unwrap();
        let v: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, latest());
        conn.pragma_update(None, "user_version", latest() + 1)
            .unwrap();
        let err = apply(&mut conn).unwrap_err().to_string();
        assert!(err.contains("upgrade banger"), "{err}");
    }
}
