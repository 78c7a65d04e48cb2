//! The VM service, one part per concern:
//!
//! - [`registry`]: records, liveness, locks, backends, what `vm ls` shows;
//!   the one place that answers "is this VM running".
//! - [`sessions`]: SSH sessions with the guests' agents.
//! - [`lifecycle`] and `boot`: create, start (in phases), stop, rm, recovery.
//! - [`guest_io`]: exec, logs and port forwards for a caller.
//! - [`upkeep`]: what runs for the daemon's life (user keys, console caps).
//! - [`error`]: what can be wrong with a named VM, as wire error codes.
//!
//! Durable records live in `vms`; the VMM's pid and start time in
//! `vm_runtime`, trusted only while that very process lives.

mod boot;
mod boot_log;
pub mod error;
pub mod guest_io;
pub mod lifecycle;
pub mod registry;
mod resize;
pub mod sessions;
pub mod snapshots;
mod stats;
pub mod templates;
pub mod upkeep;

use std::sync::Arc;

use banger_host::{BlockDevices, ProcessLauncher, ProcessRunner};

use crate::config::Config;
use crate::paths::Paths;
use crate::services::images::ImageService;
use crate::services::kernels::KernelService;
use crate::services::network::NetworkService;
use crate::services::workspace::WorkspaceService;
use crate::store::Store;

pub use guest_io::GuestIo;
pub use lifecycle::VmLifecycle;
pub use registry::{VmRegistry, WORK_MOUNT};
pub use sessions::AgentSessions;
pub use upkeep::Upkeep;

/// What the VM parts are built from.
pub struct VmDeps {
    pub paths: Paths,
    pub config: Config,
    pub store: Arc<Store>,
    pub runner: Arc<dyn ProcessRunner>,
    pub launcher: Arc<dyn ProcessLauncher>,
    pub blockdevs: Arc<dyn BlockDevices>,
    pub jails: Option<Arc<dyn banger_host::Jails>>,
    pub images: Arc<ImageService>,
    pub kernels: Arc<KernelService>,
    pub network: Arc<NetworkService>,
    pub vmms: Arc<dyn crate::vm::vmm::VmmProvider>,
}

/// The VM parts, wired to one registry and one session cache.
pub struct Vms {
    pub lifecycle: Arc<VmLifecycle>,
    pub guest: Arc<GuestIo>,
    pub upkeep: Arc<Upkeep>,
    pub workspaces: Arc<WorkspaceService>,
}

impl Vms {
    pub fn new(deps: VmDeps) -> Vms {
        let registry = Arc::new(
            VmRegistry::new(
                deps.paths,
                deps.config,
                deps.store,
                deps.launcher,
                deps.blockdevs,
                deps.network,
                deps.vmms,
            )
            .with_jails(deps.jails),
        );
        let sessions = Arc::new(AgentSessions::new(registry.clone()));
        let workspaces = Arc::new(
            WorkspaceService::new(
                registry.store.clone(),
                sessions.clone(),
                deps.runner.clone(),
                registry.paths.state_dir.clone(),
            )
            .with_min_free(registry.config.limits.min_free()),
        );
        Vms {
            lifecycle: Arc::new(VmLifecycle::new(
                registry.clone(),
                sessions.clone(),
                deps.images.clone(),
                deps.kernels,
                deps.runner.clone(),
                workspaces.clone(),
            )),
            guest: Arc::new(GuestIo::new(
                registry.clone(),
                sessions.clone(),
                deps.images,
                workspaces.clone(),
            )),
            upkeep: Arc::new(Upkeep::new(registry, sessions, deps.runner)),
            workspaces,
        }
    }
}
