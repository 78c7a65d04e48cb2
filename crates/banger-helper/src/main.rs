//! `banger-root-helper`: resolves who it serves, builds its policy and
//! serves on its socket. `banger system install` runs it as a system unit.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use banger_helper::{Helper, Policy};
use banger_host::{RealBlockDevices, RealHostNetwork, RealRunner};
use clap::Parser;
use nix::unistd::{Group, User};

/// banger's root helper: taps, NAT rules and device-mapper snapshots for
/// the banger daemons of the users it serves.
#[derive(Debug, Parser)]
#[command(name = "banger-root-helper", version)]
struct Args {
    /// The helper's socket.
    #[arg(long, default_value = banger_proto::helper::DEFAULT_HELPER_SOCKET)]
    socket: PathBuf,
    /// The user it serves (name or uid).
    #[arg(long)]
    owner: Option<String>,
    /// A group whose members may use it (name or gid).
    #[arg(long)]
    group: Option<String>,
    /// A directory callers' disks must be under (repeatable); default: the
    /// owner's banger state and cache directories.
    #[arg(long = "allow-dir")]
    allow_dirs: Vec<PathBuf>,
    /// Where it keeps what it set up.
    #[arg(long, default_value = "/run/banger/helper")]
    state_dir: PathBuf,
    /// Firecracker's jailer, which it runs for its callers' Firecracker VMs;
    /// default: `jailer` in /usr/local/bin or /usr/bin, if there.
    #[arg(long)]
    jailer: Option<PathBuf>,
    /// A Firecracker binary the jailer may run for callers (repeatable; it
    /// must be an executable owned and writable by root alone); default:
    /// `firecracker` in /usr/local/bin and /usr/bin, where trusted. No
    /// other file is ever copied into a jail.
    #[arg(long = "firecracker")]
    firecrackers: Vec<PathBuf>,
    /// The uids (each also a gid) jailed Firecrackers run as, one per VM:
    /// FIRST-LAST, holding no user or group of this host.
    #[arg(long, default_value = "1500000000-1500000999")]
    jail_uids: String,
    /// Where jails are made (root-owned; a directory per caller uid).
    #[arg(long, default_value = "/var/lib/banger/jail")]
    jail_dir: PathBuf,
}

/// The jailer to run: the one named (which must be trusted), else a
/// trusted one in the usual places, else none.
fn jail_setup(policy: &Policy, args: &Args) -> Result<Option<banger_helper::JailSetup>, String> {
    let jailer = match &args.jailer {
        Some(path) => Some(
            policy
                .trusted_binary(path)
                .map_err(|e| format!("--jailer: {e}"))?,
        ),
        None => ["/usr/local/bin/jailer", "/usr/bin/jailer"]
            .iter()
            .find_map(|p| policy.trusted_binary(std::path::Path::new(p)).ok()),
    };
    let Some(jailer) = jailer else {
        return Ok(None);
    };
    if !args.jail_dir.is_absolute() {
        return Err(format!(
            "--jail-dir {} is not absolute",
            args.jail_dir.display()
        ));
    }
    std::fs::create_dir_all(&args.jail_dir)
        .map_err(|e| format!("creating {}: {e}", args.jail_dir.display()))?;
    // Jails are made below it as root: nobody else may swap its entries.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(&args.jail_dir)
        .map_err(|e| format!("{}: {e}", args.jail_dir.display()))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "--jail-dir {} must be a directory owned by root and writable only by it",
            args.jail_dir.display()
        ));
    }
    let firecrackers = if args.firecrackers.is_empty() {
        ["/usr/local/bin/firecracker", "/usr/bin/firecracker"]
            .iter()
            .filter_map(|p| policy.trusted_binary(std::path::Path::new(p)).ok())
            .collect()
    } else {
        args.firecrackers
            .iter()
            .map(|p| {
                policy
                    .trusted_binary(p)
                    .map_err(|e| format!("--firecracker: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let ids = banger_host::jail_ids::JailIds::parse(&args.jail_uids)
        .and_then(|ids| ids.check_unused().map(|()| ids))
        .map_err(|e| format!("--jail-uids: {e}"))?;
    Ok(Some(banger_helper::JailSetup {
        jailer,
        dir: args.jail_dir.clone(),
        firecrackers,
        ids,
        ids_lock: banger_host::jail_ids::LOCK_FILE.into(),
    }))
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BANGER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("banger-root-helper: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "the root helper must run as root (it makes taps, NAT rules and loop devices)".into(),
        );
    }
    let owner = args.owner.as_deref().map(resolve_user).transpose()?;
    let group = args.group.as_deref().map(resolve_group).transpose()?;
    if owner.is_none() && group.is_none() {
        return Err("name who may use the helper: --owner USER and/or --group GROUP".into());
    }
    let mut allow_dirs = args.allow_dirs.clone();
    if allow_dirs.is_empty() {
        let Some(user) = owner else {
            return Err(
                "with only --group, name the directories VMs live in with --allow-dir".into(),
            );
        };
        allow_dirs = default_dirs(user)?;
    }
    let policy = Policy::new(owner.map(|u| u.as_raw()), group, allow_dirs.clone())?;
    let jail = jail_setup(&policy, &args)?;
    match &jail {
        Some(j) => {
            tracing::info!(jailer = %j.jailer.display(), dir = %j.dir.display(), firecrackers = ?j.firecrackers, "jailing Firecracker VMs")
        }
        None => tracing::info!("no jailer found: Firecracker VMs run unjailed as their user"),
    }
    let runner = Arc::new(RealRunner);
    let helper = Helper::new(
        policy,
        Arc::new(RealHostNetwork {
            runner: runner.clone(),
        }),
        Arc::new(RealBlockDevices { runner }),
        args.state_dir.clone(),
        jail,
    )
    .map_err(|e| format!("preparing {}: {e}", args.state_dir.display()))?;
    let listener = banger_helper::server::bind(&args.socket, owner.map(|u| u.as_raw()), group)
        .map_err(|e| format!("listening on {}: {e}", args.socket.display()))?;
    tracing::info!(
        socket = %args.socket.display(),
        owner = ?owner.map(|u| u.as_raw()),
        group = ?group,
        dirs = ?allow_dirs,
        "banger root helper listening"
    );
    banger_helper::server::serve(Arc::new(helper), listener).map_err(|e| e.to_string())
}

fn resolve_user(text: &str) -> Result<nix::unistd::Uid, String> {
    if let Ok(uid) = text.parse::<u32>() {
        return Ok(uid.into());
    }
    match User::from_name(text).map_err(|e| e.to_string())? {
        Some(u) => Ok(u.uid),
        None => Err(format!("no user named `{text}`")),
    }
}

fn resolve_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    match Group::from_name(text).map_err(|e| e.to_string())? {
        Some(g) => Ok(g.gid.as_raw()),
        None => Err(format!("no group named `{text}`")),
    }
}

/// Where the owner's daemon keeps VMs and images by default.
fn default_dirs(uid: nix::unistd::Uid) -> Result<Vec<PathBuf>, String> {
    let Some(user) = User::from_uid(uid).map_err(|e| e.to_string())? else {
        return Err(format!(
            "uid {uid} has no passwd entry; name its directories with --allow-dir"
        ));
    };
    Ok(vec![
        user.dir.join(".local/state/banger"),
        user.dir.join(".cache/banger"),
    ])
}
