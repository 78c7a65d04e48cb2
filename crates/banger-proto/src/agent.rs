//! What the host and the guest agent tell each other.
//!
//! The host hands the agent a [`BootConfig`] as `/banger/config.json` inside a
//! per-VM initramfs archive. The agent answers on its control channel with
//! one [`AgentReport`] JSON line per stage, the last being `ready` or `failed`.
//! Commands then run over SSH; banger's own exec requests are an
//! [`ExecRequest`] encoded as the SSH exec command.

use serde::{Deserialize, Serialize};

/// Bumped when the boot config, reports or exec requests change incompatibly.
pub const AGENT_PROTOCOL: u32 = 1;

/// Where the agent's config sits inside the initramfs.
pub const BOOT_CONFIG_PATH: &str = "/banger/config.json";
/// Modules to load in dependency order, one per line: its path, a space, and
/// the comma-separated drivers (below) that need it. The agent loads the bus
/// and its transport's drivers first, so SSH comes up while the others load,
/// and skips drivers the VM does not use.
pub const MODULES_ORDER_PATH: &str = "/banger/modules.order";

/// The drivers the module manifest names.
pub mod driver {
    /// The virtio-mmio bus every device sits on.
    pub const BUS: &str = "virtio_mmio";
    pub const DISK: &str = "virtio_blk";
    pub const NET: &str = "virtio_net";
    /// Virtio-serial ports: the agent's transport under QEMU here.
    pub const SERIAL: &str = "virtio_console";
    /// Vsock: the agent's transport under Firecracker.
    pub const VSOCK: &str = "vmw_vsock_virtio_transport";
    /// Overlayfs: the root of a VM whose image is shared read-only.
    pub const OVERLAY: &str = "overlay";
}

/// Names of the virtio-serial ports (QEMU) the agent looks for.
pub const SSH_PORT_NAME: &str = "banger.ssh";
pub const CTL_PORT_NAME: &str = "banger.ctl";
/// vsock ports (Firecracker): the agent listens on `VSOCK_SSH_PORT` and
/// connects to the host's `VSOCK_CTL_PORT`.
pub const VSOCK_SSH_PORT: u32 = 22;
pub const VSOCK_CTL_PORT: u32 = 1024;

/// An SSH exec command that replaces the user keys: this prefix, then one
/// OpenSSH public key per line. banger's own keys are never replaced.
pub const SET_USER_KEYS: &str = "banger-set-user-keys\n";

/// An SSH exec command: the agent holds every later command (and reports
/// `held`) until an [`Identity`] arrives on its control channel. Sent before
/// a snapshot is taken, so that every VM restored from it, the source
/// included, is told who it is before it runs anything.
pub const HOLD: &str = "banger-hold";

/// What the host sends the agent on its control channel: one JSON line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum HostMessage {
    Identity(Identity),
}

/// Who a VM is, given anew after a restore: a fork of a snapshot must not
/// share its parent's name, address, host key, clock or random state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub hostname: String,
    /// The SSH host key (OpenSSH private key format) for connections from now on.
    pub host_key: String,
    #[serde(default)]
    pub network: Option<GuestNetwork>,
    /// `eth0`'s MAC address (`06:00:…`).
    #[serde(default)]
    pub mac: Option<String>,
    /// The host's wall clock when sent, in nanoseconds since the epoch: a
    /// restored guest's clock stands where the snapshot left it.
    pub unix_time_ns: u64,
    /// Fresh host randomness (hex) mixed into the guest kernel's RNG, which
    /// is then reseeded: forks of one snapshot start from the same pool.
    pub entropy: String,
}

/// A program name the agent runs from its own binary, so copying works in
/// images without tar: `banger-tar create PATH…` writes a tar of the paths to
/// stdout; `banger-tar extract DST` unpacks stdin into DST (see `vm cp`).
pub const TAR_TOOL: &str = "banger-tar";

/// What `banger-tar stats PATH…` prints (one JSON line): the guest's
/// memory and load from /proc, and `statfs` of each path.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    pub filesystems: Vec<GuestFs>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFs {
    pub path: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}

/// Prefix of an SSH exec command that carries an [`ExecRequest`].
pub const EXEC_PREFIX: &str = "banger-exec-v1 ";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Transport {
    /// SSH and control each on a virtio-serial port (QEMU without vhost-vsock).
    VirtioSerial,
    /// SSH listening on vsock, control by connecting to the host (Firecracker).
    Vsock,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    pub protocol: u32,
    pub hostname: String,
    /// Block device of the root filesystem, e.g. `/dev/vda`.
    pub root_device: String,
    /// With an overlay root: the VM's own disk holding the overlay's upper
    /// and work directories; `root_device` is then the image, read-only.
    #[serde(default)]
    pub root_upper: Option<String>,
    /// Block device of the work disk and where it is mounted.
    #[serde(default)]
    pub work_device: Option<String>,
    #[serde(default)]
    pub work_mount: Option<String>,
    /// The VM's SSH host key (OpenSSH private key format), generated by the host.
    pub host_key: String,
    /// banger's own key(s): always allowed to log in.
    pub authorized_keys: Vec<String>,
    /// The user's keys, also allowed; replaced while the VM runs by the
    /// [`SET_USER_KEYS`] request.
    #[serde(default)]
    pub user_keys: Vec<String>,
    pub transport: Transport,
    /// The image's environment, for commands run without an explicit one.
    #[serde(default)]
    pub env: Vec<String>,
    /// The guest's network; none when the VM has no network device.
    #[serde(default)]
    pub network: Option<GuestNetwork>,
}

/// How the agent configures `eth0`: the guest's own /32 address, an on-link
/// route to the gateway, a default route through it, and the resolver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    pub address: std::net::Ipv4Addr,
    pub gateway: std::net::Ipv4Addr,
    pub nameserver: std::net::Ipv4Addr,
    /// Search domain for short names (`vm` makes `web` mean `web.vm`).
    #[serde(default)]
    pub search: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub protocol: u32,
    pub version: String,
    /// `modules`, `root`, `ssh`, then `ready`; or `failed` with `error`;
    /// `held` while waiting for an [`Identity`] (see [`HOLD`]).
    pub stage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How many [`Identity`] messages the agent has taken since it booted:
    /// the host waits for this to grow after sending one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub identities: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments, passed unchanged (no shell, no re-splitting).
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// A user name or `uid[:gid]`; the image's default when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Flow control (banger's daemon asks; plain SSH clients cannot): the
    /// agent sends at most this many output bytes the host has not yet
    /// acknowledged, and acknowledges stdin bytes once the command has
    /// taken them. Acknowledgements travel as extended data of type
    /// [`FLOW_ACK`] holding a big-endian u32 byte count. SSH's own window
    /// cannot do this: both russh ends reopen it on receipt, so a slow
    /// reader would stall the whole connection instead of its channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<u32>,
    /// Start the command and answer at once with a [`Detached`] line: it
    /// runs on with stdin from /dev/null and its output appended to a log
    /// in the guest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
}

/// What a detached command's start answers (one JSON line on stdout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detached {
    pub pid: u32,
    /// Where its stdout and stderr go, in the guest.
    pub log: String,
}

/// Where detached commands' logs are written in the guest.
pub const DETACHED_LOG_DIR: &str = "/var/log/banger";

/// Extended-data type of flow-control acknowledgements (see
/// [`ExecRequest::flow`]); type 1 is stderr.
pub const FLOW_ACK: u32 = 0xb4_0001;

/// Exit statuses banger uses for its own failures, as docker does.
pub mod exit {
    pub const BANGER_FAILED: u32 = 125;
    pub const CANNOT_INVOKE: u32 = 126;
    pub const NOT_FOUND: u32 = 127;
}
