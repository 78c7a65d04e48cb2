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

use super::sockpath::{self, SockPath};
use super::vmm::{BootSpec, CtlEndpoint, Vmm, VmmError, CMDLINE};

/// The guest's vsock context id (any value ≥ 3; each VM has its own device).
pub const GUEST_CID: u32 = 3;

pub struct Firecracker {
    pub binary: String,
}

fn api_socket(dir: &Path) -> PathBuf {
    dir.join("fc.sock")
}

fn vsock_socket(dir: &Path) -> PathBuf {
    dir.join("vsock.sock")
}

/// A snapshot's device state and guest memory.
pub const STATE_FILE: &str = "vmstate";
pub const MEMORY_FILE: &str = "memory";

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

/// `PUT /snapshot/load`: the saved state, memory mapped from its file, this
/// VM's tap and vsock socket in place of the ones recorded, running at once.
fn load_request(spec: &BootSpec, snapshot: &Path) -> Result<serde_json::Value, VmmError> {
    let mut body = json!({
        "snapshot_path": path_str(&snapshot.join(STATE_FILE))?,
        "mem_backend": { "backend_type": "File", "backend_path": path_str(&snapshot.join(MEMORY_FILE))? },
        "vsock_override": { "uds_path": path_str(&sockpath::for_vmm(&spec.dir, "vsock.sock"))? },
        "resume_vm": true,
    });
    if let Some(nic) = &spec.nic {
        let tap = nic.require_tap("Firecracker")?;
        body["network_overrides"] = json!([{ "iface_id": "eth0", "host_dev_name": tap }]);
    }
    Ok(body)
}

fn path_str(p: &Path) -> Result<String, VmmError> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| VmmError::Spec(format!("path {} is not UTF-8", p.display())))
}

impl Vmm for Firecracker {
    fn kind(&self) -> &'static str {
        "firecracker"
    }

    fn transport(&self) -> Transport {
        Transport::Vsock
    }

    fn command(&self, spec: &BootSpec) -> Result<LaunchSpec, VmmError> {
        // The serial console is Firecracker's stdout: it goes to the console log.
        Ok(LaunchSpec {
            program: self.binary.clone(),
            args: vec![
                "--api-sock".into(),
                path_str(&sockpath::for_vmm(&spec.dir, "fc.sock"))?,
            ],
            log: spec.console_log.clone(),
            cwd: Some(spec.dir.clone()),
            user: None,
        })
    }

    fn ctl(&self, dir: &Path) -> CtlEndpoint {
        // Guest-initiated vsock connections arrive on `<uds_path>_<port>`.
        CtlEndpoint::Listen(PathBuf::from(format!(
            "{}_{VSOCK_CTL_PORT}",
            vsock_socket(dir).display()
        )))
    }

    fn ssh_socket(&self, dir: &Path) -> PathBuf {
        vsock_socket(dir)
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
            let sock = api_socket(&spec.dir);
            api::wait_for_socket(&sock, Duration::from_secs(5), alive).await?;
            if let Some(snapshot) = &spec.restore {
                return api::put(&sock, "/snapshot/load", &load_request(spec, snapshot)?).await;
            }
            api::put(
                &sock,
                "/machine-config",
                &json!({ "vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib }),
            )
            .await?;
            api::put(
                &sock,
                "/boot-source",
                &json!({
                    "kernel_image_path": path_str(&spec.vmlinux)?,
                    "initrd_path": path_str(&spec.initrd)?,
                    "boot_args": format!("{CMDLINE} reboot=k"),
                }),
            )
            .await?;
            for disk in &spec.disks {
                api::put(
                    &sock,
                    &format!("/drives/{}", disk.id),
                    &json!({ "drive_id": disk.id, "path_on_host": drive_path(&spec.dir, &disk.path)?, "is_root_device": false, "is_read_only": disk.read_only }),
                )
                .await?;
            }
            if let Some(nic) = &spec.nic {
                let tap = nic.require_tap("Firecracker")?;
                api::put(
                    &sock,
                    "/network-interfaces/eth0",
                    &json!({ "iface_id": "eth0", "host_dev_name": tap, "guest_mac": nic.mac }),
                )
                .await?;
            }
            api::put(
                &sock,
                "/vsock",
                &json!({ "guest_cid": GUEST_CID, "uds_path": path_str(&sockpath::for_vmm(&spec.dir, "vsock.sock"))? }),
            )
            .await?;
            api::put(
                &sock,
                "/actions",
                &json!({ "action_type": "InstanceStart" }),
            )
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
            let socket = SockPath::new(&vsock_socket(dir)).map_err(connecting)?;
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
        Box::pin(
            async move { api::patch(&api_socket(dir), "/vm", &json!({ "state": "Paused" })).await },
        )
    }

    fn resume<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            api::patch(&api_socket(dir), "/vm", &json!({ "state": "Resumed" })).await
        })
    }

    fn save<'a>(&'a self, dir: &'a Path, into: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            api::put(
                &api_socket(dir),
                "/snapshot/create",
                &json!({
                    "snapshot_type": "Full",
                    "snapshot_path": path_str(&into.join(STATE_FILE))?,
                    "mem_file_path": path_str(&into.join(MEMORY_FILE))?,
                }),
            )
            .await
        })
    }

    fn state_files(&self) -> &'static [&'static str] {
        &[STATE_FILE, MEMORY_FILE]
    }

    fn request_shutdown<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = api::put(
                &api_socket(dir),
                "/actions",
                &json!({ "action_type": "SendCtrlAltDel" }),
            )
            .await;
        })
    }
}
