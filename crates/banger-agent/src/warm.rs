//! Warming the command path. A VM's first command costs several times what
//! later ones do, because fork, exec, pipes and reaping all run for the first
//! time (under emulation each kernel and agent path is translated on first
//! use). The agent runs one no-op child from its own binary while the disks
//! mount, so the user's first command finds those paths warm.

use crate::exec::{self, Spec};

/// The name under which the agent's binary exits at once.
pub const TOOL: &str = "banger-warm";

pub async fn run() {
    let spec = Spec {
        argv: vec![TOOL.into()],
        env: vec![],
        cwd: Some("/".into()),
        user: None,
        pty: None,
        detach: false,
    };
    // Spawning blocks until the child has exec'd: off the runtime's thread,
    // which is serving the host's SSH handshake meanwhile.
    if let Ok(Ok(started)) = tokio::task::spawn_blocking(move || exec::spawn(spec)).await {
        let _ = started.exit.await;
    }
}
