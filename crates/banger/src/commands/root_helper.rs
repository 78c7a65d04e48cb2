//! `banger root-helper`: resolves who it serves, builds its policy and serves.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use banger_helper::{Helper, Policy};
use banger_host::{RealBlockDevices, RealHostNetwork, RealLauncher, RealRunner};
use nix::unistd::{Group, User};

use crate::cli::RootHelperArgs;

pub fn run(args: RootHelperArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the root helper must run as root (it makes taps, NAT rules and loop devices)");
    }
    let owner = args.owner.as_deref().map(resolve_user).transpose()?;
    let group = args.group.as_deref().map(resolve_group).transpose()?;
    if owner.is_none() && group.is_none() {
        bail!("name who may use the helper: --owner USER and/or --group GROUP");
    }
    let mut allow_dirs = args.allow_dirs.clone();
    if allow_dirs.is_empty() {
        let Some(user) = owner else {
            bail!("with only --group, name the directories VMs live in with --allow-dir");
        };
        allow_dirs = default_dirs(user)?;
    }
    let policy = Policy::new(
        owner.map(|u| u.as_raw()),
        group,
        allow_dirs.clone(),
        &args.vmms,
    )
    .map_err(anyhow::Error::msg)?;
    let runner = Arc::new(RealRunner);
    let helper = Helper::new(
        policy,
        Arc::new(RealHostNetwork {
            runner: runner.clone(),
        }),
        Arc::new(RealBlockDevices { runner }),
        Arc::new(RealLauncher),
        args.state_dir.clone(),
    )
    .with_context(|| format!("preparing {}", args.state_dir.display()))?;
    let listener = banger_helper::server::bind(&args.socket, owner.map(|u| u.as_raw()), group)
        .with_context(|| format!("listening on {}", args.socket.display()))?;
    tracing::info!(
        socket = %args.socket.display(),
        owner = ?owner.map(|u| u.as_raw()),
        group = ?group,
        dirs = ?allow_dirs,
        "banger root helper listening"
    );
    banger_helper::server::serve(Arc::new(helper), listener)?;
    Ok(())
}

fn resolve_user(text: &str) -> anyhow::Result<nix::unistd::Uid> {
    if let Ok(uid) = text.parse::<u32>() {
        return Ok(uid.into());
    }
    match User::from_name(text)? {
        Some(u) => Ok(u.uid),
        None => bail!("no user named `{text}`"),
    }
}

fn resolve_group(text: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    match Group::from_name(text)? {
        Some(g) => Ok(g.gid.as_raw()),
        None => bail!("no group named `{text}`"),
    }
}

/// Where the owner's daemon keeps VMs and images by default.
fn default_dirs(uid: nix::unistd::Uid) -> anyhow::Result<Vec<PathBuf>> {
    let Some(user) = User::from_uid(uid)? else {
        bail!("uid {uid} has no passwd entry; name its directories with --allow-dir");
    };
    Ok(vec![
        user.dir.join(".local/state/banger"),
        user.dir.join(".cache/banger"),
    ])
}
