//! The root helper's protocol: one JSON request per line, one JSON reply per
//! line, on the helper's own socket. Requests are typed and narrow; the helper
//! validates each one against its own policy and never trusts a path, name or
//! pid it is sent.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::jail::JailRequest;

/// Bumped whenever a request or reply changes incompatibly (3: the process
/// verbs `launch`, `alive` and `signal` are gone; VMMs run as the daemon's
/// user. 4: jailed Firecrackers, and what `ping` says of the jailer. 5:
/// snapshot devices belong to a caller's state directory and VM, named
/// by the helper; `ping` lists the Firecrackers it launches).
pub const HELPER_PROTOCOL: u32 = 5;

/// Where a system install puts the helper's socket.
pub const DEFAULT_HELPER_SOCKET: &str = "/run/banger/helper.sock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HelperRequest {
    /// Who the helper is and whether it accepts the caller.
    Ping,
    /// Gateway device, forwarding and the nftables table of one banger
    /// instance (its host objects are named by `instance`), for `subnet`.
    /// An instance belongs to the uid that set it up first.
    NetSetup {
        instance: String,
        subnet: String,
        dns_port: u16,
        /// The VMs' DNS domain, routed by systemd-resolved (default `vm`).
        #[serde(default = "default_domain")]
        domain: String,
        /// The file in the caller's state directory holding the instance's
        /// id; once it is gone (and no tap is held open) the instance is
        /// removed by the next setup of anyone's. Absent: never removed so.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<PathBuf>,
    },
    NetTeardown {
        instance: String,
    },
    /// A persistent tap (`bg<instance>t<N>`) the caller's VMMs may open.
    TapCreate {
        tap: String,
    },
    TapDelete {
        tap: String,
    },
    TapList {
        instance: String,
    },
    /// A /32 route to a guest of the tap's instance's subnet.
    Route {
        tap: String,
        guest: Ipv4Addr,
    },
    Unroute {
        instance: String,
        guest: Ipv4Addr,
    },
    SnapshotSupported,
    /// A device-mapper snapshot of `origin` under `cow`, both files the
    /// caller owns inside the helper's allowed directories, for VM `vm` of
    /// the caller's state directory `home`. The helper names the device
    /// (see [`snapshot_device_name`]) and records whose it is.
    SnapshotSetup {
        home: String,
        vm: String,
        origin: PathBuf,
        cow: PathBuf,
    },
    /// Removes the caller's own snapshot device of `home`/`vm`, if any.
    SnapshotTeardown {
        home: String,
        vm: String,
    },
    /// Launches Firecracker for the caller's VM through the jailer: the
    /// files exposed in a fresh jail, the process dropped to the caller's
    /// uid and gid, recorded as launched for that caller.
    JailLaunch(JailRequest),
    /// A signal to the jailed Firecracker the helper launched for this
    /// caller's VM; nothing else is ever signalled.
    JailSignal {
        home: String,
        vm: String,
        signal: i32,
    },
    /// Ends the caller's jailed VM if it still runs, and removes its jail:
    /// the chroot, its mounts and its cgroups.
    JailTeardown {
        home: String,
        vm: String,
    },
}

fn default_domain() -> String {
    "vm".into()
}

impl HelperRequest {
    /// The request's name, for logs.
    pub fn op(&self) -> &'static str {
        match self {
            HelperRequest::Ping => "ping",
            HelperRequest::NetSetup { .. } => "net_setup",
            HelperRequest::NetTeardown { .. } => "net_teardown",
            HelperRequest::TapCreate { .. } => "tap_create",
            HelperRequest::TapDelete { .. } => "tap_delete",
            HelperRequest::TapList { .. } => "tap_list",
            HelperRequest::Route { .. } => "route",
            HelperRequest::Unroute { .. } => "unroute",
            HelperRequest::SnapshotSupported => "snapshot_supported",
            HelperRequest::SnapshotSetup { .. } => "snapshot_setup",
            HelperRequest::SnapshotTeardown { .. } => "snapshot_teardown",
            HelperRequest::JailLaunch(_) => "jail_launch",
            HelperRequest::JailSignal { .. } => "jail_signal",
            HelperRequest::JailTeardown { .. } => "jail_teardown",
        }
    }
}

/// The reply to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelperReply {
    Ok(HelperValue),
    /// The request is outside the helper's policy; nothing was changed.
    Refused(String),
    /// The request was allowed but the operation failed.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelperValue {
    Done,
    Pong {
        protocol: u32,
        version: String,
        uid: u32,
        /// Where the caller's jails live, when the helper has a jailer.
        #[serde(default)]
        jails: Option<JailPlace>,
    },
    Taps(Vec<String>),
    Bool(bool),
    Device(PathBuf),
    /// A launched process: pid and start time (clock ticks since boot).
    Process {
        pid: u32,
        start_time: u64,
    },
}

/// The helper's jailer and where the caller's jails are: those of its state
/// directory with home id H have their roots at
/// `<base>/H/<firecracker's file name>/<vm>/root`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailPlace {
    pub jailer: PathBuf,
    pub base: PathBuf,
    /// The Firecracker binaries it launches; no other path is accepted.
    #[serde(default)]
    pub firecrackers: Vec<PathBuf>,
}

/// The device-mapper name of VM `vm` of state directory `home` of `uid`:
/// two users' (or two homes') VMs called `web` never share a device.
/// At most 7 + 10 + 1 + 16 + 1 + 63 = 98 bytes, inside dm's 127.
pub fn snapshot_device_name(uid: u32, home: &str, vm: &str) -> String {
    format!("banger-{uid}-{home}-{vm}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_by_op() {
        let r = HelperRequest::TapCreate {
            tap: "bg0a1b2ct1".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"op":"tap_create","tap":"bg0a1b2ct1"}"#);
        assert_eq!(serde_json::from_str::<HelperRequest>(&text).unwrap(), r);
        assert!(serde_json::from_str::<HelperRequest>(r#"{"op":"rm_rf","path":"/"}"#).is_err());
        let reply = HelperReply::Ok(HelperValue::Taps(vec!["bg0a1b2ct0".into()]));
        let text = serde_json::to_string(&reply).unwrap();
        assert_eq!(serde_json::from_str::<HelperReply>(&text).unwrap(), reply);
    }
}
