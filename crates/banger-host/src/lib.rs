//! Host side effects behind traits. Each trait has a real implementation and a
//! recording fake, so the operations core can be tested without touching the host.

pub mod acl;
pub mod blockdev;
pub mod helper_client;
pub mod jail;
pub mod jail_ids;
pub mod net;
pub mod net_orphans;
pub mod process;
pub mod tap_owner;
pub mod vmm_process;

pub use blockdev::{BlockCall, BlockDevices, FakeBlockDevices, RealBlockDevices, SnapshotOwner};
pub use helper_client::{HelperClient, HelperJails};
pub use jail::{Cgroups, FakeJails, JailCall, Jails, RealJails};
pub use net::{
    FakeHostNetwork, HostNetwork, HostRoute, Instance, NetCall, NetSetup, RealHostNetwork, Subnet,
};
pub use process::{CommandSpec, FakeRunner, HostError, Output, ProcessRunner, RealRunner};
pub use vmm_process::{
    FakeLauncher, LaunchSpec, LauncherCall, ProcessId, ProcessLauncher, RealLauncher,
};
