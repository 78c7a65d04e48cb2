//! `banger system install|uninstall`: the root helper as a system service,
//! the daemon as the user's service, and the group that may use the helper.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use banger_host::{CommandSpec, ProcessRunner, RealRunner};

use crate::cli::{SystemCommand, SystemInstallArgs, SystemUninstallArgs};
use crate::units::{Install, BINARIES, DAEMON_UNIT, GROUP, HELPER_UNIT};

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
    let install = Install {
        root: root.clone(),
        user: user.clone(),
        home,
    };
    let runner = RealRunner;
    let mut done = Vec::new();

    for (rel, built) in BINARIES {
        let binary = install.path(rel);
        copy_binary(built, &binary)?;
        done.push(format!("installed {}", binary.display()));
    }
    if group_members(&root, GROUP)?.is_none() {
        runner.run(&prefixed("groupadd", &root).args(["--system", GROUP]))?;
        done.push(format!("created group {GROUP}"));
    }
    if !group_members(&root, GROUP)?
        .unwrap_or_default()
        .contains(&user)
    {
        runner.run(&prefixed("usermod", &root).args(["-a", "-G", GROUP, &user]))?;
        done.push(format!("added {user} to group {GROUP}"));
    }
    for (rel, text) in [
        (HELPER_UNIT, install.helper_unit()),
        (DAEMON_UNIT, install.daemon_unit()),
    ] {
        let path = install.path(rel);
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
        println!(
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
        println!("{line}");
    }
    if !started {
        println!(
            "the helper is not started (systemd is not running here, or --no-start); run it with:\n  {}",
            exec_line(&install.helper_unit())
        );
    }
    println!(
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
    for rel in [HELPER_UNIT, DAEMON_UNIT]
        .into_iter()
        .chain(BINARIES.map(|(rel, _)| rel))
    {
        let path = root.join(rel);
        match std::fs::remove_file(&path) {
            Ok(()) => done.push(format!("removed {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    if live(&root) {
        let _ = runner.run(&CommandSpec::new("systemctl").arg("daemon-reload"));
    }
    if group_members(&root, GROUP)?.is_some() {
        runner.run(&prefixed("groupdel", &root).arg(GROUP))?;
        done.push(format!("removed group {GROUP}"));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "done": done }))?
        );
    } else if done.is_empty() {
        println!("nothing to remove: banger is not installed as a system service");
    } else {
        for line in &done {
            println!("{line}");
        }
        println!("VMs, images and settings in users' homes are kept; a running user daemon stops with `systemctl --user stop banger`");
    }
    Ok(0)
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

/// Installs the binary built as `built` (found beside this one) at `dest`.
fn copy_binary(built: &str, dest: &Path) -> anyhow::Result<()> {
    let exe = Install::source(built).context("finding this binary")?;
    if exe.canonicalize().ok() == dest.canonicalize().ok() {
        return Ok(()); // Already running the installed copy.
    }
    if !exe.is_file() {
        bail!(
            "{built} was not found next to banger ({}); install banger's whole build              (`cargo build --release` makes both)",
            exe.display()
        );
    }
    let bytes = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
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
