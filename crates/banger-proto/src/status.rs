//! Result of `daemon.status`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's crate version; the CLI compares it with its own.
    pub version: String,
    pub protocol: u32,
    pub pid: u32,
    pub uid: u32,
    pub socket: String,
    pub state_dir: String,
    pub cache_dir: String,
    pub images: u64,
    /// VM networking as the daemon sees it: `{"ok": "…"}` or `{"error": "…"}`.
    #[serde(default)]
    pub network: Option<NetworkStatus>,
    /// Where banger's DNS server answers (`10.213.0.1:1053`) and its domain,
    /// when VM networking is on.
    #[serde(default)]
    pub dns: Option<DnsStatus>,
    /// Whether Firecracker VMs run through the jailer, and why not.
    #[serde(default)]
    pub jailer: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsStatus {
    pub addr: String,
    pub domain: String,
    /// The device holding the gateway address, where systemd-resolved
    /// routes the domain.
    #[serde(default)]
    pub device: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkStatus {
    Ok(String),
    Error(String),
}
