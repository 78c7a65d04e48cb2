//! What runs for the daemon's life beside the requests: keeping running
//! VMs' user keys in step with the user's key files, and their console
//! logs under their cap.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use banger_host::ProcessRunner;

use super::registry::VmRegistry;
use super::sessions::AgentSessions;
use crate::store::VmRecord;
use crate::vm::console;

/// How long one call into a guest may take while it holds the VM's lock.
const GUEST_CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Upkeep {
    registry: Arc<VmRegistry>,
    sessions: Arc<AgentSessions>,
    runner: Arc<dyn ProcessRunner>,
}

impl Upkeep {
    pub fn new(
        registry: Arc<VmRegistry>,
        sessions: Arc<AgentSessions>,
        runner: Arc<dyn ProcessRunner>,
    ) -> Upkeep {
        Upkeep {
            registry,
            sessions,
            runner,
        }
    }

    /// Keeps every running VM's user keys in step with the user's key files;
    /// runs for the daemon's life.
    pub async fn sync_user_keys(self: Arc<Self>, every: Duration) {
        let mut pushed: HashMap<String, Vec<String>> = HashMap::new();
        loop {
            let (config, runner) = (self.registry.config.ssh.clone(), self.runner.clone());
            let keys = tokio::task::spawn_blocking(move || {
                crate::vm::user_keys::load(&config, runner.as_ref())
            })
            .await
            .unwrap_or_default();
            let running = self.registry.running_records();
            pushed.retain(|name, _| running.iter().any(|v| &v.name == name));
            // Every VM at once, each bounded: a frozen guest costs its own
            // push a few seconds and holds up no other VM.
            let pushes = running
                .into_iter()
                .filter(|vm| pushed.get(&vm.name) != Some(&keys))
                .map(|vm| {
                    let (this, keys) = (self.clone(), keys.clone());
                    async move {
                        let done = this.push_user_keys(&vm, &keys).await;
                        (vm.name, done)
                    }
                });
            for (name, done) in futures_util::future::join_all(pushes).await {
                if done {
                    pushed.insert(name, keys.clone());
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Keeps every running VM's console log under its cap (see
    /// [`console::rotate_if_big`]); runs for the daemon's life.
    pub async fn cap_console_logs(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            for vm in self.registry.running_records() {
                let dir = PathBuf::from(&vm.dir);
                match tokio::task::spawn_blocking(move || console::rotate_if_big(&dir)).await {
                    Ok(Ok(true)) => tracing::info!(vm = %vm.name, "console log rotated"),
                    Ok(Err(e)) => {
                        tracing::warn!(vm = %vm.name, error = %e, "cannot rotate the console log")
                    }
                    _ => {}
                }
            }
        }
    }

    /// One VM's user keys, within [`GUEST_CALL_TIMEOUT`]; true once the
    /// agent has them.
    async fn push_user_keys(&self, vm: &VmRecord, keys: &[String]) -> bool {
        // A VM being started or stopped is left for the next round: its
        // agent serves one connection at a time, the starter's. The lock is
        // only looked at, not held: a stop or rm never waits for a push.
        if self.registry.try_lock(&vm.name).is_none() {
            return false;
        }
        let push = async {
            let session = self.sessions.session(vm).await?;
            session.set_user_keys(keys).await?;
            Ok::<_, crate::error::OpError>(())
        };
        match tokio::time::timeout(GUEST_CALL_TIMEOUT, push).await {
            Ok(Ok(())) => {
                tracing::info!(vm = %vm.name, keys = keys.len(), "user keys updated");
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(vm = %vm.name, error = %e, "cannot update user keys");
                false
            }
            Err(_) => {
                tracing::warn!(vm = %vm.name, "the agent did not take the user keys in time (is the VM frozen?)");
                false
            }
        }
    }
}
