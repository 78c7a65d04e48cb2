//! The workspace service: a VM's host directory mirrored into its work
//! disk. A sync lists the host tree, compares it with the last sync's
//! manifest (`workspace.json` in the VM's directory), and sends only the
//! difference as one stream to the agent's `banger-tar sync`; `vm exec`
//! syncs first, so a command never runs on a stale copy.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use banger_host::ProcessRunner;
use banger_proto::agent::{ExecRequest, TAR_TOOL};
use banger_proto::vm::SyncResult;

use crate::error::{OpError, OpResult};
use crate::locks::KeyedLocks;
use crate::services::vms::{AgentSessions, WORK_MOUNT};
use crate::store::{Store, VmRecord, WorkspaceRecord};
use crate::vm::agent_client::{AgentSession, Input, Output};
use crate::workspace::manifest::{self, Manifest};
use crate::workspace::{scan, validate};

const MANIFEST_FILE: &str = "workspace.json";

pub struct WorkspaceService {
    store: Arc<Store>,
    sessions: Arc<AgentSessions>,
    runner: Arc<dyn ProcessRunner>,
    state_dir: PathBuf,
    /// One sync at a time per VM: two execs at once share one manifest.
    syncing: KeyedLocks,
    manifests: std::sync::Mutex<std::collections::HashMap<String, Arc<Manifest>>>,
}

impl WorkspaceService {
    pub fn new(
        store: Arc<Store>,
        sessions: Arc<AgentSessions>,
        runner: Arc<dyn ProcessRunner>,
        state_dir: PathBuf,
    ) -> WorkspaceService {
        WorkspaceService {
            store,
            sessions,
            runner,
            state_dir,
            syncing: KeyedLocks::default(),
            manifests: Default::default(),
        }
    }

    /// A create's workspace, checked before anything is made: the host
    /// directory (canonical) and the guest path.
    pub fn check(&self, dir: &str, guest_path: Option<&str>) -> OpResult<(String, String)> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let dir = validate::workspace_dir(Path::new(dir), home.as_deref(), &self.state_dir)?;
        let guest = guest_path.unwrap_or(WORK_MOUNT);
        Ok((dir.display().to_string(), checked_guest_path(guest)?))
    }

    pub fn attach(&self, vm: &str, host_dir: String, guest_path: String) -> OpResult<()> {
        Ok(self.store.put_workspace(&WorkspaceRecord {
            vm: vm.to_string(),
            host_dir,
            guest_path,
            last_sync: None,
        })?)
    }

    /// The VM's workspace, if it has one.
    pub fn record(&self, vm: &str) -> OpResult<Option<WorkspaceRecord>> {
        Ok(self.store.get_workspace(vm)?)
    }

    /// `vm sync NAME`: the host's changes into the running VM now.
    pub async fn sync(&self, name: &str) -> OpResult<SyncResult> {
        let (vm, session) = self.sessions.running(name).await?;
        let ws = self.record(name)?.ok_or_else(|| {
            OpError::invalid(format!(
                "VM `{name}` has no workspace; create it with `--workspace DIR`"
            ))
        })?;
        self.sync_with(&vm, &ws, &session).await
    }

    /// Syncs `vm`'s workspace `ws` over `session`.
    pub async fn sync_with(
        &self,
        vm: &VmRecord,
        ws: &WorkspaceRecord,
        session: &AgentSession,
    ) -> OpResult<SyncResult> {
        let _one_at_a_time = self.syncing.lock(&vm.name).await;
        let started = std::time::Instant::now();
        let manifest_path = Path::new(&vm.dir).join(MANIFEST_FILE);
        // The last sync's manifest: kept in memory between syncs, read from
        // its file after a daemon restart.
        // Keyed by the VM's creation too: a new VM under an old name starts afresh.
        let key = format!("{}@{}", vm.name, vm.created_at);
        let cached = self
            .manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let (host_dir, runner, path) = (
            PathBuf::from(&ws.host_dir),
            self.runner.clone(),
            manifest_path.clone(),
        );
        let (old, delta, next) = tokio::task::spawn_blocking(move || {
            let old: Arc<Manifest> = cached.unwrap_or_else(|| {
                Arc::new(
                    std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default(),
                )
            });
            let listing = scan::list(&host_dir, runner.as_ref())?;
            let (delta, next) = manifest::compare(&old, listing, &host_dir)?;
            Ok::<_, crate::workspace::WorkspaceError>((old, delta, next))
        })
        .await??;
        let mut result = SyncResult {
            written: 0,
            removed: 0,
            bytes: delta.bytes,
            guest_path: ws.guest_path.clone(),
        };
        if !delta.is_empty() {
            let (written, removed) = send(session, ws, delta).await.map_err(|why| {
                OpError::internal(format!(
                    "syncing the workspace into {}:{}: {why}",
                    vm.name, ws.guest_path
                ))
            })?;
            result.written = written;
            result.removed = removed;
        }
        let unchanged = *old == next;
        let next = if unchanged {
            old // Nothing to write: the common case before an exec.
        } else {
            let text = serde_json::to_vec(&next).expect("manifests serialise");
            let tmp = manifest_path.with_extension("json.new");
            std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &manifest_path))?;
            Arc::new(next)
        };
        self.manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, next);
        if !unchanged || ws.last_sync.is_none() {
            self.store
                .set_workspace_synced(&vm.name, &crate::ids::now_rfc3339())?;
        }
        // One line a benchmark reads (scripts/bench-workspace).
        tracing::info!(
            vm = %vm.name,
            written = result.written,
            removed = result.removed,
            bytes = result.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "workspace synced"
        );
        Ok(result)
    }
}

/// Streams the delta into the guest's `banger-tar sync`; what it applied.
async fn send(
    session: &AgentSession,
    ws: &WorkspaceRecord,
    delta: manifest::Delta,
) -> Result<(u64, u64), String> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    // Held until the command ends: a closed stdin channel reads as a caller
    // that hung up (the command would get SIGHUP).
    let _open = tx.clone();
    let host_dir = PathBuf::from(&ws.host_dir);
    let packing = tokio::task::spawn_blocking(move || {
        let mut out = std::io::BufWriter::with_capacity(256 << 10, ChannelWriter(tx.clone()));
        let packed =
            banger_treecopy::sync::pack(&host_dir, &delta.changed, &delta.removed, &mut out)
                .and_then(|()| out.flush());
        drop(out);
        let _ = tx.blocking_send(Input::StdinEof);
        packed
    });
    let request = ExecRequest {
        argv: vec![TAR_TOOL.into(), "sync".into(), ws.guest_path.clone()],
        env: Vec::new(),
        cwd: None,
        user: Some("0".into()),
        flow: None,
    };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = session
        .exec(&request, None, rx, None, |out| {
            match out {
                Output::Stdout(b) => stdout.extend_from_slice(&b),
                Output::Stderr(b) => stderr.extend_from_slice(&b),
            }
            let (done, delivered) = tokio::sync::oneshot::channel();
            let _ = done.send(());
            delivered
        })
        .await
        .map_err(|e| e.to_string())?;
    let packed = packing.await.map_err(|e| e.to_string())?;
    if status.code != 0 {
        let said = String::from_utf8_lossy(&stderr);
        return Err(format!(
            "the guest's banger-tar exited with {}: {}",
            status.code,
            said.trim()
        ));
    }
    packed.map_err(|e| format!("reading the workspace: {e}"))?;
    let counts = String::from_utf8_lossy(&stdout);
    let mut numbers = counts.split_whitespace().map(|n| n.parse().unwrap_or(0));
    Ok((numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)))
}

/// Stdin for the guest command, as the agent client takes it.
struct ChannelWriter(tokio::sync::mpsc::Sender<Input>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Input::Stdin(buf.to_vec()))
            .map_err(|_| std::io::Error::other("the guest stopped reading"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The guest path: absolute, on the work disk, without `..`.
fn checked_guest_path(path: &str) -> Result<String, OpError> {
    let p = Path::new(path);
    let plain = p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain || !p.starts_with(WORK_MOUNT) {
        return Err(OpError::invalid(format!(
            "--workspace-path {path}: the workspace goes on the work disk, at {WORK_MOUNT} or a directory under it"
        )));
    }
    Ok(p.components().collect::<PathBuf>().display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_path_stays_on_the_work_disk() {
        assert_eq!(checked_guest_path("/work").unwrap(), "/work");
        assert_eq!(checked_guest_path("/work/app/").unwrap(), "/work/app");
        for bad in ["/etc", "work", "/work/../etc", "/workshop", "/"] {
            assert!(checked_guest_path(bad).is_err(), "{bad}");
        }
    }
}
