//! SSH sessions with running VMs' agents: made at boot or on first use
//! after a daemon restart, cached, and re-made when one closes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::error::VmError;
use super::registry::VmRegistry;
use crate::error::OpResult;
use crate::locks::KeyedLocks;
use crate::store::VmRecord;
use crate::vm::agent_client::{AgentError, AgentSession};
use crate::vm::keys;
use crate::vm::vmm::Vmm;

/// How long reconnecting to a running VM's agent may take (normally well
/// under a second, even emulated).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// One try at the handshake within [`CONNECT_TIMEOUT`] (it takes tens of
/// milliseconds on an idle guest).
const CONNECT_ATTEMPT: Duration = Duration::from_secs(4);
/// Between tries: several times the agent's 20 ms look at the port.
const RECONNECT_GAP: Duration = Duration::from_millis(250);

pub struct AgentSessions {
    registry: Arc<VmRegistry>,
    sessions: tokio::sync::Mutex<HashMap<String, AgentSession>>,
    /// One reconnect per VM at a time (the agent serves one host connection
    /// on virtio-serial), without holding up other VMs' commands.
    connecting: KeyedLocks,
}

impl AgentSessions {
    pub fn new(registry: Arc<VmRegistry>) -> AgentSessions {
        AgentSessions {
            registry,
            sessions: Default::default(),
            connecting: KeyedLocks::default(),
        }
    }

    /// The named VM, running, and its agent's session: what every command
    /// that talks to a guest starts with.
    pub async fn running(&self, name: &str) -> OpResult<(VmRecord, AgentSession)> {
        let vm = self.registry.running(name)?;
        let session = self.session_of_live(&vm).await?;
        Ok((vm, session))
    }

    /// The VM's SSH connection, made anew when there is none (after a
    /// daemon restart) or the old one closed.
    pub async fn session(&self, vm: &VmRecord) -> OpResult<AgentSession> {
        match self.registry.live(&vm.name)? {
            None => Err(VmError::Stopped(vm.name.clone()).into()),
            // Never a connection to a paused guest: a virtio-serial port has
            // no connection framing, and a guest that wakes to find its old
            // host gone and a new one talking cannot tell their bytes apart.
            Some(rt) if rt.paused => Err(VmError::Paused(vm.name.clone()).into()),
            Some(_) => self.session_of_live(vm).await,
        }
    }

    /// [`session`](Self::session) for a VM just found running.
    async fn session_of_live(&self, vm: &VmRecord) -> OpResult<AgentSession> {
        let open = |sessions: &HashMap<String, AgentSession>| {
            sessions.get(&vm.name).filter(|s| !s.is_closed()).cloned()
        };
        if let Some(session) = open(&*self.sessions.lock().await) {
            return Ok(session);
        }
        let _connecting = self.connecting.lock(&vm.name).await;
        // Another caller may have connected while this one waited.
        if let Some(session) = open(&*self.sessions.lock().await) {
            return Ok(session);
        }
        let vmm = self.registry.vmm(vm.vmm)?;
        let session = self.connect(vm, vmm.as_ref()).await?;
        self.keep(&vm.name, session.clone()).await;
        Ok(session)
    }

    /// Caches the session a boot made.
    pub async fn keep(&self, name: &str, session: AgentSession) {
        self.sessions.lock().await.insert(name.to_string(), session);
    }

    /// Drops a stopped VM's session.
    pub async fn forget(&self, name: &str) {
        self.sessions.lock().await.remove(name);
    }

    /// A fresh connection to a running VM's agent. Bounded: a guest that
    /// never answers must not stall that VM's commands (or `vm rm -f`).
    ///
    /// A virtio-serial port has no connections, only "a host is attached":
    /// when one host leaves and the next attaches before the agent looked
    /// (a daemon restarting, a cancelled attempt followed by another), the
    /// agent never sees the gap and the handshake stalls. So each attempt is
    /// short, and a failed one is followed by a pause the agent cannot miss
    /// before the next.
    async fn connect(&self, vm: &VmRecord, vmm: &dyn Vmm) -> OpResult<AgentSession> {
        let attempts = async {
            loop {
                match tokio::time::timeout(CONNECT_ATTEMPT, self.open(vm, vmm)).await {
                    Ok(Ok(session)) => return Ok(session),
                    Ok(Err(e)) if !matches!(self.registry.live(&vm.name), Ok(Some(_))) => {
                        return Err(e)
                    }
                    Ok(Err(e)) => {
                        tracing::info!(vm = %vm.name, error = %e, "SSH attempt failed; retrying")
                    }
                    Err(_) => tracing::info!(vm = %vm.name, "SSH attempt stalled; retrying"),
                }
                tokio::time::sleep(RECONNECT_GAP).await;
            }
        };
        let why = match tokio::time::timeout(CONNECT_TIMEOUT, attempts).await {
            Ok(Ok(session)) => return Ok(session),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "its agent did not complete the SSH handshake within {}s; see `banger vm logs {}`",
                CONNECT_TIMEOUT.as_secs(),
                vm.name
            ),
        };
        Err(VmError::Agent {
            name: vm.name.clone(),
            why,
        }
        .into())
    }

    /// The boot-time session: the VMM may not be listening yet.
    pub async fn open_early(
        &self,
        vm: &VmRecord,
        vmm: &dyn Vmm,
        alive: &(dyn Fn() -> bool + Sync),
    ) -> Result<AgentSession, AgentError> {
        let stream = loop {
            match vmm.open_ssh(Path::new(&vm.dir)).await {
                Ok(stream) => break stream,
                Err(_) if alive() => tokio::time::sleep(Duration::from_millis(2)).await,
                Err(e) => return Err(e.into()),
            }
        };
        self.handshake(vm, stream).await
    }

    /// One connection and handshake, unbounded.
    pub async fn open(&self, vm: &VmRecord, vmm: &dyn Vmm) -> Result<AgentSession, AgentError> {
        let stream = vmm.open_ssh(Path::new(&vm.dir)).await?;
        self.handshake(vm, stream).await
    }

    async fn handshake(
        &self,
        vm: &VmRecord,
        stream: tokio::net::UnixStream,
    ) -> Result<AgentSession, AgentError> {
        let host_key = keys::parse_public(&vm.host_key_pub)?;
        let client_key = keys::client_key(&self.registry.paths.state_dir)?;
        AgentSession::connect(stream, host_key, client_key).await
    }
}
