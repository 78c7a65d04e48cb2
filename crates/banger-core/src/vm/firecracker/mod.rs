//! The Firecracker backend: one `firecracker` process per VM, configured
//! through its API in the documented order, the agent reached over vsock.

pub mod api;

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_host::LaunchSpec;
use banger_proto::agent::{Transport, VSOCK_CTL_PORT, VSOCK_SSH_PORT};
use futures_util::future::BoxFuture;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use api::Api;
use banger_proto::jail::{JailFile, JailLimits, JailRequest};

use super::sockpath::{self, SockPath};
use super::vmm::{BootSpec, CtlEndpoint, Vmm, VmmError, CMDLINE};

/// The guest's vsock context id (any value ≥ 3; each VM has its own device).
pub const GUEST_CID: u32 = 3;

pub struct Firecracker {
    pub binary: String,
    /// Launched through the jailer, in these jails.
    pub jail: Option<Jailed>,
}

/// Where a daemon's jails are: the chroot base, and the id of its state
/// directory that the jails' owner files them under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jailed {
    pub base: PathBuf,
    pub home: String,
}

/// A snapshot's device state and guest memory.
pub const STATE_FILE: &str = "vmstate";
pub const MEMORY_FILE: &str = "memory";
/// Firecracker's own log and its metrics, apart from the guest's console.
pub const LOG_FILE: &str = "vmm.log";
pub const METRICS_FILE: &str = "metrics.json";

/// The names a jailed VM's files have in its jail's root.
const JAIL_KERNEL: &str = "vmlinux";
const JAIL_INITRD: &str = "initrd.cpio";

/// A drive's path as Firecracker is told it: the VM's own disks relative to
/// its directory (Firecracker runs there), since a snapshot records the
/// paths it was taken with and Firecracker cannot override them at load: a
/// fork, in a directory of its own, then opens its own copies.
fn drive_path(dir: &Path, disk: &Path) -> Result<String, VmmError> {
    match disk.strip_prefix(dir) {
        Ok(own) if !own.as_os_str().is_empty() => path_str(own),
        _ => path_str(disk),
    }
}

fn path_str(p: &Path) -> Result<String, VmmError> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| VmmError::Spec(format!("path {} is not UTF-8", p.display())))
}

/// A disk's file name in a jail: the same in every jail, so a snapshot's
/// recorded drive paths hold in a fork's jail too.
fn jail_disk(id: &str) -> String {
    format!("{id}.disk")
}

impl Firecracker {
    /// Where Firecracker's sockets are on the host: in the jail, or the
    /// VM's directory.
    fn sockets(&self, dir: &Path) -> PathBuf {
        self.jail_root(dir).unwrap_or_else(|| dir.to_path_buf())
    }

    fn api(&self, dir: &Path) -> Api {
        Api::of(dir, self.sockets(dir).join("fc.sock"))
    }

    /// A path as Firecracker is to open it: in its jail under `jail_name`,
    /// else the host path (a VM's own file relative to its directory).
    fn path_for(&self, spec: &BootSpec, host: &Path, jail_name: &str) -> Result<String, VmmError> {
        if self.jail.is_some() {
            return Ok(format!("/{jail_name}"));
        }
        drive_path(&spec.dir, host)
    }

    /// `PUT /snapshot/load`: the saved state, memory mapped from its file, this
    /// VM's tap and vsock socket in place of the ones recorded, running at once.
    fn load_request(
        &self,
        spec: &BootSpec,
        snapshot: &Path,
    ) -> Result<serde_json::Value, VmmError> {
        let (state, memory, vsock) = if self.jail.is_some() {
            (
                format!("/{STATE_FILE}"),
                format!("/{MEMORY_FILE}"),
                "/vsock.sock".to_string(),
            )
        } else {
            (
                path_str(&snapshot.join(STATE_FILE))?,
                path_str(&snapshot.join(MEMORY_FILE))?,
                path_str(&sockpath::for_vmm(&spec.dir, "vsock.sock"))?,
            )
        };
        let mut body = json!({
            "snapshot_path": state,
            "mem_backend": { "backend_type": "File", "backend_path": memory },
            "vsock_override": { "uds_path": vsock },
            "resume_vm": true,
        });
        if let Some(nic) = &spec.nic {
            let tap = nic.require_tap("Firecracker")?;
            body["network_overrides"] = json!([{ "iface_id": "eth0", "host_dev_name": tap }]);
        }
        Ok(body)
    }

    /// The jail of a VM: its files by the names [`Self::path_for`] gives
    /// them, its console, its limits.
    fn jail_request(&self, spec: &BootSpec) -> JailRequest {
        let file = |path: &Path, name: &str, writable| JailFile {
            path: path.to_path_buf(),
            name: name.to_string(),
            writable,
        };
        let mut files = vec![
            file(&spec.vmlinux, JAIL_KERNEL, false),
            file(&spec.initrd, JAIL_INITRD, false),
            file(&spec.dir.join(LOG_FILE), LOG_FILE, true),
            file(&spec.dir.join(METRICS_FILE), METRICS_FILE, true),
        ];
        for disk in &spec.disks {
            files.push(file(&disk.path, &jail_disk(disk.id), !disk.read_only));
        }
        if let Some(snapshot) = &spec.restore {
            files.push(file(&snapshot.join(STATE_FILE), STATE_FILE, false));
            files.push(file(&snapshot.join(MEMORY_FILE), MEMORY_FILE, false));
        }
        JailRequest {
            home: self
                .jail
                .as_ref()
                .map(|j| j.home.clone())
                .unwrap_or_default(),
            vm: spec
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            firecracker: PathBuf::from(&self.binary),
            files,
            console: spec.console_log.clone(),
            limits: JailLimits {
                cpu_quota: spec.cpu_quota,
                memory_mib: Some(spec.memory_mib + banger_host::jail::VMM_OVERHEAD_MIB),
            },
            tap: spec.nic.as_ref().and_then(|n| n.tap().map(String::from)),
        }
    }
}

/// Where `binary` (a name on PATH, or a path) is, if it is an executable
/// file there: what `vm create` and `doctor` both ask.
pub fn find_binary(binary: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    crate::config::which(binary).filter(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Empty files Firecracker opens as its log and metrics: made by the daemon
/// (its user owns them, a jail can be given them), one boot's worth each.
fn fresh_logs(dir: &Path) -> Result<(), VmmError> {
    for name in [LOG_FILE, METRICS_FILE] {
        let path = dir.join(name);
        if path.exists() {
            let _ = std::fs::rename(&path, dir.join(format!("{name}.1")));
        }
        std::fs::File::create(&path)
            .map_err(|e| VmmError::Spec(format!("creating {}: {e}", path.display())))?;
    }
    Ok(())
}

impl Vmm for Firecracker {
    fn kind(&self) -> &'static str {
        "firecracker"
    }

    fn installed(&self) -> Result<(), VmmError> {
        match find_binary(&self.binary) {
            Some(_) => Ok(()),
            None => Err(VmmError::NotInstalled(format!(
                "no Firecracker here: `{}` is not an executable (on PATH or at that path); \
                 install firecracker (docs/vms.md, \"Getting Firecracker\"), set \
                 firecracker.binary or BANGER_FIRECRACKER_BIN, or use --vmm qemu",
                self.binary
            ))),
        }
    }

    fn transport(&self) -> Transport {
        Transport::Vsock
    }

    fn command(&self, spec: &BootSpec) -> Result<LaunchSpec, VmmError> {
        fresh_logs(&spec.dir)?;
        // The serial console is Firecracker's stdout: it goes to the console
        // log; Firecracker's own words go to its log file.
        Ok(LaunchSpec {
            program: self.binary.clone(),
            args: vec![
                "--api-sock".into(),
                path_str(&sockpath::for_vmm(&spec.dir, "fc.sock"))?,
                "--log-path".into(),
                path_str(&spec.dir.join(LOG_FILE))?,
                "--level".into(),
                "Info".into(),
                "--show-level".into(),
            ],
            log: spec.console_log.clone(),
            cwd: Some(spec.dir.clone()),
            user: None,
        })
    }

    fn jail(&self, spec: &BootSpec) -> Result<Option<JailRequest>, VmmError> {
        if self.jail.is_none() {
            return Ok(None);
        }
        fresh_logs(&spec.dir)?;
        Ok(Some(self.jail_request(spec)))
    }

    /// The root of the VM's jail (its name is its directory's), if jailed.
    fn jail_root(&self, dir: &Path) -> Option<PathBuf> {
        let vm = dir.file_name()?.to_str()?;
        let base = &self.jail.as_ref()?.base;
        Some(banger_host::jail::jail_dir(base, Path::new(&self.binary), vm).join("root"))
    }

    fn ctl(&self, dir: &Path) -> CtlEndpoint {
        // Guest-initiated vsock connections arrive on `<uds_path>_<port>`.
        CtlEndpoint::Listen(
            self.sockets(dir)
                .join(format!("vsock.sock_{VSOCK_CTL_PORT}")),
        )
    }

    fn ssh_socket(&self, dir: &Path) -> PathBuf {
        self.sockets(dir).join("vsock.sock")
    }

    fn run_files(&self) -> &'static [&'static str] {
        &["fc.sock", "vsock.sock", "vsock.sock_1024"]
    }

    fn configure<'a>(
        &'a self,
        spec: &'a BootSpec,
        alive: &'a (dyn Fn() -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            let api = self.api(&spec.dir);
            api::wait_for_socket(&api.socket, Duration::from_secs(5), alive).await?;
            if let Some(snapshot) = &spec.restore {
                return api
                    .call(
                        "PUT",
                        "/snapshot/load",
                        Some(&self.load_request(spec, snapshot)?),
                        api::SNAPSHOT_TIMEOUT,
                    )
                    .await;
            }
            // Set once, before boot: the metrics are flushed there each minute.
            let metrics = match self.jail {
                Some(_) => format!("/{METRICS_FILE}"),
                None => path_str(&spec.dir.join(METRICS_FILE))?,
            };
            api.put("/metrics", &json!({ "metrics_path": metrics }))
                .await?;
            api.put(
                "/machine-config",
                &json!({ "vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib }),
            )
            .await?;
            api.put(
                "/boot-source",
                &json!({
                    "kernel_image_path": self.path_for(spec, &spec.vmlinux, JAIL_KERNEL)?,
                    "initrd_path": self.path_for(spec, &spec.initrd, JAIL_INITRD)?,
                    "boot_args": format!("{CMDLINE} reboot=k"),
                }),
            )
            .await?;
            for disk in &spec.disks {
                api.put(
                    &format!("/drives/{}", disk.id),
                    &json!({ "drive_id": disk.id, "path_on_host": self.path_for(spec, &disk.path, &jail_disk(disk.id))?, "is_root_device": false, "is_read_only": disk.read_only }),
                )
                .await?;
            }
            if let Some(nic) = &spec.nic {
                let tap = nic.require_tap("Firecracker")?;
                api.put(
                    "/network-interfaces/eth0",
                    &json!({ "iface_id": "eth0", "host_dev_name": tap, "guest_mac": nic.mac }),
                )
                .await?;
            }
            let vsock = match self.jail {
                Some(_) => "/vsock.sock".to_string(),
                None => path_str(&sockpath::for_vmm(&spec.dir, "vsock.sock"))?,
            };
            api.put(
                "/vsock",
                &json!({ "guest_cid": GUEST_CID, "uds_path": vsock }),
            )
            .await?;
            api.put("/actions", &json!({ "action_type": "InstanceStart" }))
                .await
        })
    }

    fn open_ssh<'a>(
        &'a self,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<tokio::net::UnixStream, VmmError>> {
        Box::pin(async move {
            // The host side of vsock: connect, ask for the guest port, read OK.
            let connecting = VmmError::connect("connecting to the VM's vsock");
            let socket = SockPath::new(&self.ssh_socket(dir)).map_err(connecting)?;
            let mut stream = tokio::net::UnixStream::connect(socket.path())
                .await
                .map_err(VmmError::connect("connecting to the VM's vsock"))?;
            stream
                .write_all(format!("CONNECT {VSOCK_SSH_PORT}\n").as_bytes())
                .await
                .map_err(VmmError::connect("asking the VM's vsock for the agent"))?;
            // Byte by byte up to the newline: the guest's SSH banner may follow
            // at once and must stay in the stream.
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while line.len() < 64 {
                let n = stream
                    .read(&mut byte)
                    .await
                    .map_err(VmmError::connect("reading the VM's vsock answer"))?;
                if n == 0 || byte[0] == b'\n' {
                    break;
                }
                line.push(byte[0]);
            }
            let line = String::from_utf8_lossy(&line);
            if !line.starts_with("OK ") {
                return Err(VmmError::Refused(format!(
                    "vsock CONNECT {VSOCK_SSH_PORT} refused: {}",
                    line.trim()
                )));
            }
            Ok(stream)
        })
    }

    fn pause<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            self.api(dir)
                .patch("/vm", &json!({ "state": "Paused" }))
                .await
        })
    }

    fn resume<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            self.api(dir)
                .patch("/vm", &json!({ "state": "Resumed" }))
                .await
        })
    }

    fn save<'a>(&'a self, dir: &'a Path, into: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            // A jailed Firecracker writes inside its jail; the files are
            // then moved out into the snapshot.
            let (state, memory) = match self.jail_root(dir) {
                Some(_) => (format!("/{STATE_FILE}"), format!("/{MEMORY_FILE}")),
                None => (
                    path_str(&into.join(STATE_FILE))?,
                    path_str(&into.join(MEMORY_FILE))?,
                ),
            };
            self.api(dir)
                .call(
                    "PUT",
                    "/snapshot/create",
                    Some(&json!({
                        "snapshot_type": "Full",
                        "snapshot_path": state,
                        "mem_file_path": memory,
                    })),
                    api::SNAPSHOT_TIMEOUT,
                )
                .await?;
            if let Some(root) = self.jail_root(dir) {
                for name in [STATE_FILE, MEMORY_FILE] {
                    move_file(&root.join(name), &into.join(name)).map_err(|e| {
                        VmmError::Api(format!("moving the snapshot's {name} out of the jail: {e}"))
                    })?;
                }
            }
            Ok(())
        })
    }

    fn state_files(&self) -> &'static [&'static str] {
        &[STATE_FILE, MEMORY_FILE]
    }

    fn request_shutdown<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = self
                .api(dir)
                .put("/actions", &json!({ "action_type": "SendCtrlAltDel" }))
                .await;
        })
    }
}

/// A rename, or a copy where the jail is on another filesystem.
fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            crate::vm::disk::clone_file(from, to)?;
            std::fs::remove_file(from)
        }
        other => other,
    }
}
