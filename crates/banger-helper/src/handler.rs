//! One request in, one reply out: the policy first, then the host operation
//! through the same traits a root daemon uses in-process.

use std::path::PathBuf;
use std::sync::Arc;

use banger_host::net::{check_guest, check_tap};
use banger_host::{BlockDevices, HostError, HostNetwork, Instance, NetSetup};
use banger_proto::helper::{HelperReply, HelperRequest, HelperValue, HELPER_PROTOCOL};

use crate::networks::Networks;
use crate::policy::{Caller, Policy, Refusal};

pub struct Helper {
    pub policy: Policy,
    net: Arc<dyn HostNetwork>,
    blocks: Arc<dyn BlockDevices>,
    state_dir: PathBuf,
    /// The network instances set up, each for one uid.
    networks: Networks,
}

enum Failure {
    Refused(String),
    Failed(String),
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Failure::Refused(r.0)
    }
}

impl From<HostError> for Failure {
    fn from(e: HostError) -> Self {
        match e {
            HostError::Refused(m) => Failure::Refused(m),
            other => Failure::Failed(other.to_string()),
        }
    }
}

type Handled = Result<HelperValue, Failure>;

impl Helper {
    pub fn new(
        policy: Policy,
        net: Arc<dyn HostNetwork>,
        blocks: Arc<dyn BlockDevices>,
        state_dir: PathBuf,
    ) -> std::io::Result<Helper> {
        std::fs::create_dir_all(state_dir.join("dm"))?;
        let networks = Networks::load(&state_dir.join("networks.json"));
        Ok(Helper {
            policy,
            net,
            blocks,
            state_dir,
            networks,
        })
    }

    pub fn handle(&self, caller: &Caller, request: HelperRequest) -> HelperReply {
        match self.dispatch(caller, request) {
            Ok(value) => HelperReply::Ok(value),
            Err(Failure::Refused(m)) => HelperReply::Refused(m),
            Err(Failure::Failed(m)) => HelperReply::Failed(m),
        }
    }

    fn dispatch(&self, caller: &Caller, request: HelperRequest) -> Handled {
        use HelperRequest as R;
        match request {
            R::Ping => Ok(HelperValue::Pong {
                protocol: HELPER_PROTOCOL,
                version: env!("CARGO_PKG_VERSION").into(),
                uid: caller.uid,
            }),
            R::NetSetup {
                instance,
                subnet,
                dns_port,
                domain,
            } => {
                if !banger_host::net::is_domain(&domain) {
                    return Err(Failure::Refused(format!(
                        "`{domain}` is not a DNS label (like `vm`)"
                    )));
                }
                let setup = NetSetup {
                    instance: instance_of(&instance)?,
                    subnet: self.policy.subnet(&subnet)?,
                    dns_port: self.policy.dns_port(dns_port)?,
                    domain,
                };
                self.networks.set_up(caller, &setup, || {
                    self.net.setup(&setup).map_err(Failure::from)
                })?;
                Ok(HelperValue::Done)
            }
            R::NetTeardown { instance } => {
                let instance = instance_of(&instance)?;
                if !self.networks.known(&instance) {
                    return Ok(HelperValue::Done); // Nothing of it was made here.
                }
                self.networks.owned(caller, &instance)?;
                self.net.teardown(&instance)?;
                self.networks.forget(&instance);
                Ok(HelperValue::Done)
            }
            R::TapCreate { tap } => {
                self.networks.owned(caller, &check_tap(&tap)?)?;
                // The tap belongs to whoever asked, whatever they might claim.
                self.net.create_tap(&tap, caller.uid)?;
                Ok(HelperValue::Done)
            }
            R::TapDelete { tap } => {
                self.networks.owned(caller, &check_tap(&tap)?)?;
                self.net.delete_tap(&tap)?;
                Ok(HelperValue::Done)
            }
            R::TapList { instance } => {
                let instance = instance_of(&instance)?;
                self.networks.owned(caller, &instance)?;
                Ok(HelperValue::Taps(self.net.taps(&instance)?))
            }
            R::Route { tap, guest } => {
                let setup = self.networks.owned(caller, &check_tap(&tap)?)?;
                self.net.route(&tap, guest, &setup)?;
                Ok(HelperValue::Done)
            }
            R::Unroute { instance, guest } => {
                let setup = self.networks.owned(caller, &instance_of(&instance)?)?;
                check_guest(guest, &setup)?;
                self.net.unroute(&setup.instance, guest)?;
                Ok(HelperValue::Done)
            }
            R::SnapshotSupported => Ok(HelperValue::Bool(self.blocks.snapshot_supported())),
            R::SnapshotSetup { vm, origin, cow } => {
                let name = self.policy.dm_name(&vm)?;
                // Held open and handed to losetup by descriptor: what was
                // checked is what gets attached.
                let origin = self.policy.caller_file(caller, &origin, false)?;
                let cow = self.policy.caller_file(caller, &cow, true)?;
                let by_fd = |f: &std::fs::File| {
                    use std::os::fd::AsRawFd;
                    PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()))
                };
                let device = self.blocks.setup_snapshot(
                    &name,
                    &by_fd(&origin),
                    &by_fd(&cow),
                    &self.dm_state(&name),
                )?;
                Ok(HelperValue::Device(device))
            }
            R::SnapshotTeardown { vm } => {
                let name = self.policy.dm_name(&vm)?;
                self.blocks
                    .teardown_snapshot(&name, &self.dm_state(&name))?;
                Ok(HelperValue::Done)
            }
        }
    }

    /// Where the loop devices of a snapshot are recorded: the helper's own
    /// directory, never one a caller can write.
    fn dm_state(&self, name: &str) -> PathBuf {
        self.state_dir.join("dm").join(format!("{name}.state"))
    }
}

fn instance_of(id: &str) -> Result<Instance, Failure> {
    Instance::parse(id).map_err(Failure::Refused)
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
