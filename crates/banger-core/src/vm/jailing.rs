//! Whether Firecracker VMs run through the jailer, and whose jails: the
//! daemon's own when it is root, the root helper's otherwise.

use std::sync::Arc;

use banger_host::jail_ids::{IdsError, JailIds, DEFAULT_JAIL_IDS};
use banger_host::{HelperClient, HelperJails, Jails, RealJails};
use banger_proto::helper::JailPlace;

use crate::config::Config;
use crate::paths::Paths;

#[derive(Clone, Default)]
pub enum JailChoice {
    /// Firecracker runs as a plain process of the daemon.
    #[default]
    Off,
    /// Through these jails.
    On(Arc<dyn Jails>),
    /// Asked for (`firecracker.jailer = true`) but not possible here: why.
    Missing(String),
}

/// The configured jail uid range, checked to hold no user or group.
pub fn jail_ids(config: &Config) -> Result<JailIds, IdsError> {
    let ids = match &config.firecracker.jail_uids {
        Some(text) => JailIds::parse(text)?,
        None => DEFAULT_JAIL_IDS,
    };
    ids.check_unused()?;
    Ok(ids)
}

impl JailChoice {
    /// A root daemon runs the jailer itself, with jails in its state.
    pub fn in_process(config: &Config, paths: &Paths) -> JailChoice {
        let wanted = config.firecracker.jailer;
        if wanted == Some(false) {
            return JailChoice::Off;
        }
        let ids = match jail_ids(config) {
            Ok(ids) => ids,
            Err(e) if wanted == Some(true) => return JailChoice::Missing(e.to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "Firecracker runs unjailed");
                return JailChoice::Off;
            }
        };
        match config.jailer_binary() {
            Some(jailer) => JailChoice::On(Arc::new(RealJails {
                jailer,
                base: paths.state_dir.join("jail"),
                records: paths.state_dir.join("jail-records"),
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                cgroup_parent: format!("banger-{}", banger_proto::jail::home_id(&paths.state_dir)),
                ids,
                ids_lock: banger_host::jail_ids::LOCK_FILE.into(),
            })),
            None if wanted == Some(true) => JailChoice::Missing(
                "firecracker.jailer is on, but no `jailer` binary was found (install it on \
                 PATH, or set firecracker.jailer_binary or BANGER_JAILER_BIN)"
                    .into(),
            ),
            None => JailChoice::Off,
        }
    }

    /// A user's daemon asks the root helper, which runs its own jailer.
    pub fn through_helper(
        config: &Config,
        paths: &Paths,
        helper: &HelperClient,
        place: Option<JailPlace>,
    ) -> JailChoice {
        let wanted = config.firecracker.jailer;
        match (wanted, place) {
            (Some(false), _) => JailChoice::Off,
            (_, Some(place)) => {
                let home = banger_proto::jail::home_id(&paths.state_dir);
                JailChoice::On(Arc::new(HelperJails {
                    client: helper.clone(),
                    base: place.base.join(&home),
                    home,
                }))
            }
            (Some(true), None) => JailChoice::Missing(
                "firecracker.jailer is on, but the root helper has no jailer: install one as \
                 /usr/local/bin/jailer (root-owned) and restart the helper \
                 (`sudo banger system install`), or run the daemon as root"
                    .into(),
            ),
            (None, None) => JailChoice::Off,
        }
    }

    pub fn jails(&self) -> Option<Arc<dyn Jails>> {
        match self {
            JailChoice::On(j) => Some(j.clone()),
            _ => None,
        }
    }

    /// What `doctor` and the daemon's log say of it.
    pub fn describe(&self) -> String {
        match self {
            JailChoice::Off => "off: Firecracker runs as the daemon's user, unjailed".into(),
            JailChoice::On(j) => format!("on: jails under {}", j.base().display()),
            JailChoice::Missing(why) => format!("unavailable: {why}"),
        }
    }
}
