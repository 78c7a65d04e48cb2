//! A stand-in for the `firecracker` binary, for tests. It serves the parts of
//! Firecracker's API banger uses on `--api-sock`, checks every request body
//! against the documented schema (required fields, types, no unknown fields,
//! no configuration after boot), records each call as a JSON line in
//! `<api-sock>.calls`, and on `InstanceStart` plays the guest: it reads the
//! boot config from the initramfs it was given, reports ready over vsock and
//! serves SSH with the VM's host key, answering each exec with one line.
//! A guest power-off (the agent's request) or Ctrl-Alt-Del ends the process,
//! as a guest reboot ends Firecracker. Its own log lines go to `--log-path`
//! (else stdout), as Firecracker's do; the played guest's go to stdout, the
//! serial console.
//!
//! ## Checked against the real Firecracker v1.16.1
//! Every answer below was taken from a real `firecracker` built from the
//! v1.16.1 source (`scripts/build-firecracker`), with the same request;
//! statuses are exact, `fault_message` texts are exact unless marked (the
//! fake words only what banger's tests read).
//!
//! | Request | Real answer |
//! |---|---|
//! | `PUT /metrics` once, before boot | 204; again: 400 "Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed." |
//! | `PUT /machine-config` 1..=32 vCPUs (3 too, without SMT) | 204 |
//! | `PUT /machine-config` 0 or 33 vCPUs | 400 "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled." |
//! | unknown field / missing field | 400 "An error occurred when deserializing the json body of a request: unknown field `bogus`, expected one of … at line 1 column 46." (the fake: up to "`bogus`") |
//! | `PUT /boot-source`, no kernel file | 400 "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)" |
//! | `PUT /boot-source`, no initrd file | 400 "Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. No such file or directory (os error 2)" |
//! | `PUT /drives/ID`, no file | 400 "Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: No such file or directory (os error 2) PATH" |
//! | `PUT /drives/ID`, body id differs | 400 "The id from the path does not match the id from the body!" |
//! | `PUT /drives/ID` without `is_read_only` | 204 |
//! | `PUT /network-interfaces/eth0`, no such tap, as root | 204 (Firecracker makes the tap) |
//! | the same, `/dev/net/tun` not openable | 400 "Network config error: Could not create the network device: Open tap device failed: Couldn't open /dev/net/tun: Permission denied (os error 13)" |
//! | `PUT /network-interfaces/eth0`, body id differs | 400 "The id from the path [eth0] does not match the id from the body [eth1]!" |
//! | `PUT /vsock`, `uds_path` exists | 400 "Vsock config error: Cannot create backend for vsock device: Error binding to the host-side Unix socket: Address already in use (os error 98)" |
//! | `PUT /vsock` with `guest_cid` 2 | 204 |
//! | `PUT /actions` unknown action | 400 "An error occurred when deserializing the json body of a request: unknown variant `Nope`, …" (the fake: up to "`Nope`") |
//! | `PUT /nope` | 400 "Invalid request method and/or path: PUT nope." |
//! | `SendCtrlAltDel`, `PATCH /vm`, `/snapshot/create` before `InstanceStart` | 400 "The requested operation is not supported before starting the microVM." |
//! | after a successful `InstanceStart` (the real cloud kernel): `InstanceStart`, `/machine-config`, `/boot-source`, `/vsock`, `/metrics`, `/snapshot/load` | 400 "The requested operation is not supported after starting the microVM." |
//! | `PUT /drives/ID` after `InstanceStart` | 400 "PCI is not enabled" (a hot-plug) |
//! | `PUT /snapshot/create` while running (not paused) | 400 "Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running" |
//! | `PATCH /vm` Paused, Resumed; `SendCtrlAltDel` after `InstanceStart` | 204 |
//! | `PUT /snapshot/load` after any boot configuration | 400 "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources." |
//! | `PUT /snapshot/load`, no state file | 400 "Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state from file: Failed to open snapshot file: No such file or directory (os error 2)", then the process exits 1 |
//! | `--api-sock` naming an existing file | exits 1: "Failed to open the API socket at: PATH. Check that it is not already used." |
//! | an unknown argument | exits 153: "Arguments parsing error: Found argument 'bogus' which wasn't expected, …" |
//! | the log (`--log-path FILE --level Info --show-level`) | `<time> [<id>:main:INFO] Running Firecracker v1.16.1`, then one line per API request |
//!
//! `crates/banger/tests/firecracker_real.rs` sends every request above to the
//! real binary and to this fake and compares the answers (it runs when
//! `BANGER_FIRECRACKER_BIN` names a real build); the jailer's steps are
//! compared there too, through banger.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use banger_proto::agent::{AgentReport, BootConfig, ExecRequest, HostMessage, EXEC_PREFIX, HOLD};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(Default)]
struct Vm {
    machine: Option<Value>,
    boot: Option<Value>,
    drives: HashMap<String, Value>,
    vsock: Option<Value>,
    /// A network interface was configured.
    nics: bool,
    metrics: bool,
    started: bool,
    paused: bool,
    /// An error after which Firecracker exits (a failed snapshot load).
    fatal: bool,
    /// What the played guest is, once it runs.
    guest: Option<Arc<Mutex<GuestState>>>,
}

/// The played guest's identity and whether its agent is held (what a
/// snapshot of it keeps).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct GuestState {
    hostname: String,
    host_key: String,
    authorized_keys: Vec<String>,
    held: bool,
    identities: u32,
}

/// The fake's "device state" file: enough to play the guest again.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedVm {
    fake_firecracker_snapshot: u32,
    guest: GuestState,
    drives: HashMap<String, Value>,
    vsock: Value,
}

type Fields<'a> = &'a [(&'a str, &'a str, bool)];

/// Firecracker's words for a body it could not read.
const DESERIALIZE: &str = "An error occurred when deserializing the json body of a request: ";
const BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";
const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";

/// Checks `body` against (name, type, required) rules.
fn check(body: &Value, fields: Fields) -> Result<(), String> {
    let obj = body
        .as_object()
        .ok_or(format!("{DESERIALIZE}the body is not a JSON object"))?;
    for key in obj.keys() {
        if !fields.iter().any(|(name, _, _)| name == key) {
            return Err(format!("{DESERIALIZE}unknown field `{key}`"));
        }
    }
    for (name, kind, required) in fields {
        match obj.get(*name) {
            None if *required => return Err(format!("{DESERIALIZE}missing field `{name}`")),
            None => {}
            Some(v) => {
                let ok = match *kind {
                    "string" => v.is_string(),
                    "bool" => v.is_boolean(),
                    "int" => v.is_u64(),
                    "object" => v.is_object(),
                    "array" => v.is_array(),
                    _ => true,
                };
                if !ok {
                    return Err(format!(
                        "{DESERIALIZE}invalid type for `{name}`, expected {kind}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The OS error opening `field`'s file, if it cannot be opened.
fn open_error(body: &Value, field: &str) -> Option<(String, std::io::Error)> {
    let path = body[field].as_str()?;
    std::fs::File::open(path)
        .err()
        .map(|e| (path.to_string(), e))
}

fn handle(
    vm: &mut Vm,
    method: &str,
    path: &str,
    body: &Value,
) -> Result<Option<&'static str>, String> {
    if method == "PATCH" && path == "/vm" {
        check(body, &[("state", "string", true)])?;
        if !vm.started {
            return Err(BEFORE_START.into());
        }
        match body["state"].as_str().unwrap_or_default() {
            "Paused" => vm.paused = true,
            "Resumed" => vm.paused = false,
            other => return Err(format!("unknown state `{other}`")),
        }
        return Ok(None);
    }
    let known = [
        "/metrics",
        "/machine-config",
        "/boot-source",
        "/vsock",
        "/actions",
        "/snapshot/create",
        "/snapshot/load",
    ];
    let known = known.contains(&path)
        || path.starts_with("/drives/")
        || path.starts_with("/network-interfaces/");
    if method != "PUT" || !known {
        return Err(format!(
            "Invalid request method and/or path: {method} {}.",
            path.trim_start_matches('/')
        ));
    }
    let after_start = ["/actions", "/snapshot/create"];
    if vm.started && path.starts_with("/drives/") {
        // 1.16 takes a drive after boot as a hot-plug, which needs PCI.
        return Err("PCI is not enabled".into());
    }
    if vm.started && !after_start.contains(&path) {
        return Err(AFTER_START.into());
    }
    match path {
        "/snapshot/create" => {
            check(
                body,
                &[
                    ("snapshot_type", "string", false),
                    ("snapshot_path", "string", true),
                    ("mem_file_path", "string", true),
                ],
            )?;
            if !vm.started {
                return Err(BEFORE_START.into());
            }
            if !vm.paused {
                return Err(
                    "Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running".into(),
                );
            }
            let guest = vm.guest.as_ref().ok_or("no guest")?.lock().unwrap().clone();
            let saved = SavedVm {
                fake_firecracker_snapshot: 1,
                guest,
                drives: vm.drives.clone(),
                vsock: vm.vsock.clone().unwrap_or_default(),
            };
            let write = |field: &str, data: Vec<u8>| {
                std::fs::write(body[field].as_str().unwrap_or_default(), data)
                    .map_err(|e| format!("{field}: {e}"))
            };
            write("snapshot_path", serde_json::to_vec(&saved).unwrap())?;
            write("mem_file_path", vec![0x42; 4096])?;
            return Ok(None);
        }
        "/snapshot/load" => {
            check(
                body,
                &[
                    ("snapshot_path", "string", true),
                    ("mem_file_path", "string", false),
                    ("mem_backend", "object", false),
                    ("resume_vm", "bool", false),
                    ("track_dirty_pages", "bool", false),
                    ("enable_diff_snapshots", "bool", false),
                    ("network_overrides", "array", false),
                    ("vsock_override", "object", false),
                    ("clock_realtime", "bool", false),
                ],
            )?;
            if vm.machine.is_some()
                || vm.boot.is_some()
                || !vm.drives.is_empty()
                || vm.vsock.is_some()
                || vm.nics
            {
                return Err("Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.".into());
            }
            let memory = match (&body["mem_file_path"], &body["mem_backend"]) {
                (Value::String(path), Value::Null) => path.clone(),
                (Value::Null, backend @ Value::Object(_)) => {
                    check(
                        backend,
                        &[
                            ("backend_type", "string", true),
                            ("backend_path", "string", true),
                        ],
                    )?;
                    if backend["backend_type"] != "File" {
                        return Err("the fake serves only the File memory backend".into());
                    }
                    backend["backend_path"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                }
                _ => return Err("exactly one of mem_file_path and mem_backend is required".into()),
            };
            // The state file is opened first, then the memory file.
            let state = body["snapshot_path"].as_str().unwrap_or_default();
            let saved: SavedVm = match std::fs::read(state) {
                Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                    format!("Load snapshot error: Failed to restore from snapshot: {e}")
                })?,
                Err(e) => {
                    vm.fatal = true;
                    return Err(format!("Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state from file: Failed to open snapshot file: {e}"));
                }
            };
            if let Err(e) = std::fs::File::open(&memory) {
                vm.fatal = true;
                return Err(format!("Load snapshot error: Failed to restore from snapshot: Failed to load guest memory: {e}"));
            }
            // The drives reopen at the paths they were saved with.
            for drive in saved.drives.values() {
                if let Some((path, e)) = open_error(drive, "path_on_host") {
                    vm.fatal = true;
                    return Err(format!("Load snapshot error: Failed to restore from snapshot: Failed to build microVM from snapshot: block device: {e} {path}"));
                }
            }
            let mut vsock = saved.vsock.clone();
            if let Some(over) = body.get("vsock_override") {
                check(over, &[("uds_path", "string", true)])?;
                vsock["uds_path"] = over["uds_path"].clone();
            }
            for over in body["network_overrides"].as_array().into_iter().flatten() {
                check(
                    over,
                    &[
                        ("iface_id", "string", true),
                        ("host_dev_name", "string", true),
                    ],
                )?;
                open_tap(over["host_dev_name"].as_str().unwrap_or_default())?;
            }
            vm.drives = saved.drives;
            vm.vsock = Some(vsock);
            vm.guest = Some(Arc::new(Mutex::new(saved.guest)));
            vm.started = true;
            vm.paused = !body["resume_vm"].as_bool().unwrap_or(false);
            return Ok(Some(if vm.paused { "loaded" } else { "resume" }));
        }
        "/metrics" => {
            check(body, &[("metrics_path", "string", true)])?;
            if vm.metrics {
                return Err("Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed.".into());
            }
            let path = body["metrics_path"].as_str().unwrap_or_default();
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("Metrics error: Cannot initialize the metrics system due to bad user input: {e}"))?;
            vm.metrics = true;
        }
        "/machine-config" => {
            check(
                body,
                &[
                    ("vcpu_count", "int", true),
                    ("mem_size_mib", "int", true),
                    ("smt", "bool", false),
                    ("track_dirty_pages", "bool", false),
                ],
            )?;
            let vcpus = body["vcpu_count"].as_u64().unwrap_or(0);
            if !(1..=32).contains(&vcpus) {
                return Err("Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.".into());
            }
            vm.machine = Some(body.clone());
        }
        "/boot-source" => {
            check(
                body,
                &[
                    ("kernel_image_path", "string", true),
                    ("initrd_path", "string", false),
                    ("boot_args", "string", false),
                ],
            )?;
            if let Some((_, e)) = open_error(body, "kernel_image_path") {
                return Err(format!(
                    "Boot source error: The kernel file cannot be opened: {e}"
                ));
            }
            if let Some((_, e)) = open_error(body, "initrd_path") {
                return Err(format!("Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. {e}"));
            }
            vm.boot = Some(body.clone());
        }
        p if p.starts_with("/drives/") => {
            check(
                body,
                &[
                    ("drive_id", "string", true),
                    ("is_root_device", "bool", true),
                    ("path_on_host", "string", true),
                    ("is_read_only", "bool", false),
                    ("cache_type", "string", false),
                ],
            )?;
            let id = &p["/drives/".len()..];
            if body["drive_id"].as_str() != Some(id) {
                return Err("The id from the path does not match the id from the body!".into());
            }
            if let Some((path, e)) = open_error(body, "path_on_host") {
                return Err(format!("Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: {e} {path}"));
            }
            vm.drives.insert(id.to_string(), body.clone());
        }
        p if p.starts_with("/network-interfaces/") => {
            check(
                body,
                &[
                    ("iface_id", "string", true),
                    ("host_dev_name", "string", true),
                    ("guest_mac", "string", false),
                ],
            )?;
            let id = &p["/network-interfaces/".len()..];
            let body_id = body["iface_id"].as_str().unwrap_or_default();
            if body_id != id {
                return Err(format!(
                    "The id from the path [{id}] does not match the id from the body [{body_id}]!"
                ));
            }
            open_tap(body["host_dev_name"].as_str().unwrap_or_default())?;
            vm.nics = true;
        }
        "/vsock" => {
            check(
                body,
                &[("guest_cid", "int", true), ("uds_path", "string", true)],
            )?;
            let uds = body["uds_path"].as_str().unwrap_or_default();
            if Path::new(uds).exists() {
                return Err("Vsock config error: Cannot create backend for vsock device: Error binding to the host-side Unix socket: Address already in use (os error 98)".into());
            }
            vm.vsock = Some(body.clone());
        }
        "/actions" => {
            check(body, &[("action_type", "string", true)])?;
            match body["action_type"].as_str().unwrap_or_default() {
                "InstanceStart" => {
                    if vm.started {
                        return Err(AFTER_START.into());
                    }
                    if vm.boot.is_none() || vm.machine.is_none() {
                        return Err(
                            "boot source and machine config are required before InstanceStart"
                                .into(),
                        );
                    }
                    vm.started = true;
                    return Ok(Some("start"));
                }
                "SendCtrlAltDel" if !vm.started => return Err(BEFORE_START.into()),
                "SendCtrlAltDel" => return Ok(Some("ctrl-alt-del")),
                "FlushMetrics" => {}
                other => return Err(format!("{DESERIALIZE}unknown variant `{other}`")),
            }
        }
        other => return Err(format!("unsupported path {other}")),
    }
    Ok(None)
}

/// Opens a tap as Firecracker does: through /dev/net/tun, by name. Without
/// the right to make one, a missing tap is Firecracker's `EPERM` error.
fn open_tap(tap: &str) -> Result<(), String> {
    let open = "Network config error: Could not create the network device: Open tap device failed";
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("{open}: Couldn't open /dev/net/tun: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && !Path::new("/sys/class/net").join(tap).exists() {
        return Err(format!("{open}: Error while creating ifreq structure: Operation not permitted (os error 1). Invalid TUN/TAP Backend provided by {tap}. Check our documentation on setting up the network devices."));
    }
    Ok(())
}

static LOG: std::sync::OnceLock<Mutex<Log>> = std::sync::OnceLock::new();

/// A line in Firecracker's log.
fn log(level: &str, message: String) {
    if let Some(l) = LOG.get() {
        l.lock().unwrap().line(level, &message);
    }
}

/// Firecracker's log: `--log-path` (opened as Firecracker opens it, written
/// from its start), else stdout.
struct Log {
    id: String,
    file: Option<std::fs::File>,
}

impl Log {
    fn line(&mut self, level: &str, message: &str) {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let text = format!("{secs:.9} [{}:main:{level}] {message}\n", self.id);
        match &mut self.file {
            Some(f) => {
                let _ = std::io::Write::write_all(f, text.as_bytes());
            }
            None => print!("{text}"),
        }
    }
}

/// Finds a file in concatenated newc cpio archives.
fn cpio_find(data: &[u8], wanted: &str) -> Option<Vec<u8>> {
    let mut pos = 0;
    while pos + 110 <= data.len() {
        if &data[pos..pos + 6] != b"070701" {
            pos += 4; // padding between archives
            continue;
        }
        let field = |i: usize| {
            usize::from_str_radix(
                std::str::from_utf8(&data[pos + 6 + i * 8..pos + 14 + i * 8]).ok()?,
                16,
            )
            .ok()
        };
        let (filesize, namesize) = (field(6)?, field(11)?);
        let name_start = pos + 110;
        let name = std::str::from_utf8(&data[name_start..name_start + namesize - 1]).ok()?;
        let data_start = (name_start + namesize).div_ceil(4) * 4;
        if name.trim_start_matches('/') == wanted.trim_start_matches('/') {
            return Some(data[data_start..data_start + filesize].to_vec());
        }
        pos = (data_start + filesize).div_ceil(4) * 4;
    }
    None
}

struct Guest {
    state: Arc<Mutex<GuestState>>,
    reports: tokio::sync::mpsc::UnboundedSender<&'static str>,
}

impl russh::server::Handler for Guest {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<russh::server::Auth, Self::Error> {
        let ok = self
            .state
            .lock()
            .unwrap()
            .authorized_keys
            .iter()
            .filter_map(|k| russh::keys::PublicKey::from_openssh(k).ok())
            .any(|k| k.key_data() == key.public_key.key_data());
        Ok(if ok {
            russh::server::Auth::Accept
        } else {
            russh::server::Auth::reject()
        })
    }

    async fn channel_open_session(
        &mut self,
        _: russh::Channel<russh::server::Msg>,
        reply: russh::server::ChannelOpenHandle,
        _: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: russh::ChannelId,
        data: &[u8],
        session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        let command = String::from_utf8_lossy(data).into_owned();
        if command == "banger-poweroff" {
            // A guest that hangs on the way down leaves only Ctrl-Alt-Del.
            if std::env::var_os("FAKE_FC_HANG_ON_POWEROFF").is_some() {
                println!("fake-firecracker: guest ignored the power-off");
                return Ok(());
            }
            println!("fake-firecracker: guest powered off");
            std::process::exit(0);
        }
        let (reply, held) = {
            let mut state = self.state.lock().unwrap();
            if command == HOLD {
                state.held = true;
                let _ = self.reports.send("held");
                (String::new(), false)
            } else {
                let argv = match command.strip_prefix(EXEC_PREFIX) {
                    Some(json) => serde_json::from_str::<ExecRequest>(json)
                        .map(|r| r.argv)
                        .unwrap_or_default(),
                    None => vec![command],
                };
                (
                    format!(
                        "fake-firecracker ran on {}: {}\n",
                        state.hostname,
                        argv.join(" ")
                    ),
                    state.held,
                )
            }
        };
        if held {
            // A held agent runs nothing until it has its identity.
            println!("fake-firecracker: a command reached a held guest");
            std::process::exit(3);
        }
        let handle = session.handle();
        tokio::spawn(async move {
            if !reply.is_empty() {
                let _ = handle.data(channel, reply.into_bytes()).await;
            }
            let _ = handle.exit_status_request(channel, 0).await;
            let _ = handle.eof(channel).await;
            let _ = handle.close(channel).await;
        });
        Ok(())
    }
}

/// Boots the guest from the initramfs's config: a fresh agent.
async fn play_guest(vm: &mut Vm) -> Result<(), String> {
    let initrd = vm
        .boot
        .as_ref()
        .and_then(|b| b["initrd_path"].as_str())
        .ok_or("no initrd")?;
    let data = std::fs::read(initrd).map_err(|e| e.to_string())?;
    let config: BootConfig = serde_json::from_slice(
        &cpio_find(&data, "banger/config.json").ok_or("no boot config in the initrd")?,
    )
    .map_err(|e| e.to_string())?;
    println!("fake-firecracker: booting {}", config.hostname);
    let state = Arc::new(Mutex::new(GuestState {
        hostname: config.hostname,
        host_key: config.host_key,
        authorized_keys: config.authorized_keys,
        held: false,
        identities: 0,
    }));
    vm.guest = Some(state.clone());
    run_guest(vm, state, &["modules", "root", "ready"]).await
}

/// The guest's agent: SSH on vsock port 22 (the host key as it is at each
/// connection), and the control connection: `first` reports, then an
/// identity from the host applied and answered with `ready`.
async fn run_guest(
    vm: &Vm,
    state: Arc<Mutex<GuestState>>,
    first: &[&'static str],
) -> Result<(), String> {
    let uds = PathBuf::from(
        vm.vsock
            .as_ref()
            .and_then(|v| v["uds_path"].as_str())
            .ok_or("no vsock")?,
    );
    let (reports, mut queued) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let listener = UnixListener::bind(&uds).map_err(|e| e.to_string())?;
    let (ssh_state, ssh_reports) = (state.clone(), reports.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while stream
                .read(&mut byte)
                .await
                .map(|n| n == 1)
                .unwrap_or(false)
                && byte[0] != b'\n'
            {
                line.push(byte[0]);
            }
            if String::from_utf8_lossy(&line) != "CONNECT 22" {
                log(
                    "INFO",
                    format!(
                        "fake-firecracker: refusing vsock request {:?}",
                        String::from_utf8_lossy(&line)
                    ),
                );
                continue;
            }
            log(
                "INFO",
                "fake-firecracker: vsock connection to port 22".into(),
            );
            let _ = stream.write_all(b"OK 1073741824\n").await;
            let key = ssh_state.lock().unwrap().host_key.clone();
            let Ok(key) = russh::keys::PrivateKey::from_openssh(key.as_bytes()) else {
                continue;
            };
            let cfg = Arc::new(russh::server::Config {
                keys: vec![key],
                inactivity_timeout: None,
                keepalive_interval: None,
                nodelay: true,
                ..Default::default()
            });
            let guest = Guest {
                state: ssh_state.clone(),
                reports: ssh_reports.clone(),
            };
            tokio::spawn(async move {
                match russh::server::run_stream(cfg, stream, guest).await {
                    Ok(session) => {
                        if let Err(e) = session.await {
                            log("INFO", format!("fake-firecracker: ssh session: {e}"));
                        }
                    }
                    Err(e) => log("INFO", format!("fake-firecracker: ssh: {e}")),
                }
            });
        }
    });
    // The control connection, made again whenever the host closes it (a
    // daemon listens only while it waits for the guest), the latest report
    // first, as the agent does.
    for stage in first {
        let _ = reports.send(stage);
    }
    let ctl_path = format!("{}_1024", uds.display());
    tokio::spawn(async move {
        let mut latest: Option<&'static str> = None;
        loop {
            let Ok(ctl) = UnixStream::connect(&ctl_path).await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let (read, mut write) = ctl.into_split();
            let report = |stage: &str| {
                let report = AgentReport {
                    protocol: 1,
                    version: "fake".into(),
                    stage: stage.into(),
                    error: None,
                    identities: state.lock().unwrap().identities,
                };
                format!("{}\n", serde_json::to_string(&report).unwrap())
            };
            // Reports made while no host listened: only the latest counts.
            while let Ok(stage) = queued.try_recv() {
                latest = Some(stage);
            }
            if let Some(stage) = latest {
                if write.write_all(report(stage).as_bytes()).await.is_err() {
                    continue;
                }
            }
            let mut lines = BufReader::new(read).lines();
            loop {
                tokio::select! {
                    stage = queued.recv() => {
                        let Some(stage) = stage else { return };
                        latest = Some(stage);
                        if write.write_all(report(stage).as_bytes()).await.is_err() {
                            break;
                        }
                    }
                    line = lines.next_line() => {
                        let Ok(Some(line)) = line else { break };
                        match serde_json::from_str::<HostMessage>(&line) {
                            Ok(HostMessage::Identity(id)) => {
                                {
                                    let mut s = state.lock().unwrap();
                                    s.hostname = id.hostname.clone();
                                    s.host_key = id.host_key;
                                    s.held = false;
                                    s.identities += 1;
                                }
                                println!("fake-firecracker: the guest is now {}", id.hostname);
                                let _ = reports.send("ready");
                            }
                            Err(e) => log("INFO", format!("fake-firecracker: unreadable host message: {e}")),
                        }
                    }
                }
            }
        }
    });
    println!("banger-agent: ready");
    Ok(())
}

async fn read_request(stream: &mut UnixStream) -> Option<(String, String, Value)> {
    let mut reader = BufReader::new(stream);
    let mut head = banger_proto::http1::HeadReader::default();
    let head = loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if let Some(head) = head.line(&line) {
            break head;
        }
    };
    let (method, path) = head.method_and_path()?;
    let (method, path) = (method.to_string(), path.to_string());
    let length = head.content_length;
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await.ok()?;
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::String("<invalid json>".into()))
    };
    Some((method, path, body))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut sock, mut log_path, mut id) = (None, None, "anonymous-instance".to_string());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--api-sock" => sock = args.next(),
            "--log-path" => log_path = args.next(),
            "--id" => id = args.next().unwrap_or_default(),
            "--level" | "--start-time-us" | "--start-time-cpu-us" | "--parent-cpu-time-us" => {
                args.next();
            }
            "--show-level" | "--show-log-origin" => {}
            other => {
                println!(
                    "[{id}:main] Arguments parsing error: Found argument '{}' which wasn't expected, or isn't valid in this context.",
                    other.trim_start_matches('-')
                );
                std::process::exit(153);
            }
        }
    }
    let sock = sock.unwrap_or_else(|| "/run/firecracker.socket".into());
    // Opened as Firecracker opens its log: created if need be, read-write,
    // not appended to.
    let file = log_path.map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("opening the log {p}: {e}"))
    });
    let _ = LOG.set(Mutex::new(Log { id, file }));
    log("INFO", "Running Firecracker v1.16.1".into());
    let calls = PathBuf::from(format!("{sock}.calls"));
    if Path::new(&sock).exists() {
        log(
            "ERROR",
            format!("RunWithApiError error: Failed to open the API socket at: {sock}. Check that it is not already used."),
        );
        std::process::exit(1);
    }
    let listener = UnixListener::bind(&sock).expect("binding the API socket");
    log("INFO", format!("Listening on API socket ({sock:?})."));
    let mut vm = Vm::default();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    loop {
        let mut stream = tokio::select! {
            accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
            _ = term.recv() => std::process::exit(0),
        };
        let Some((method, path, body)) = read_request(&mut stream).await else {
            continue;
        };
        let mut record = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&calls)
            .unwrap();
        std::io::Write::write_all(
            &mut record,
            format!(
                "{}\n",
                json!({ "method": method, "path": path, "body": body })
            )
            .as_bytes(),
        )
        .unwrap();
        log(
            "INFO",
            format!(
                "The API server received a {method} request on {path:?} with body {:?}.",
                body.to_string()
            ),
        );
        let (status, reply) = match handle(&mut vm, &method, &path, &body) {
            Ok(action) => {
                if action == Some("start") && std::env::var_os("FAKE_FC_DIE_IN_BOOT").is_some() {
                    // As nested KVM under kvm-pvm does: the start is
                    // accepted, then a vCPU exit Firecracker cannot handle
                    // ends the process.
                    tokio::spawn(async {
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        log("ERROR", "Received KVM_EXIT_INTERNAL_ERROR signal".into());
                        log(
                            "ERROR",
                            "Firecracker exiting with error. exit_code=1".into(),
                        );
                        std::process::exit(1);
                    });
                } else if action == Some("start") {
                    if let Err(e) = play_guest(&mut vm).await {
                        log("INFO", format!("fake-firecracker: guest failed: {e}"));
                    }
                }
                if action == Some("resume") {
                    let state = vm.guest.clone().expect("loaded");
                    let held = state.lock().unwrap().held;
                    log("INFO", "fake-firecracker: resuming a snapshot".into());
                    let first: &[&str] = if held { &["held"] } else { &["ready"] };
                    if let Err(e) = run_guest(&vm, state, first).await {
                        log(
                            "INFO",
                            format!("fake-firecracker: restored guest failed: {e}"),
                        );
                    }
                }
                if action == Some("ctrl-alt-del") {
                    let _ = stream
                        .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    log("INFO", "fake-firecracker: Ctrl-Alt-Del".into());
                    std::process::exit(0);
                }
                (204, String::new())
            }
            Err(fault) => {
                log(
                    "ERROR",
                    format!("Received Error. Status code: 400 Bad Request. Message: {fault}"),
                );
                (400, json!({ "fault_message": fault }).to_string())
            }
        };
        let reason = if status == 204 {
            "No Content"
        } else {
            "Bad Request"
        };
        let _ = stream
            .write_all(format!("HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}", reply.len()).as_bytes())
            .await;
        if vm.fatal {
            log(
                "ERROR",
                "Firecracker exiting with error. exit_code=1".into(),
            );
            std::process::exit(1);
        }
    }
}
