//! Params, results and events of the `vm.*` methods.

use serde::{Deserialize, Serialize};

pub use crate::domain::{RootMode, VmState, VmmKind};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateParams {
    pub name: String,
    /// Empty with `from`: a fork has its snapshot's image.
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Root disk size in bytes (at least the image's).
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// Work disk size in bytes (the disk at `/work`, where a workspace
    /// lands); 8 GiB when absent.
    #[serde(default)]
    pub work_disk_bytes: Option<u64>,
    /// The configured default when absent.
    #[serde(default)]
    pub vmm: Option<VmmKind>,
    /// How the root filesystem is made; the host's best when absent.
    #[serde(default)]
    pub root_mode: Option<RootMode>,
    /// An absolute host directory mirrored into the VM (see docs/workspaces.md).
    #[serde(default)]
    pub workspace: Option<String>,
    /// Where the workspace lands in the guest (default `/work`).
    #[serde(default)]
    pub workspace_path: Option<String>,
    /// Start the VM once created (`vm run`).
    #[serde(default)]
    pub start: bool,
    /// Make the VM a fork of this snapshot: its disks, and (for a snapshot
    /// of a running VM) its memory, resumed at the first start under the
    /// new VM's own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Boot even when the image has a warm template for these settings.
    #[serde(default)]
    pub cold: bool,
    /// CPU time the VM's VMM may use, as a percentage of one host CPU
    /// (Firecracker through the jailer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota: Option<u32>,
}

/// `image.warm`: boot `image` once with these settings and keep the booted
/// VM as the image's template, which `vm run` then forks instead of booting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmParams {
    pub image: String,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
}

/// `vm.set`: a VM's resources changed. Each absent field stays as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetParams {
    pub name: String,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// The root disk's new size in bytes (never smaller).
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// The work disk's new size in bytes (never smaller).
    #[serde(default)]
    pub work_disk_bytes: Option<u64>,
    /// A new CPU quota (percent of one host CPU; 0 removes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota: Option<u32>,
    /// A running VM is stopped, changed and started again (else refused).
    #[serde(default)]
    pub restart: bool,
}

/// `vm.stats`: the VMs named, or every VM when none is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsParams {
    #[serde(default)]
    pub names: Vec<String>,
}

/// What a VM uses, as `vm stats` shows it. Fields a stopped (or paused)
/// VM cannot answer are absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    pub name: String,
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Seconds since the VMM started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<u64>,
    /// CPU time of the VMM process over the last interval, as a share of
    /// the VM's vCPUs (100 = all of them busy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Resident memory of the VMM process on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_rss_bytes: Option<u64>,
    /// How old the guest's figures (`guest_memory`, `load`, each disk's
    /// `fs_*`) are, in milliseconds: the guest is asked in the background
    /// and a round waits for it only briefly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_age_ms: Option<u64>,
    /// From the guest's /proc/meminfo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory: Option<GuestMemory>,
    /// The guest's 1, 5 and 15 minute load averages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<[f64; 3]>,
    pub disks: Vec<DiskStats>,
    /// Bytes the guest received and sent (its tap's counters, turned round).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemory {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// `root` or `work`.
    pub disk: String,
    /// Its file on the host, its size and what of it is allocated (sparse).
    pub file: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    /// Where the guest mounts it, and its filesystem's size and use there
    /// (while the VM runs).
    pub guest_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_total_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_used_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// `vm.snapshot`: the VM `name` saved as the snapshot `snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotParams {
    pub name: String,
    pub snapshot: String,
    /// Stop the VM once the snapshot is written.
    #[serde(default)]
    pub stop: bool,
}

/// `vm.restore`: the VM `name` taken back to its snapshot `snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreParams {
    pub name: String,
    pub snapshot: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// The VM it was taken of.
    pub vm: String,
    pub image: String,
    pub kernel: String,
    pub vmm: VmmKind,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    pub root_mode: RootMode,
    /// Memory and device state are in it (the VM was running): restoring
    /// resumes where it was. Otherwise it holds disks only, and restores by
    /// booting.
    pub memory: bool,
    /// Bytes it takes on the host's disk.
    pub size_bytes: u64,
    pub dir: String,
    pub created_at: String,
    /// VMs made from it that have not started yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_forks: Vec<String>,
    /// A warm template: the image whose `vm run` forks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    /// `running`, `paused` or `stopped`: always what the VMM process really
    /// is (`paused`: it lives but runs no guest; `problem` says why).
    pub state: VmState,
    /// Why a paused VM is paused, and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    pub image: String,
    pub kernel: String,
    pub vmm: VmmKind,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    /// How the root filesystem is made from the image.
    #[serde(alias = "cow_strategy")]
    pub root_mode: RootMode,
    /// The VM's directory: disks, console log, sockets.
    pub dir: String,
    /// Where the work disk is mounted in the guest.
    pub work_mount: String,
    pub pid: Option<u32>,
    pub created_at: String,
    pub started_at: Option<String>,
    /// While it runs: `boot`, or what it resumed instead of booting,
    /// `snapshot NAME` (a restore or a fork) or `template NAME` (a warm
    /// start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_from: Option<String>,
    /// The guest's IPv4 address; none without networking.
    #[serde(default)]
    pub ip: Option<String>,
    /// The host tap while the VM runs.
    #[serde(default)]
    pub tap: Option<String>,
    /// The VM's SSH host key (OpenSSH public key), pinned by `ssh-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// How the running VM is networked, and what that mode cannot do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<VmNetwork>,
    /// The root of the running VM's jail on the host (jailed Firecracker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<String>,
    /// CPU time its VMM may use, percent of one host CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceInfo>,
}

/// A running VM's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNetwork {
    pub mode: crate::domain::NetworkMode,
    /// What this mode lacks, in words (empty for `bridged`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lacks: Vec<String>,
}

/// A VM's workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceInfo {
    pub host_dir: String,
    pub guest_path: String,
    /// RFC 3339 UTC; none before the first sync.
    pub last_sync: Option<String>,
    /// Host changes not yet in the guest (counted by `vm inspect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_changes: Option<u64>,
    /// Guest changes not yet pulled to the host: counted live while the VM
    /// runs, else as its last stop left them; none when not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_changes: Option<u64>,
}

/// Which side wins a conflict (a path changed on both since the last sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncSide {
    Host,
    Guest,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncParams {
    pub name: String,
    /// Guest to host: bring back what the guest changed.
    #[serde(default)]
    pub pull: bool,
    /// Settle conflicts for this side instead of leaving them alone.
    #[serde(default)]
    pub force: Option<SyncSide>,
}

/// How far a workspace sync has got (sent every half second while it sends).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncProgress {
    /// Bytes of the stream sent so far (contents and tar headers).
    pub done_bytes: u64,
    /// Bytes of file content to send.
    pub total_bytes: u64,
    pub files: u64,
}

impl SyncProgress {
    /// One line for a person watching.
    pub fn line(&self, vm: &str) -> String {
        format!(
            "{vm}: workspace: {} of {} sent ({} file(s))",
            crate::human_bytes(self.done_bytes.min(self.total_bytes)),
            crate::human_bytes(self.total_bytes),
            self.files
        )
    }
}

/// A guest path a pull would not take, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub path: String,
    pub why: String,
}

/// What a workspace sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResult {
    /// Files and links written in the guest.
    pub written: u64,
    /// Paths removed in the guest.
    pub removed: u64,
    /// Bytes of file content sent.
    pub bytes: u64,
    pub guest_path: String,
    #[serde(default)]
    pub host_dir: String,
    /// Files and links the host took from the guest.
    #[serde(default)]
    pub pulled: u64,
    /// Paths removed on the host because the guest removed them.
    #[serde(default)]
    pub pulled_removed: u64,
    /// Paths changed on both sides, left alone on both.
    #[serde(default)]
    pub conflicts: Vec<String>,
    #[serde(default)]
    pub refused: Vec<Refused>,
}

impl SyncResult {
    /// What the sync did to `vm`, a line per kind of thing; none when
    /// nothing changed.
    pub fn summary(&self, vm: &str) -> Vec<String> {
        let mut lines = Vec::new();
        if self.written + self.removed > 0 {
            lines.push(format!(
                "synced {} changed file(s), {} removed ({}) into {vm}:{}",
                self.written,
                self.removed,
                crate::human_bytes(self.bytes),
                self.guest_path
            ));
        }
        if self.pulled + self.pulled_removed > 0 {
            lines.push(format!(
                "pulled {} changed file(s), {} removed from {vm}:{} into {}",
                self.pulled, self.pulled_removed, self.guest_path, self.host_dir
            ));
        }
        if !self.conflicts.is_empty() {
            lines.push(format!(
                "{} conflict(s) left alone, changed on both sides: {} (`banger vm sync {vm} --force host|guest` picks a side)",
                self.conflicts.len(),
                shorten(&self.conflicts)
            ));
        }
        for r in &self.refused {
            lines.push(format!("not pulled: {} ({})", r.path, r.why));
        }
        lines
    }
}

/// Up to five paths, then how many more.
fn shorten(paths: &[String]) -> String {
    let mut shown = paths.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if paths.len() > 5 {
        shown.push_str(&format!(" and {} more", paths.len() - 5));
    }
    shown
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NameParams {
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StopParams {
    pub name: String,
    /// Seconds to wait for a clean shutdown before killing the VMM.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PortForwardParams {
    pub name: String,
    /// Host address to listen on (default 127.0.0.1).
    #[serde(default)]
    pub host_ip: Option<String>,
    /// Host port; 0 picks a free one (reported in the `listening` event).
    pub host_port: u16,
    pub guest_port: u16,
}

/// Streamed by `vm.port_forward`: once when its listener is bound, and
/// again for each connection that found nothing listening in the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardEvent {
    /// The bound host address (`127.0.0.1:40123`).
    pub listening: String,
    pub guest_port: u16,
    /// A connection came and the guest port refused it: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PortForwardResult {
    /// Connections forwarded before the caller hung up.
    pub connections: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogsParams {
    pub name: String,
    /// Only the last N lines.
    #[serde(default)]
    pub tail: Option<usize>,
    /// Keep streaming new lines as events.
    #[serde(default)]
    pub follow: bool,
}

/// Console text streamed by a following `vm.logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEvent {
    pub text: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogsResult {
    /// The console text (everything when not following).
    pub text: String,
}

/// Progress of `vm.create` / `vm.start`, streamed as events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmEvent {
    /// A step began: `disks`, `initramfs`, `launch`, `agent`, `ssh`.
    Step { step: String, n: u32, of: u32 },
    /// The guest agent reported a boot stage.
    Agent { stage: String },
    /// The first workspace sync is sending.
    Workspace(SyncProgress),
    /// Something the user should know, said once (on stderr): a boot
    /// retried under TCG because KVM killed its guest.
    Notice { message: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecParams {
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// `(term, cols, rows)` for a terminal session.
    #[serde(default)]
    pub tty: Option<(String, u16, u16)>,
    /// Run without first syncing the VM's workspace.
    #[serde(default)]
    pub no_sync: bool,
    /// Start the command and return at once: the result's `detached` says
    /// its pid and the guest log its output goes to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
}

/// Exec output, streamed as events (base64 payloads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecEvent {
    Stdout(String),
    Stderr(String),
}

/// What the client sends after an exec request, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecInput {
    Stdin(String),
    StdinEof,
    /// A signal name without `SIG`: `INT`, `TERM`, `HUP`, …
    Signal(String),
    Resize(u16, u16),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The guest command's status, or 128+N when killed by signal N.
    pub exit_code: i32,
    #[serde(default)]
    pub signal: Option<String>,
    /// A detached command (`detach`): its pid and log in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached: Option<crate::agent::Detached>,
}
