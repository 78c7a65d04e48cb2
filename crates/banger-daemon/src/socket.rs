//! Binding the daemon socket: private directory, mode 0600, and never stealing
//! the socket of a daemon that is still alive.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use tokio::net::UnixListener;

/// The daemon's claim on its runtime directory, held for its whole life so two
/// daemons racing to start cannot both serve the same state.
pub struct DaemonLock(#[allow(dead_code)] std::fs::File);

pub fn lock(runtime_dir: &Path) -> anyhow::Result<DaemonLock> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(runtime_dir)?;
    let path = runtime_dir.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "another banger daemon already runs for {}",
            runtime_dir.display()
        );
    }
    Ok(DaemonLock(file))
}

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().context("socket path has no directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "a banger daemon is already listening on {}; stop it first",
                path.display()
            );
        }
        // A daemon that died without cleaning up.
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
