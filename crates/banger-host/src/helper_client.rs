//! The privileged traits, implemented by asking the root helper over its
//! socket: what an unprivileged daemon uses in production.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_proto::helper::{HelperReply, HelperRequest, HelperValue, JailPlace, HELPER_PROTOCOL};
use banger_proto::jail::JailRequest;

use crate::blockdev::{BlockDevices, SnapshotOwner};
use crate::net::{HostNetwork, Instance, NetSetup};
use crate::process::HostError;

#[derive(Debug, Clone)]
pub struct HelperClient {
    socket: PathBuf,
}

impl HelperClient {
    pub fn new(socket: impl Into<PathBuf>) -> HelperClient {
        HelperClient {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request on a fresh connection.
    pub fn call(&self, request: &HelperRequest) -> Result<HelperValue, HostError> {
        let unreachable = |e: std::io::Error| HostError::Helper {
            socket: self.socket.display().to_string(),
            error: e.to_string(),
        };
        let mut conn = UnixStream::connect(&self.socket).map_err(unreachable)?;
        // Loop and dm setup can take a while on a busy host.
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(unreachable)?;
        let mut line = serde_json::to_string(request).expect("requests serialise");
        line.push('\n');
        conn.write_all(line.as_bytes()).map_err(unreachable)?;
        let mut answer = String::new();
        BufReader::new(conn)
            .read_line(&mut answer)
            .map_err(unreachable)?;
        let reply: HelperReply = serde_json::from_str(&answer)
            .map_err(|e| unreachable(std::io::Error::other(format!("unreadable reply: {e}"))))?;
        match reply {
            HelperReply::Ok(value) => Ok(value),
            HelperReply::Refused(m) => Err(HostError::Refused(m)),
            HelperReply::Failed(m) => Err(HostError::Failed {
                command: format!("root helper {}", request.op()),
                status: "failed".into(),
                stderr: m,
            }),
        }
    }

    /// The helper's version (its protocol checked against ours).
    pub fn ping(&self) -> Result<String, HostError> {
        self.hello().map(|(version, _)| version)
    }

    /// The helper's version and its jailer, if it has one.
    pub fn hello(&self) -> Result<(String, Option<JailPlace>), HostError> {
        match self.call(&HelperRequest::Ping)? {
            HelperValue::Pong {
                protocol,
                version,
                jails,
                ..
            } if protocol == HELPER_PROTOCOL => Ok((version, jails)),
            HelperValue::Pong { protocol, .. } => Err(HostError::Refused(format!(
                "the root helper speaks protocol {protocol}, banger needs {HELPER_PROTOCOL}; \
                 restart it after upgrading (`banger system install`)"
            ))),
            other => Err(unexpected(other)),
        }
    }

    fn done(&self, request: HelperRequest) -> Result<(), HostError> {
        match self.call(&request)? {
            HelperValue::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// Jails through the helper, which launches as the caller's uid and signals
/// only what it launched for that caller.
#[derive(Debug, Clone)]
pub struct HelperJails {
    pub client: HelperClient,
    /// The chroot base of this state directory's jails.
    pub base: PathBuf,
    pub home: String,
}

impl crate::jail::Jails for HelperJails {
    fn base(&self) -> PathBuf {
        self.base.clone()
    }
    fn launch(&self, request: &JailRequest) -> Result<crate::ProcessId, HostError> {
        match self
            .client
            .call(&HelperRequest::JailLaunch(request.clone()))?
        {
            HelperValue::Process { pid, start_time } => Ok(crate::ProcessId { pid, start_time }),
            other => Err(unexpected(other)),
        }
    }
    fn signal(&self, vm: &str, signal: i32) -> Result<(), HostError> {
        self.client.done(HelperRequest::JailSignal {
            home: self.home.clone(),
            vm: vm.to_string(),
            signal,
        })
    }
    fn teardown(&self, vm: &str) -> Result<(), HostError> {
        self.client.done(HelperRequest::JailTeardown {
            home: self.home.clone(),
            vm: vm.to_string(),
        })
    }
}

fn unexpected(value: HelperValue) -> HostError {
    HostError::Refused(format!("unexpected reply from the root helper: {value:?}"))
}

impl HostNetwork for HelperClient {
    fn setup(&self, setup: &NetSetup) -> Result<(), HostError> {
        self.done(HelperRequest::NetSetup {
            instance: setup.instance.to_string(),
            subnet: setup.subnet.to_string(),
            dns_port: setup.dns_port,
            domain: setup.domain.clone(),
            owner: setup.owner.clone(),
        })
    }

    fn teardown(&self, instance: &Instance) -> Result<(), HostError> {
        self.done(HelperRequest::NetTeardown {
            instance: instance.to_string(),
        })
    }

    /// The helper makes the tap for whoever asks; `owner` is implied.
    fn create_tap(&self, tap: &str, _owner: u32) -> Result<(), HostError> {
        self.done(HelperRequest::TapCreate { tap: tap.into() })
    }

    fn delete_tap(&self, tap: &str) -> Result<(), HostError> {
        self.done(HelperRequest::TapDelete { tap: tap.into() })
    }

    /// The helper routes inside the subnet it set up for the tap's
    /// instance, whatever we pass.
    fn route(&self, tap: &str, guest: Ipv4Addr, _setup: &NetSetup) -> Result<(), HostError> {
        self.done(HelperRequest::Route {
            tap: tap.into(),
            guest,
        })
    }

    fn unroute(&self, instance: &Instance, guest: Ipv4Addr) -> Result<(), HostError> {
        self.done(HelperRequest::Unroute {
            instance: instance.to_string(),
            guest,
        })
    }

    fn taps(&self, instance: &Instance) -> Result<Vec<String>, HostError> {
        match self.call(&HelperRequest::TapList {
            instance: instance.to_string(),
        })? {
            HelperValue::Taps(taps) => Ok(taps),
            other => Err(unexpected(other)),
        }
    }
}

impl BlockDevices for HelperClient {
    fn snapshot_supported(&self) -> bool {
        matches!(
            self.call(&HelperRequest::SnapshotSupported),
            Ok(HelperValue::Bool(true))
        )
    }

    /// The helper records the loop devices in its own directory; `state` is
    /// not sent, nor the uid: the device is the caller's, whoever it says.
    fn setup_snapshot(
        &self,
        owner: &SnapshotOwner,
        origin: &Path,
        cow: &Path,
        _state: &Path,
    ) -> Result<PathBuf, HostError> {
        match self.call(&HelperRequest::SnapshotSetup {
            home: owner.home.clone(),
            vm: owner.vm.clone(),
            origin: origin.to_path_buf(),
            cow: cow.to_path_buf(),
        })? {
            HelperValue::Device(dev) => Ok(dev),
            other => Err(unexpected(other)),
        }
    }

    fn teardown_snapshot(&self, owner: &SnapshotOwner, _state: &Path) -> Result<(), HostError> {
        self.done(HelperRequest::SnapshotTeardown {
            home: owner.home.clone(),
            vm: owner.vm.clone(),
        })
    }
}
