//! `banger system install|uninstall`: the root helper as a system service,
//! the daemon as the user's service, and the group that may use the helper.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use banger_host::{CommandSpec, ProcessRunner, RealRunner};

use crate::cli::{SystemCommand, SystemInstallArgs, SystemUninstallArgs};
use crate::install_manifest::Manifest;
use crate::units::{Install, COPY_PREFIX, DAEMON_UNIT, GROUP, HELPER_UNIT};

pub fn run(cmd: SystemCommand) -> anyhow::Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`banger system` changes system files; run it with sudo");
    }
    match cmd {
        SystemCommand::Install(args) => install(args),
        SystemCommand::Uninstall(args) => uninstall(args),
    }
}

/// Whether we act on this machine's live system (so systemctl applies).
fn live(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

/// `--prefix DIR` for the shadow tools when installing into a scratch root.
fn prefixed(program: &str, root: &Path) -> CommandSpec {
    let spec = CommandSpec::new(program);
    if root == Path::new("/") {
        spec
    } else {
        spec.arg("--prefix").arg(root)
    }
}

fn install(args: SystemInstallArgs) -> anyhow::Result<i32> {
    let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let user = match args
        .user
        .clone()
        .or_else(|| std::env::var("SUDO_USER").ok())
    {
        Some(u) => u,
        None => bail!("name the user who runs banger: `sudo banger system install --user NAME`"),
    };
    if user == "root" {
        bail!("the daemon must not run as root in a system install; name an ordinary user with --user");
    }
    let Some(home) = passwd_home(&root, &user)? else {
        bail!(
            "no user named `{user}` in {}",
            root.join("etc/passwd").display()
        );
    };
    // A banger running from an install (the package's /usr, or
    // `scripts/install`'s /usr/local) is used where it is; any other (a
    // build, `cargo install`) is copied, root-owned, under /usr/local.
    let in_place = Install::running_prefix(&root);
    let install = Install {
        root: root.clone(),
        user: user.clone(),
        home,
        prefix: in_place.unwrap_or(COPY_PREFIX).to_string(),
    };
    let runner = RealRunner;
    let mut done = Vec::new();
    let mut manifest = Manifest::load(&root)?.unwrap_or_default();

    if in_place.is_none() {
        for (rel, built) in install.binaries() {
            let binary = install.path(&rel);
            let source =
                Install::source(built).with_context(|| format!("finding {built} to install"))?;
            if source.canonicalize().ok() == binary.canonicalize().ok() {
                continue; // Already running the installed copy.
            }
            manifest.note_file(&root, &rel);
            manifest.save(&root)?;
            copy_binary(built, &source, &binary)?;
            done.push(format!("installed {}", binary.display()));
        }
    }
    if group_members(&root, GROUP)?.is_none() {
        manifest.group_created = true;
        manifest.save(&root)?;
        runner.run(&prefixed("groupadd", &root).args(["--system", GROUP]))?;
        done.push(format!("created group {GROUP}"));
    }
    if !group_members(&root, GROUP)?
        .unwrap_or_default()
        .contains(&user)
    {
        if !manifest.group_created {
            manifest.added_to_group = Some(user.clone());
            manifest.save(&root)?;
        }
        runner.run(&prefixed("usermod", &root).args(["-a", "-G", GROUP, &user]))?;
        done.push(format!("added {user} to group {GROUP}"));
    }
    for (rel, text) in [
        (HELPER_UNIT, install.helper_unit()),
        (DAEMON_UNIT, install.daemon_unit()),
    ] {
        let path = install.path(rel);
        manifest.note_file(&root, rel);
        manifest.save(&root)?;
        write_root_file(&path, &text, 0o644)?;
        done.push(format!("wrote {}", path.display()));
    }
    let started = if args.no_start || !live(&root) {
        false
    } else {
        runner.run(&CommandSpec::new("systemctl").arg("daemon-reload"))?;
        runner.run(&CommandSpec::new("systemctl").args(["enable", "banger-helper.service"]))?;
        // A restart picks up a changed unit or binary.
        runner.run(&CommandSpec::new("systemctl").args(["restart", "banger-helper.service"]))?;
        done.push("started banger-helper.service".into());
        true
    };
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "user": user,
                "done": done,
                "helper_started": started,
            }))?
        );
        return Ok(0);
    }
    for line in &done {
        outln!("{line}");
    }
    if !started {
        outln!(
            "the helper is not started (systemd is not running here, or --no-start); run it with:\n  {}",
            exec_line(&install.helper_unit())
        );
    }
    outln!(
        "next, as {user}: `systemctl --user daemon-reload && systemctl --user enable --now banger` \
         (log in again first so the `{GROUP}` group applies)"
    );
    Ok(0)
}

fn uninstall(args: SystemUninstallArgs) -> anyhow::Result<i32> {
    let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let runner = RealRunner;
    let mut done = Vec::new();
    if live(&root) {
        let _ = runner.run(&CommandSpec::new("systemctl").args([
            "disable",
            "--now",
            "banger-helper.service",
        ]));
    }
    // An install from before manifests wrote these, and nothing else.
    let legacy = || Manifest {
        files: [
            HELPER_UNIT,
            DAEMON_UNIT,
            "usr/local/bin/banger",
            "usr/local/bin/banger-root-helper",
        ]
        .map(String::from)
        .into(),
        group_created: true,
        ..Manifest::default()
    };
    let manifest = match Manifest::load(&root)? {
        Some(m) => m,
        None if Install::present(&root) => legacy(),
        None => Manifest::default(),
    };
    // The helper makes its jail directory when it first runs: left with no
    // jail in it (the helper removes them), it goes too.
    let jails = root.join("var/lib/banger/jail");
    if jails.is_dir() && remove_empty_tree(&jails) {
        done.push(format!("removed {}", jails.display()));
    }
    done.extend(manifest.remove_files(&root)?);
    if live(&root) {
        let _ = runner.run(&CommandSpec::new("systemctl").arg("daemon-reload"));
    }
    let members = group_members(&root, GROUP)?;
    if manifest.group_created && members.is_some() {
        runner.run(&prefixed("groupdel", &root).arg(GROUP))?;
        done.push(format!("removed group {GROUP}"));
    } else if let Some(user) = &manifest.added_to_group {
        if members.unwrap_or_default().contains(user) {
            runner.run(&prefixed("usermod", &root).args(["-r", "-G", GROUP, user]))?;
            done.push(format!("removed {user} from group {GROUP}"));
        }
    }
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "done": done }))?
        );
    } else if done.is_empty() {
        outln!("nothing to remove: banger is not installed as a system service");
    } else {
        for line in &done {
            outln!("{line}");
        }
        outln!("VMs, images and settings in users' homes are kept; a running user daemon stops with `systemctl --user stop banger`");
    }
    Ok(0)
}

/// Removes `dir` if it holds nothing but empty directories; whether it did.
fn remove_empty_tree(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut empty = true;
    for entry in entries.flatten() {
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        empty &= is_dir && remove_empty_tree(&entry.path());
    }
    empty && std::fs::remove_dir(dir).is_ok()
}

/// The `ExecStart=` command of a unit, for starting it by hand.
fn exec_line(unit: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_default()
        .to_string()
}

pub fn passwd_home(root: &Path, user: &str) -> anyhow::Result<Option<PathBuf>> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd"))
        .with_context(|| format!("reading {}", root.join("etc/passwd").display()))?;
    Ok(passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[0] == user).then(|| PathBuf::from(f[5]))
    }))
}

/// The group's members, or `None` when there is no such group.
pub fn group_members(root: &Path, group: &str) -> anyhow::Result<Option<Vec<String>>> {
    let text = std::fs::read_to_string(root.join("etc/group"))
        .with_context(|| format!("reading {}", root.join("etc/group").display()))?;
    Ok(text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == group).then(|| {
            f[3].split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect()
        })
    }))
}

/// Installs `source` (the binary built as `built`) at `dest`.
fn copy_binary(built: &str, source: &Path, dest: &Path) -> anyhow::Result<()> {
    if !source.is_file() {
        bail!(
            "{built} was not found ({}); install banger's whole build: `scripts/install`, \
             or `cargo build --release -p banger -p banger-helper` and `scripts/build-agent`",
            source.display()
        );
    }
    let bytes = std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    write_root_file(dest, &bytes, 0o755)
}

/// Written whole (temp file then rename), root-owned, with `mode`.
fn write_root_file(path: &Path, contents: impl AsRef<[u8]>, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("a file path")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("banger-tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    nix::unistd::chown(&tmp, Some(0.into()), Some(0.into()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
