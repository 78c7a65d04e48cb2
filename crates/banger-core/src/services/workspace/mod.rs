//! The workspace service: a VM's host directory mirrored into its work
//! disk, both ways. A sync lists the host tree and compares it with the last
//! sync's manifest (`workspace.json` in the VM's directory); a pull, or a
//! forced side, lists the guest's too. What changed on one side goes to the
//! other as one tar stream through the agent's `banger-tar` (see `guest`);
//! what changed on both is a conflict, left alone. `vm exec` syncs first,
//! so a command never runs on a stale copy.

pub(crate) mod guest;
mod manifest_file;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use banger_host::ProcessRunner;
use banger_proto::vm::{Refused, SyncParams, SyncProgress, SyncResult, SyncSide};
use banger_treecopy::sync::Outcome;

use crate::error::{OpError, OpResult};
use crate::locks::KeyedLocks;
use crate::services::vms::{AgentSessions, WORK_MOUNT};
use crate::store::{Store, VmRecord, WorkspaceRecord};
use crate::vm::agent_client::AgentSession;
use crate::workspace::manifest::{self, Entry, GuestDelta, Manifest};
use crate::workspace::watch::{Changes, Watcher};
use crate::workspace::{plan, scan, validate};

pub const MANIFEST_FILE: &str = "workspace.json";

pub use guest::Progress;

/// Which way a sync goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Direction {
    /// Guest to host (else host to guest).
    pub pull: bool,
    pub force: Option<SyncSide>,
}

pub struct WorkspaceService {
    store: Arc<Store>,
    sessions: Arc<AgentSessions>,
    runner: Arc<dyn ProcessRunner>,
    state_dir: PathBuf,
    /// One sync at a time per VM: two execs at once share one manifest.
    syncing: KeyedLocks,
    manifests: std::sync::Mutex<std::collections::HashMap<String, Arc<Manifest>>>,
    files: manifest_file::ManifestFiles,
    /// What changed in each running VM's host directory since its last sync.
    watchers: std::sync::Mutex<std::collections::HashMap<String, Arc<Watcher>>>,
    /// Room a pull leaves free on the host's filesystem, as pulls of images
    /// and creates leave (`limits.min_free_bytes`).
    min_free: u64,
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
            files: Default::default(),
            watchers: Default::default(),
            min_free: 64 << 20,
        }
    }

    pub fn with_min_free(mut self, bytes: u64) -> WorkspaceService {
        self.min_free = bytes;
        self
    }

    /// A create's workspace, checked before anything is made: the host
    /// directory (canonical) and the guest path. It must fit the work disk
    /// (`work_disk` bytes).
    pub fn check(
        &self,
        dir: &str,
        guest_path: Option<&str>,
        work_disk: u64,
    ) -> OpResult<(String, String)> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let dir = validate::workspace_dir(Path::new(dir), home.as_deref(), &self.state_dir)?;
        let guest = checked_guest_path(guest_path.unwrap_or(WORK_MOUNT))?;
        let listing = scan::list(&dir, self.runner.as_ref())?;
        validate::fits(&dir, &listing, work_disk)?;
        Ok((dir.display().to_string(), guest))
    }

    pub fn attach(
        &self,
        vm: &str,
        host_dir: String,
        guest_path: String,
        owner: Option<String>,
    ) -> OpResult<()> {
        Ok(self.store.put_workspace(&WorkspaceRecord {
            vm: vm.to_string(),
            host_dir,
            guest_path,
            last_sync: None,
            owner,
            // Known to be none until the guest first runs.
            guest_changes: Some(0),
        })?)
    }

    /// The VM is about to run: its guest's unpulled changes are unknown
    /// until a clean stop counts them again (a guest that powers itself
    /// off, crashes or is killed leaves them unknown, and `vm rm` then
    /// refuses). Returns the count it had, for a boot that fails to undo.
    pub fn guest_may_change(&self, vm: &str) -> Option<Option<u64>> {
        let ws = self.record(vm).ok().flatten()?;
        if let Err(e) = self.store.set_workspace_guest_changes(vm, None) {
            tracing::warn!(vm, error = %e, "marking the guest's workspace changes unknown");
        }
        Some(ws.guest_changes)
    }

    /// A boot that failed before its guest ran: the count it had stands.
    pub fn restore_guest_count(&self, vm: &str, count: Option<u64>) {
        if let Err(e) = self.store.set_workspace_guest_changes(vm, count) {
            tracing::warn!(vm, error = %e, "restoring the guest's workspace change count");
        }
    }

    /// The VM's workspace, if it has one.
    pub fn record(&self, vm: &str) -> OpResult<Option<WorkspaceRecord>> {
        Ok(self.store.get_workspace(vm)?)
    }

    /// `vm sync NAME [--pull] [--force SIDE]`, with progress events.
    pub async fn sync(
        &self,
        params: SyncParams,
        events: crate::events::Events<SyncProgress>,
    ) -> OpResult<SyncResult> {
        let (vm, session) = self.sessions.running(&params.name).await?;
        let ws = self.required(&params.name)?;
        let direction = Direction {
            pull: params.pull,
            force: params.force,
        };
        let progress: Progress = Arc::new(move |p| events.emit(&p));
        self.sync_with(&vm, &ws, &session, direction, Some(progress))
            .await
    }

    fn required(&self, name: &str) -> OpResult<WorkspaceRecord> {
        self.record(name)?.ok_or_else(|| {
            OpError::invalid(format!(
                "VM `{name}` has no workspace; create it with `--workspace DIR`"
            ))
        })
    }

    /// How many changes each side holds that the other does not have:
    /// (host, guest). The guest's is counted live over `session`, else it is
    /// what the VM's last stop recorded.
    pub async fn pending(
        &self,
        vm: &VmRecord,
        ws: &WorkspaceRecord,
        session: Option<&AgentSession>,
    ) -> OpResult<(u64, Option<u64>)> {
        let _one_at_a_time = self.syncing.lock(&vm.name).await;
        let old = self.take_manifest(vm);
        let scanned = self.scan_host(ws, old.clone()).await;
        // The host's paths, just listed: the guest's new ones are judged by them.
        let known = scanned
            .as_ref()
            .map_or(&[][..], |(_, known)| known.as_slice());
        let guest = match session {
            Some(s) => match self.scan_guest(ws, &old, s, known).await {
                Ok(delta) => Some(delta.len() as u64),
                Err(e) => {
                    tracing::warn!(vm = %vm.name, error = %e.message, "listing the guest workspace");
                    ws.guest_changes
                }
            },
            None => ws.guest_changes,
        };
        self.keep_manifest(vm, old);
        let host = scanned?.0;
        Ok(((host.changed.len() + host.removed.len()) as u64, guest))
    }

    /// Counts the guest's unpulled changes before a stop, so that `vm rm`
    /// can tell without the VM running.
    pub async fn record_before_stop(&self, vm: &VmRecord, session: &AgentSession) {
        let Ok(Some(ws)) = self.record(&vm.name) else {
            return;
        };
        match self.pending(vm, &ws, Some(session)).await {
            Ok((_, Some(guest))) => {
                if let Err(e) = self
                    .store
                    .set_workspace_guest_changes(&vm.name, Some(guest))
                {
                    tracing::warn!(vm = %vm.name, error = %e, "recording guest workspace changes");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(vm = %vm.name, error = %e.message, "counting workspace changes")
            }
        }
    }

    /// Syncs `vm`'s workspace `ws` over `session`.
    pub async fn sync_with(
        &self,
        vm: &VmRecord,
        ws: &WorkspaceRecord,
        session: &AgentSession,
        direction: Direction,
        progress: Option<Progress>,
    ) -> OpResult<SyncResult> {
        let _one_at_a_time = self.syncing.lock(&vm.name).await;
        let started = std::time::Instant::now();
        let old = self.take_manifest(vm);
        // On failure the cache is left empty: the next sync reads the file.
        let (result, next, changed) = self
            .sync_locked(vm, ws, session, direction, old, progress)
            .await?;
        if changed {
            let path = Path::new(&vm.dir).join(MANIFEST_FILE);
            self.files.save(&cache_key(vm), path, next.clone());
        }
        // No count is recorded here: the guest runs on and may change more
        // after a pull; only a clean stop's count is one `vm rm` can trust.
        self.keep_manifest(vm, next);
        if changed || ws.last_sync.is_none() {
            self.store
                .set_workspace_synced(&vm.name, &crate::ids::now_rfc3339())?;
        }
        // One line a benchmark reads (scripts/bench-workspace).
        tracing::info!(
            vm = %vm.name,
            written = result.written,
            removed = result.removed,
            pulled = result.pulled,
            conflicts = result.conflicts.len(),
            bytes = result.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "workspace synced"
        );
        Ok(result)
    }

    async fn sync_locked(
        &self,
        vm: &VmRecord,
        ws: &WorkspaceRecord,
        session: &AgentSession,
        direction: Direction,
        old: Arc<Manifest>,
        progress: Option<Progress>,
    ) -> OpResult<(SyncResult, Arc<Manifest>, bool)> {
        // Before an exec the watcher says what to look at; a pull or a
        // forced side lists everything.
        let watcher = self.watcher(vm, ws).await;
        let changes = watcher.as_ref().map(|w| w.take());
        let scanned = match &changes {
            Some(Changes::Paths(paths)) if direction == Direction::default() => {
                self.restat_host(ws, old.clone(), paths.clone()).await
            }
            _ => self.scan_host(ws, old.clone()).await,
        };
        let (mut host, known) = match scanned {
            Ok(scanned) => scanned,
            Err(e) => {
                if let Some(w) = &watcher {
                    w.requeue(Changes::Everything);
                }
                return Err(e);
            }
        };
        let result = self
            .apply_changes(vm, ws, session, direction, progress, old, &mut host, known)
            .await;
        if let Some(w) = &watcher {
            match &result {
                // Conflicts are looked at again by the next sync.
                Ok((r, _, _)) => w.requeue(Changes::Paths(r.conflicts.iter().cloned().collect())),
                Err(_) => w.requeue(Changes::Everything),
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply_changes(
        &self,
        vm: &VmRecord,
        ws: &WorkspaceRecord,
        session: &AgentSession,
        direction: Direction,
        progress: Option<Progress>,
        old: Arc<Manifest>,
        host: &mut manifest::HostDelta,
        known: Vec<String>,
    ) -> OpResult<(SyncResult, Arc<Manifest>, bool)> {
        let failed = |why: String| {
            OpError::internal(format!(
                "syncing the workspace of {} ({} and {}:{}): {why}",
                vm.name, ws.host_dir, vm.name, ws.guest_path
            ))
        };
        let guest = if direction.pull || direction.force == Some(SyncSide::Guest) {
            Some(self.scan_guest(ws, &old, session, &known).await?)
        } else {
            None
        };
        let refreshed = std::mem::take(&mut host.refreshed);
        let mut plan = plan::plan(
            &old,
            std::mem::take(host),
            guest,
            direction.pull,
            direction.force,
        );
        let changed = !refreshed.is_empty()
            || !plan.push.is_empty()
            || !plan.pull.is_empty()
            || !plan.pull_remove.is_empty()
            || !plan.forget.is_empty();
        // The only reference now: changed in place, not copied.
        let mut next = old;
        for entry in refreshed {
            Arc::make_mut(&mut next)
                .entries
                .insert(entry.found.path.clone(), entry);
        }
        let mut result = SyncResult {
            guest_path: ws.guest_path.clone(),
            host_dir: ws.host_dir.clone(),
            conflicts: std::mem::take(&mut plan.conflicts),
            ..Default::default()
        };
        let host_dir = PathBuf::from(&ws.host_dir);
        // Refused before anything is written: a guest cannot fill the
        // host's disk (and leave a partial file) through a pull.
        let need: u64 = plan.pull.iter().map(|s| s.room()).sum();
        if let Some(free) =
            crate::rootfs::extract::free_bytes(&host_dir).filter(|_| !plan.pull.is_empty())
        {
            if free < need.saturating_add(self.min_free) {
                return Err(OpError::invalid(format!(
                    "pulling {} file(s) from {}:{} needs {} MiB in {} and its filesystem has {} MiB \
                     free (keeping {} MiB spare): free space there (`df -h {}`), or keep the big \
                     files out with .bangerignore, then `banger vm sync {} --pull` again",
                    plan.pull.len(),
                    vm.name,
                    ws.guest_path,
                    need.div_ceil(1 << 20),
                    ws.host_dir,
                    free >> 20,
                    self.min_free >> 20,
                    ws.host_dir,
                    vm.name,
                )));
            }
        }
        if !plan.push.is_empty() {
            let items = std::mem::take(&mut plan.push);
            let total: u64 = plan
                .pushed
                .values()
                .filter(|e| e.found.kind == scan::Kind::File)
                .map(|e| e.found.size)
                .sum();
            let outcomes = guest::push(
                session,
                &host_dir,
                &ws.guest_path,
                ws.owner.as_deref(),
                items.clone(),
                total,
                progress,
            )
            .await
            .map_err(failed)?;
            let entries = &mut Arc::make_mut(&mut next).entries;
            for (item, outcome) in items.into_iter().zip(outcomes) {
                match outcome {
                    Outcome::Written { ctime_ns } => {
                        let Some(mut entry) = plan.pushed.remove(&item.path) else {
                            continue;
                        };
                        entry.guest_ctime = Some(ctime_ns);
                        result.written += 1;
                        if entry.found.kind == scan::Kind::File {
                            result.bytes += entry.found.size;
                        }
                        entries.insert(item.path, entry);
                    }
                    Outcome::Removed => {
                        result.removed += 1;
                        entries.remove(&item.path);
                    }
                    Outcome::Conflict | Outcome::Refused { .. } => result.conflicts.push(item.path),
                }
            }
        }
        // Removals before writes, as on the guest: `foo` may be coming back
        // as a directory, or a directory as a file of its name.
        for path in &plan.pull_remove {
            remove_on_host(&host_dir, path).map_err(|e| failed(e.to_string()))?;
            Arc::make_mut(&mut next).entries.remove(path);
            result.pulled_removed += 1;
        }
        if !plan.pull.is_empty() {
            let paths: Vec<String> = plan.pull.iter().map(|s| s.path.clone()).collect();
            let outcomes = guest::fetch(session, &ws.guest_path, &paths, &host_dir)
                .await
                .map_err(failed)?;
            let entries = &mut Arc::make_mut(&mut next).entries;
            for (stat, outcome) in plan.pull.iter().zip(outcomes) {
                match outcome {
                    Outcome::Written { .. } => {
                        if let Some(found) = scan::stat(&host_dir, &stat.path)? {
                            let entry = Entry {
                                guest_ctime: Some(stat.ctime_ns),
                                ..Entry::new(found)
                            };
                            entries.insert(stat.path.clone(), entry);
                        }
                        result.pulled += 1;
                    }
                    Outcome::Refused { why } => result.refused.push(Refused {
                        path: stat.path.clone(),
                        why,
                    }),
                    Outcome::Removed | Outcome::Conflict => {}
                }
            }
        }
        for path in &plan.forget {
            Arc::make_mut(&mut next).entries.remove(path);
        }
        result.conflicts.sort();
        result.conflicts.dedup();
        Ok((result, next, changed))
    }

    /// The VM's watcher, started on first use (and again if it broke); none
    /// where inotify is out of watches or instances: every sync lists.
    async fn watcher(&self, vm: &VmRecord, ws: &WorkspaceRecord) -> Option<Arc<Watcher>> {
        let key = cache_key(vm);
        if let Some(w) = self
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if !w.is_broken() {
                return Some(w.clone());
            }
        }
        let dir = PathBuf::from(&ws.host_dir);
        let started = tokio::task::spawn_blocking(move || Watcher::start(&dir)).await;
        let watcher = match started {
            Ok(Ok(w)) => Arc::new(w),
            Ok(Err(e)) => {
                tracing::warn!(vm = %vm.name, error = %e, "cannot watch the workspace; every sync lists it");
                return None;
            }
            Err(_) => return None,
        };
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, watcher.clone());
        Some(watcher)
    }

    /// Writes the VM's manifest file now (a snapshot copies it).
    pub async fn flush(&self, vm: &VmRecord) {
        self.files.flush(&cache_key(vm)).await;
    }

    /// Stops watching a VM's workspace (it stopped or went), with its
    /// manifest file written; the next sync reads that file (which a
    /// restore may have replaced meanwhile).
    pub async fn forget(&self, vm: &VmRecord) {
        let key = cache_key(vm);
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        self.files.flush(&key).await;
        self.manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    /// The host's changes since `old` among `paths` (a watcher's).
    async fn restat_host(
        &self,
        ws: &WorkspaceRecord,
        old: Arc<Manifest>,
        paths: std::collections::BTreeSet<String>,
    ) -> OpResult<(manifest::HostDelta, Vec<String>)> {
        if paths.is_empty() {
            return Ok(Default::default());
        }
        let (host_dir, runner) = (PathBuf::from(&ws.host_dir), self.runner.clone());
        Ok(tokio::task::spawn_blocking(move || {
            let delta = manifest::host_changes_at(&old, &paths, &host_dir, |new| {
                let known: Vec<String> = old.entries.keys().cloned().collect();
                scan::wanted_new(&host_dir, runner.as_ref(), &known, new)
            })?;
            Ok::<_, crate::workspace::WorkspaceError>((delta, Vec::new()))
        })
        .await??)
    }

    /// The host's changes since `old`, and every path the host lists now.
    async fn scan_host(
        &self,
        ws: &WorkspaceRecord,
        old: Arc<Manifest>,
    ) -> OpResult<(manifest::HostDelta, Vec<String>)> {
        let (host_dir, runner) = (PathBuf::from(&ws.host_dir), self.runner.clone());
        Ok(tokio::task::spawn_blocking(move || {
            let listing = scan::list(&host_dir, runner.as_ref())?;
            let known = listing.found.iter().map(|f| f.path.clone()).collect();
            let delta = manifest::host_changes(&old, listing, &host_dir)?;
            Ok::<_, crate::workspace::WorkspaceError>((delta, known))
        })
        .await??)
    }

    /// The guest's changes since `old`. `known`: the host's paths (for its
    /// ignore files), listed anew when empty.
    async fn scan_guest(
        &self,
        ws: &WorkspaceRecord,
        old: &Manifest,
        session: &AgentSession,
        known: &[String],
    ) -> OpResult<GuestDelta> {
        let listed = guest::list(session, &ws.guest_path).await.map_err(|why| {
            OpError::internal(format!("listing {} in the guest: {why}", ws.guest_path))
        })?;
        let new: Vec<String> = listed
            .iter()
            .filter(|s| !old.entries.contains_key(&s.path))
            .map(|s| s.path.clone())
            .collect();
        let (host_dir, runner) = (PathBuf::from(&ws.host_dir), self.runner.clone());
        let mut known = known.to_vec();
        let wanted = tokio::task::spawn_blocking(move || {
            if known.is_empty() && !new.is_empty() {
                known = scan::list(&host_dir, runner.as_ref())?
                    .found
                    .into_iter()
                    .map(|f| f.path)
                    .collect();
            }
            Ok::<_, crate::workspace::WorkspaceError>(scan::wanted_new(
                &host_dir,
                runner.as_ref(),
                &known,
                &new,
            ))
        })
        .await??;
        Ok(manifest::guest_changes(old, listed, |p| wanted.contains(p)))
    }

    /// The last sync's manifest, out of the cache while a sync works on it:
    /// kept in memory between syncs, read from its file after a daemon
    /// restart. Keyed by the VM's creation too: a new VM under an old name
    /// starts afresh.
    fn take_manifest(&self, vm: &VmRecord) -> Arc<Manifest> {
        let cached = self
            .manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cache_key(vm));
        cached.unwrap_or_else(|| {
            Arc::new(
                std::fs::read(Path::new(&vm.dir).join(MANIFEST_FILE))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default(),
            )
        })
    }

    fn keep_manifest(&self, vm: &VmRecord, manifest: Arc<Manifest>) {
        self.manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cache_key(vm), manifest);
    }
}

fn cache_key(vm: &VmRecord) -> String {
    format!("{}@{}", vm.name, vm.created_at)
}

/// Removes a path the guest removed, if it is a plain relative one.
fn remove_on_host(host_dir: &Path, path: &str) -> std::io::Result<()> {
    let rel = banger_treecopy::names::decode(path);
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Ok(()); // Not one of the manifest's own: nothing to do.
    }
    banger_treecopy::sync::remove_path(host_dir, &rel, &rel)
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
