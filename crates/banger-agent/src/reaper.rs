//! PID 1 reaps every child, its own and orphans alike. Children spawned for
//! sessions register a waiter under the same lock the reaper holds, so no exit
//! status is collected before its waiter exists.

use std::collections::HashMap;
use std::sync::Mutex;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

static WAITERS: Mutex<Option<HashMap<i32, oneshot::Sender<Exit>>>> = Mutex::new(None);

/// Spawns with `spawn` while holding the reaper lock and returns its waiter.
pub fn spawn_watched<T>(
    spawn: impl FnOnce() -> std::io::Result<(i32, T)>,
) -> std::io::Result<(T, oneshot::Receiver<Exit>)> {
    let mut table = WAITERS.lock().unwrap_or_else(|p| p.into_inner());
    let (pid, value) = spawn()?;
    let (tx, rx) = oneshot::channel();
    table.get_or_insert_with(HashMap::new).insert(pid, tx);
    Ok((value, rx))
}

/// Collects every exited child, handing statuses to their waiters.
pub fn reap() {
    let mut table = WAITERS.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let exit = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        if let Some(tx) = table.as_mut().and_then(|t| t.remove(&exit.0.as_raw())) {
            let _ = tx.send(exit.1);
        }
    }
}

/// Reaps on every SIGCHLD (and every second, in case one was coalesced away).
pub async fn run() {
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            crate::console::log(&format!("cannot watch SIGCHLD: {e}"));
            return;
        }
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigchld.recv() => {}
            _ = tick.tick() => {}
        }
        reap();
    }
}
