//! `banger doctor`: one line per check, a hint naming the fix, non-zero exit
//! when any check fails.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use banger_core::paths::Paths;
use banger_proto::human_bytes;
use banger_proto::rpc::{m, NoParams};
use banger_proto::status::DaemonStatus;
use serde::Serialize;

use crate::client::{call_on, Client};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn check(
    name: &'static str,
    status: Status,
    message: impl Into<String>,
    hint: Option<&str>,
) -> Check {
    Check {
        name,
        status,
        message: message.into(),
        hint: hint.map(str::to_owned),
    }
}

pub fn run(paths: &Paths, json: bool) -> anyhow::Result<i32> {
    // Asked once; the checks that read it take it from here.
    let status = daemon_status(paths);
    // What the daemon reads at its start: the config file and the
    // environment's overrides.
    let loaded = banger_core::config::Config::load_with_env(&paths.config_file());
    let config_check = config_file(paths, &loaded);
    let config = loaded.unwrap_or_default();
    let checks = vec![
        config_check,
        daemon(paths),
        writable("state-dir", &paths.state_dir),
        writable("cache-dir", &paths.cache_dir),
        socket(paths),
        mkfs(),
        debugfs(),
        disk_space(paths),
        qemu(),
        firecracker(&config),
        kvm(paths, &config),
        kernel(paths),
        vms(paths),
        snapshots(paths),
        agent(&config),
        root_mode(paths),
        network(status.as_ref()),
        dns(status.as_ref()),
        helper(status.as_ref(), &config),
        jailer(status.as_ref(), &config),
        jail_uids(&config),
        install(),
    ];
    if json {
        outln!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            let hint = c
                .hint
                .as_deref()
                .map(|h| format!(" — {h}"))
                .unwrap_or_default();
            outln!("{tag}  {:<10} {}{hint}", c.name, c.message);
        }
    }
    Ok(if checks.iter().any(|c| c.status == Status::Fail) {
        1
    } else {
        0
    })
}

fn daemon(paths: &Paths) -> Check {
    let client = Client::new(paths.clone());
    let Ok(stream) = client.connect_existing() else {
        return check(
            "daemon",
            Status::Warn,
            format!("not running on {}", paths.socket().display()),
            Some("it starts on demand with any banger command, or run `banger daemon`"),
        );
    };
    match call_on::<m::DaemonStatus>(stream, NoParams {}, |_| {}) {
        Ok(s) => match s {
            s if s.version == env!("CARGO_PKG_VERSION") => check(
                "daemon",
                Status::Ok,
                format!("reachable (pid {}, version {})", s.pid, s.version),
                None,
            ),
            s => check(
                "daemon",
                Status::Fail,
                format!(
                    "daemon is version {}, this CLI is {}",
                    s.version,
                    env!("CARGO_PKG_VERSION")
                ),
                Some(&format!(
                    "restart it: `kill {}`; the next banger command starts the new one",
                    s.pid
                )),
            ),
        },
        Err(e) => check(
            "daemon",
            Status::Fail,
            format!("not answering: {e}"),
            Some("restart it with `banger daemon`"),
        ),
    }
}

fn writable(name: &'static str, dir: &Path) -> Check {
    let probe = dir.join(format!(".doctor-{}", std::process::id()));
    let result = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&probe, b""))
        .and_then(|_| std::fs::remove_file(&probe));
    match result {
        Ok(()) => check(
            name,
            Status::Ok,
            format!("{} is writable", dir.display()),
            None,
        ),
        Err(e) => check(
            name,
            Status::Fail,
            format!("{} is not writable: {e}", dir.display()),
            Some("fix its ownership, or set BANGER_HOME to a directory you own"),
        ),
    }
}

fn socket(paths: &Paths) -> Check {
    let path = paths.socket();
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return check(
            "socket",
            Status::Ok,
            format!("{} not present (no daemon yet)", path.display()),
            None,
        );
    };
    let mode = meta.permissions().mode() & 0o777;
    let me = nix::unistd::geteuid().as_raw();
    // Root may look at a user's daemon; anyone else must own the socket.
    if mode & 0o077 != 0 || (meta.uid() != me && me != 0) {
        return check(
            "socket",
            Status::Fail,
            format!(
                "{} has mode {mode:o} and owner uid {}",
                path.display(),
                meta.uid()
            ),
            Some("stop the daemon and remove the socket; banger recreates it with mode 600"),
        );
    }
    check(
        "socket",
        Status::Ok,
        format!(
            "{} mode {mode:o}, owned by uid {}",
            path.display(),
            meta.uid()
        ),
        None,
    )
}

/// `mkfs.ext4 -d` (populate from a directory) appeared in e2fsprogs 1.43.
fn mkfs() -> Check {
    let hint = Some("install e2fsprogs ≥ 1.43: `sudo apt-get install e2fsprogs`");
    let out = match std::process::Command::new("mkfs.ext4").arg("-V").output() {
        Ok(o) => o,
        Err(_) => return check("mkfs.ext4", Status::Fail, "not found", hint),
    };
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(1).unwrap_or("").to_string();
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    if parts.len() >= 2 && (parts[0], parts[1]) >= (1, 43) {
        check(
            "mkfs.ext4",
            Status::Ok,
            format!("e2fsprogs {version}"),
            None,
        )
    } else {
        check(
            "mkfs.ext4",
            Status::Fail,
            format!("unusable version `{version}`"),
            hint,
        )
    }
}

fn debugfs() -> Check {
    match std::process::Command::new("debugfs").arg("-V").output() {
        Ok(_) => check("debugfs", Status::Ok, "found", None),
        Err(_) => check(
            "debugfs",
            Status::Fail,
            "not found",
            Some("`sudo apt-get install e2fsprogs`"),
        ),
    }
}

fn disk_space(paths: &Paths) -> Check {
    let mut worst: Option<(u64, String)> = None;
    for dir in [&paths.state_dir, &paths.cache_dir] {
        let probe = if dir.exists() {
            dir.as_path()
        } else {
            dir.parent().unwrap_or(Path::new("/"))
        };
        if let Ok(s) = nix::sys::statvfs::statvfs(probe) {
            let free = s.blocks_available() * s.fragment_size();
            if worst.as_ref().is_none_or(|(f, _)| free < *f) {
                worst = Some((free, dir.display().to_string()));
            }
        }
    }
    let Some((free, dir)) = worst else {
        return check("disk", Status::Warn, "could not measure free space", None);
    };
    const GIB: u64 = 1024 * 1024 * 1024;
    let msg = format!("{} free under {dir}", human_bytes(free));
    let hint = Some("free space, or run `banger image cache prune`");
    if free < GIB {
        check("disk", Status::Fail, msg, hint)
    } else if free < 5 * GIB {
        check("disk", Status::Warn, msg, hint)
    } else {
        check("disk", Status::Ok, msg, None)
    }
}

/// Firecracker, which only `--vmm firecracker` needs: there or not.
fn firecracker(config: &banger_core::config::Config) -> Check {
    let binary = config.firecracker();
    match banger_core::vm::firecracker::find_binary(&binary) {
        Some(path) => {
            let version = std::process::Command::new(&path)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|t| t.lines().next().map(str::to_string))
                .unwrap_or_default();
            check(
                "firecracker",
                Status::Ok,
                format!("{} {}", path.display(), version.trim()),
                None,
            )
        }
        None => check(
            "firecracker",
            Status::Warn,
            format!("`{binary}` not found: VMs use QEMU; `--vmm firecracker` is refused"),
            Some("install Firecracker (docs/vms.md, \"Getting Firecracker\") or set firecracker.binary"),
        ),
    }
}

fn qemu() -> Check {
    match std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let version = text
                .lines()
                .next()
                .unwrap_or("")
                .replace("QEMU emulator version ", "");
            check(
                "qemu",
                Status::Ok,
                format!("qemu-system-x86_64 {version}"),
                None,
            )
        }
        _ => check(
            "qemu",
            Status::Fail,
            "qemu-system-x86_64 not found",
            Some("`sudo apt-get install qemu-system-x86`"),
        ),
    }
}

/// Which accelerator QEMU VMs get, as the daemon chooses it: `auto` runs
/// a probe guest on KVM once per host boot (shared with the daemon).
fn kvm(paths: &Paths, config: &banger_core::config::Config) -> Check {
    let wanted = config.qemu.accel.as_deref().unwrap_or("auto");
    let qemu = config
        .qemu
        .binary
        .as_deref()
        .unwrap_or("qemu-system-x86_64");
    match wanted {
        "tcg" => check(
            "kvm",
            Status::Ok,
            "qemu.accel is tcg: QEMU VMs run under software emulation (slower)",
            None,
        ),
        "kvm" => check(
            "kvm",
            Status::Ok,
            "qemu.accel is kvm (not probed)",
            Some(
                "qemu.accel = \"auto\" probes KVM and falls back to tcg where it cannot run guests",
            ),
        ),
        _ => {
            let _ = std::fs::create_dir_all(&paths.state_dir);
            let verdict = banger_core::vm::accel::kvm_verdict(qemu, &paths.state_dir);
            match verdict.reason {
                None if verdict.kernel_ran => check(
                    "kvm",
                    Status::Ok,
                    "usable: a guest kernel booted on KVM here",
                    None,
                ),
                // Firmware running proves little under nested KVM: say only that.
                None => check(
                    "kvm",
                    Status::Ok,
                    "firmware runs on KVM here; the first VM boot shows whether a guest kernel \
                     does (if KVM kills it, banger boots it again under tcg and keeps to tcg)",
                    None,
                ),
                Some(reason) => check(
                    "kvm",
                    Status::Warn,
                    format!("unusable here ({reason}), using tcg (slow)"),
                    Some(
                        "run on a host with hardware virtualization (or enable nested \
                         virtualization for this VM); qemu.accel = \"tcg\" skips the probe",
                    ),
                ),
            }
        }
    }
}

/// VMs whose VMM lives but runs no guest (paused on a full disk).
fn vms(paths: &Paths) -> Check {
    let Ok(stream) = Client::new(paths.clone()).connect_existing() else {
        return check(
            "vms",
            Status::Warn,
            "daemon not running; cannot list VMs",
            None,
        );
    };
    let Ok(list) = call_on::<m::VmList>(stream, NoParams {}, |_| {}) else {
        return check("vms", Status::Warn, "the daemon did not list its VMs", None);
    };
    let troubled: Vec<String> = list
        .iter()
        .filter_map(|v| Some(format!("`{}` is {}", v.name, v.problem.as_ref()?)))
        .collect();
    if troubled.is_empty() {
        let running = list.iter().filter(|v| v.state == "running").count();
        check(
            "vms",
            Status::Ok,
            format!("{} VM(s), {running} running", list.len()),
            None,
        )
    } else {
        check("vms", Status::Fail, troubled.join("; "), None)
    }
}

/// How many snapshots there are and what they take on disk.
fn snapshots(paths: &Paths) -> Check {
    let Ok(stream) = Client::new(paths.clone()).connect_existing() else {
        return check(
            "snapshots",
            Status::Warn,
            "daemon not running; cannot list snapshots",
            None,
        );
    };
    let Ok(list) = call_on::<m::SnapshotList>(stream, NoParams {}, |_| {}) else {
        return check(
            "snapshots",
            Status::Warn,
            "the daemon did not list its snapshots",
            None,
        );
    };
    let bytes: u64 = list.iter().map(|s| s.size_bytes).sum();
    check(
        "snapshots",
        Status::Ok,
        format!(
            "{} snapshot(s), {} on disk under {}",
            list.len(),
            human_bytes(bytes),
            paths.state_dir.join("snapshots").display()
        ),
        (!list.is_empty()).then_some("`banger snapshot ls`; `banger snapshot rm NAME` frees one"),
    )
}

fn kernel(paths: &Paths) -> Check {
    let client = Client::new(paths.clone());
    let Ok(stream) = client.connect_existing() else {
        return check(
            "kernel",
            Status::Warn,
            "daemon not running; cannot list kernels",
            None,
        );
    };
    match call_on::<m::KernelList>(stream, NoParams {}, |_| {}) {
        Ok(kernels) => {
            match kernels.iter().find(|k| k.default).or(kernels.first()) {
                Some(k) => check("kernel", Status::Ok, format!("default kernel `{}`", k.name), None),
                None => check(
                    "kernel",
                    Status::Fail,
                    "no kernel imported",
                    Some("`apt-get download linux-image-cloud-amd64`'s dependency, then `banger kernel import FILE.deb`"),
                ),
            }
        }
        Err(e) => check(
            "kernel",
            Status::Fail,
            format!("listing kernels: {e}"),
            None,
        ),
    }
}

fn agent(config: &banger_core::config::Config) -> Check {
    match banger_core::agent_bin::locate(config.agent_binary.as_deref()) {
        Ok(path) => check(
            "agent",
            Status::Ok,
            format!("static guest agent at {}", path.display()),
            None,
        ),
        Err(e) => check(
            "agent",
            Status::Fail,
            e,
            Some("`scripts/install`, or set BANGER_AGENT_BIN to a `scripts/build-agent` build"),
        ),
    }
}

fn network(status: Option<&DaemonStatus>) -> Check {
    use banger_proto::status::NetworkStatus;
    let Some(status) = status else {
        return check("network", Status::Warn, "daemon not running", None);
    };
    match status.network.clone() {
        Some(NetworkStatus::Ok(text)) => check("network", Status::Ok, text, None),
        Some(NetworkStatus::Error(e)) => check(
            "network",
            Status::Fail,
            e,
            Some("set network.subnet (or network.mode = \"none\") in the config file"),
        ),
        None => check("network", Status::Warn, "the daemon did not say", None),
    }
}

/// The root mode new VMs get by default, and why.
fn root_mode(paths: &Paths) -> Check {
    use banger_core::vm::root_mode::{self, Support};
    use banger_proto::domain::RootMode;
    let dir = &paths.state_dir;
    let dm = banger_host::RealBlockDevices {
        runner: std::sync::Arc::new(banger_host::RealRunner),
    };
    let kernel = Client::new(paths.clone())
        .connect_existing()
        .ok()
        .and_then(|stream| call_on::<m::KernelList>(stream, NoParams {}, |_| {}).ok())
        .and_then(|kernels| {
            let default = kernels.iter().position(|k| k.default).unwrap_or(0);
            kernels.into_iter().nth(default)
        });
    let mode = Support::probe(None, kernel.as_ref(), &dm, dir)
        .ok()
        .and_then(|support| root_mode::choose(None, support).ok())
        .unwrap_or(RootMode::Copy);
    let how = match mode {
        RootMode::Overlay => "the image shared read-only under each VM's own layer",
        RootMode::DmSnapshot => "device-mapper snapshots of the image",
        RootMode::Reflink => "reflinked copies of the image",
        RootMode::Copy => "a full (sparse) copy of the image per VM",
    };
    let message = format!("new VMs get the {mode} root mode: {how}");
    if mode == RootMode::Copy {
        check(
            "root-mode",
            Status::Warn,
            message,
            Some("a kernel with overlayfs (CONFIG_OVERLAY_FS) makes VM creation instant and shares the image"),
        )
    } else {
        check("root-mode", Status::Ok, message, None)
    }
}

/// Who does the privileged work, and whether that path is sound.
fn helper(status: Option<&DaemonStatus>, config: &banger_core::config::Config) -> Check {
    let installed = crate::units::Install::present(Path::new("/"));
    if status.map(|s| s.uid) == Some(0) {
        return if installed {
            check(
                "helper",
                Status::Warn,
                "the daemon runs as root although banger is installed as services",
                Some("stop it and run the user service: `systemctl --user start banger`"),
            )
        } else {
            check(
                "helper",
                Status::Ok,
                "the daemon runs as root: privileged work runs in-process (development, tests)",
                None,
            )
        };
    }
    let socket = config.helper_socket();
    let Ok(meta) = std::fs::symlink_metadata(&socket) else {
        // No daemon yet, and this is root: the daemon a command starts runs
        // as root and does the privileged work itself, helper or not.
        if status.is_none() && nix::unistd::geteuid().is_root() {
            return check(
                "helper",
                Status::Ok,
                "no daemon runs yet; one started as root does privileged work in-process \
                 (networking bridged), with no root helper",
                None,
            );
        }
        return check(
            "helper",
            Status::Warn,
            format!(
                "no root helper at {}: VM networking and dm snapshots are off",
                socket.display()
            ),
            Some("`sudo banger system install`"),
        );
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return check(
            "helper",
            Status::Fail,
            format!(
                "{} has mode {mode:o}: any local user may ask the helper for root work",
                socket.display()
            ),
            Some("restart the helper (`sudo systemctl restart banger-helper`); it recreates the socket 660 root:banger"),
        );
    }
    match banger_host::HelperClient::new(&socket).ping() {
        Ok(version) => check(
            "helper",
            Status::Ok,
            format!(
                "reachable at {} (version {version}; socket mode {mode:o}, uid {}, gid {})",
                socket.display(),
                meta.uid(),
                meta.gid()
            ),
            None,
        ),
        Err(e) => check(
            "helper",
            Status::Fail,
            e.to_string(),
            Some("are you in the `banger` group? (`id`; log in again after `system install`)"),
        ),
    }
}

/// Whether Firecracker VMs run jailed: as the running daemon decided, else
/// what a daemon would find.
fn jailer(status: Option<&DaemonStatus>, config: &banger_core::config::Config) -> Check {
    if let Some(said) = status.and_then(|s| s.jailer.clone()) {
        let state = if said.starts_with("unavailable") {
            Status::Warn
        } else {
            Status::Ok
        };
        return check("jailer", state, said, None);
    }
    let found = match config.jailer_binary() {
        Some(path) => format!("jailer at {}", path.display()),
        None => "no `jailer` on PATH".into(),
    };
    check(
        "jailer",
        Status::Ok,
        format!("{found}; the daemon decides when it starts (not running now)"),
        Some("Firecracker VMs run jailed when the daemon is root or the root helper has a jailer (docs/security.md)"),
    )
}

/// The config file parses as the daemon will read it.
fn config_file(
    paths: &Paths,
    loaded: &Result<banger_core::config::Config, banger_core::config::ConfigError>,
) -> Check {
    let file = paths.config_file();
    match loaded {
        Ok(_) if file.exists() => check(
            "config",
            Status::Ok,
            format!("{} read", file.display()),
            None,
        ),
        Ok(_) => check(
            "config",
            Status::Ok,
            format!("no {} (defaults)", file.display()),
            None,
        ),
        Err(e) => check(
            "config",
            Status::Fail,
            e.to_string(),
            Some("fix or remove it: no daemon starts until the file reads"),
        ),
    }
}

/// The uids jailed Firecrackers run as (one per VM) hold no user or group
/// of this host, and not root's.
fn jail_uids(config: &banger_core::config::Config) -> Check {
    match banger_core::vm::jailing::jail_ids(config) {
        Ok(ids) => check(
            "jail-uids",
            Status::Ok,
            format!("{ids}: no user or group here; each jailed Firecracker runs as one of its own"),
            None,
        ),
        Err(e) => check(
            "jail-uids",
            Status::Fail,
            e.to_string(),
            Some("set [firecracker] jail_uids = \"FIRST-LAST\" to a range no account uses (the root helper: --jail-uids)"),
        ),
    }
}

/// A system install matches what `system install` would write now.
fn install() -> Check {
    let root = Path::new("/");
    if !crate::units::Install::present(root) {
        return check(
            "install",
            Status::Ok,
            "not installed as services (`sudo banger system install` runs the daemon unprivileged)",
            None,
        );
    }
    let found = match crate::units::Install::found(root) {
        Ok(i) => i,
        Err(e) => {
            return check(
                "install",
                Status::Warn,
                e,
                Some("`sudo banger system install`"),
            )
        }
    };
    let drift = found.drift();
    if drift.is_empty() {
        check(
            "install",
            Status::Ok,
            format!(
                "services installed for {}, as `system install` writes them",
                found.user
            ),
            None,
        )
    } else {
        check(
            "install",
            Status::Warn,
            drift.join("; "),
            Some("`sudo banger system install` rewrites them"),
        )
    }
}

/// banger's own server answers on its port; and, where systemd-resolved
/// runs, the host routes the VM domain to it.
fn dns(status: Option<&DaemonStatus>) -> Check {
    let Some(status) = status else {
        return check("dns", Status::Warn, "daemon not running", None);
    };
    let Some(dns) = status.dns.clone() else {
        return check(
            "dns",
            Status::Ok,
            "VM networking is off: no DNS server",
            None,
        );
    };
    let Ok(addr) = dns.addr.parse::<std::net::SocketAddr>() else {
        return check(
            "dns",
            Status::Fail,
            format!("bad address {}", dns.addr),
            None,
        );
    };
    let probe = format!("host.{}", dns.domain);
    match banger_core::network::dns::probe(addr, &probe) {
        Ok(Some(ip)) if ip == addr.ip() => {}
        Ok(_) => {
            return check(
                "dns",
                Status::Fail,
                format!("something other than banger answers DNS at {addr}"),
                Some("another server holds the port: set network.dns_port in the config file"),
            )
        }
        Err(e) => return check("dns", Status::Fail, e, Some("restart the daemon")),
    }
    if !banger_host::net::resolved_running() {
        return check(
            "dns",
            Status::Ok,
            format!(
                "banger answers NAME.{} at {addr} for VMs; this host has no systemd-resolved, \
                 so use `ssh NAME` through `banger ssh-config` here",
                dns.domain
            ),
            None,
        );
    }
    let routed = std::process::Command::new("resolvectl")
        .args(["domain", &dns.device])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("~{}", dns.domain)))
        .unwrap_or(false);
    if routed {
        check(
            "dns",
            Status::Ok,
            format!(
                "banger answers NAME.{d} at {addr}; systemd-resolved routes ~{d} to it",
                d = dns.domain
            ),
            None,
        )
    } else {
        check(
            "dns",
            Status::Warn,
            format!(
                "banger answers at {addr}, but systemd-resolved does not route ~{} to it",
                dns.domain
            ),
            Some(&format!(
                "restart the daemon (it sets the route up), or check `resolvectl status {}`",
                dns.device
            )),
        )
    }
}

fn daemon_status(paths: &Paths) -> Option<DaemonStatus> {
    let stream = Client::new(paths.clone()).connect_existing().ok()?;
    call_on::<m::DaemonStatus>(stream, NoParams {}, |_| {}).ok()
}
