//! VMM backends behind one trait: QEMU `microvm` (KVM or TCG) and Firecracker.

use std::path::{Path, PathBuf};

use banger_host::LaunchSpec;
use banger_proto::agent::{Transport, CTL_PORT_NAME, SSH_PORT_NAME};
use futures_util::future::BoxFuture;

/// Everything a backend needs to boot one VM.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    /// In the order the guest sees them: `/dev/vda`, `/dev/vdb`, ...
    pub disks: Vec<Disk>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub console_log: PathBuf,
    /// The VM's network device, backed by a host tap.
    pub nic: Option<Nic>,
}

/// A virtio block device backed by a host file (or block device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The VMM's name for the drive: a word, unique in the VM.
    pub id: &'static str,
    pub path: PathBuf,
    /// Shared between VMs (an image under an overlay root): never written.
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub tap: String,
    pub mac: String,
}

/// Kernel arguments every banger VM boots with.
pub const CMDLINE: &str = "console=ttyS0 panic=-1 quiet loglevel=4";

/// Where the agent's readiness reports come from.
pub enum CtlEndpoint {
    /// A socket the VMM serves (QEMU's virtio-serial chardev): connect to it.
    Connect(PathBuf),
    /// A socket banger must listen on before boot (Firecracker's vsock
    /// forwarding of guest-initiated connections).
    Listen(PathBuf),
}

/// What a VMM backend could not do.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The boot cannot be expressed to this VMM (a path it cannot carry).
    #[error("{0}")]
    Spec(String),
    /// The VMM's API never came up, or refused or failed a call.
    #[error("{0}")]
    Api(String),
    /// The agent's socket could not be reached.
    #[error("{what}: {source}")]
    Connect {
        what: &'static str,
        source: std::io::Error,
    },
    /// The VMM's end of a connection said no.
    #[error("{0}")]
    Refused(String),
    #[error("unknown qemu accelerator `{0}` (use auto, kvm or tcg)")]
    UnknownAccel(String),
}

impl VmmError {
    pub(crate) fn connect(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
        move |source| VmmError::Connect { what, source }
    }
}

pub trait Vmm: Send + Sync {
    fn kind(&self) -> &'static str;
    /// How the agent is reached on this backend.
    fn transport(&self) -> Transport;
    /// The process to launch.
    fn command(&self, spec: &BootSpec) -> Result<LaunchSpec, VmmError>;
    /// Where the agent's readiness reports arrive.
    fn ctl(&self, dir: &Path) -> CtlEndpoint;
    /// The Unix socket that carries SSH connections.
    fn ssh_socket(&self, dir: &Path) -> PathBuf;
    /// Files in the VM directory that exist only while it runs.
    fn run_files(&self) -> &'static [&'static str];
    /// Configures and boots the launched process (Firecracker's API calls).
    fn configure<'a>(
        &'a self,
        _spec: &'a BootSpec,
        _alive: &'a (dyn Fn() -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async { Ok(()) })
    }
    /// A byte stream to the agent's SSH server.
    fn open_ssh<'a>(
        &'a self,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<tokio::net::UnixStream, VmmError>> {
        Box::pin(async move {
            let socket = super::sockpath::SockPath::new(&self.ssh_socket(dir))
                .map_err(VmmError::connect("connecting to the agent"))?;
            tokio::net::UnixStream::connect(socket.path())
                .await
                .map_err(VmmError::connect("connecting to the agent"))
        })
    }
    /// Why a live VMM is not running its guest (paused on a full disk, say),
    /// if it can tell.
    fn problem(&self, _dir: &Path) -> Option<String> {
        None
    }
    /// A VMM-level shutdown request, tried when the agent does not answer.
    fn request_shutdown<'a>(&'a self, _dir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Makes the backend for a kind of VMM: the configured real ones in the
/// daemon, a fake in tests that want to drive a boot's failures.
pub trait VmmProvider: Send + Sync {
    fn vmm(&self, kind: banger_proto::domain::VmmKind) -> Result<Box<dyn Vmm>, VmmError>;
}

/// The real backends, as the configuration names their binaries.
pub struct ConfiguredVmms {
    pub qemu_binary: String,
    pub qemu_accel: String,
    pub firecracker_binary: String,
}

impl ConfiguredVmms {
    pub fn new(config: &crate::config::Config) -> ConfiguredVmms {
        ConfiguredVmms {
            qemu_binary: config
                .qemu
                .binary
                .clone()
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
            qemu_accel: config.qemu.accel.clone().unwrap_or_else(|| "auto".into()),
            firecracker_binary: config
                .firecracker_binary
                .clone()
                .unwrap_or_else(|| "firecracker".into()),
        }
    }
}

impl VmmProvider for ConfiguredVmms {
    fn vmm(&self, kind: banger_proto::domain::VmmKind) -> Result<Box<dyn Vmm>, VmmError> {
        use banger_proto::domain::VmmKind;
        Ok(match kind {
            VmmKind::Qemu => Box::new(Qemu {
                binary: self.qemu_binary.clone(),
                accel: Accel::choose(&self.qemu_accel)?,
            }),
            VmmKind::Firecracker => Box::new(super::firecracker::Firecracker {
                binary: self.firecracker_binary.clone(),
            }),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// `auto` picks KVM when /dev/kvm can be opened.
    pub fn choose(wanted: &str) -> Result<Accel, VmmError> {
        match wanted {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            "auto" | "" => Ok(if kvm_usable() { Accel::Kvm } else { Accel::Tcg }),
            other => Err(VmmError::UnknownAccel(other.to_string())),
        }
    }
}

pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

pub struct Qemu {
    pub binary: String,
    pub accel: Accel,
}

impl Qemu {
    /// Under TCG the guest reads the host's TSC, but calibrating it against
    /// the emulated PIT fails when host CPUs are contended (several VMs
    /// booting at once), leaving the kernel without a clock for a very long
    /// time. Telling it the frequency skips the calibration.
    fn cmdline(&self) -> String {
        match (self.accel, host_tsc_khz()) {
            (Accel::Tcg, Some(khz)) => format!("{CMDLINE} tsc_early_khz={khz}"),
            _ => CMDLINE.to_string(),
        }
    }
}

/// The host's TSC frequency, from sysfs where the kernel exports it, else
/// from /proc/cpuinfo.
pub fn host_tsc_khz() -> Option<u64> {
    if let Ok(text) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(khz) = text.trim().parse() {
            return Some(khz);
        }
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

impl Vmm for Qemu {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn transport(&self) -> Transport {
        Transport::VirtioSerial
    }

    fn ctl(&self, dir: &Path) -> CtlEndpoint {
        CtlEndpoint::Connect(dir.join("ctl.sock"))
    }

    fn ssh_socket(&self, dir: &Path) -> PathBuf {
        dir.join("ssh.sock")
    }

    fn run_files(&self) -> &'static [&'static str] {
        &["ctl.sock", "ssh.sock", "qmp.sock"]
    }

    fn problem(&self, dir: &Path) -> Option<String> {
        let status = super::qmp::status(&dir.join("qmp.sock"))?;
        super::qmp::problem(&status).map(str::to_string)
    }

    fn command(&self, spec: &BootSpec) -> Result<LaunchSpec, VmmError> {
        let path = |p: &Path| -> Result<String, VmmError> {
            let s = p
                .to_str()
                .ok_or_else(|| VmmError::Spec(format!("path {} is not UTF-8", p.display())))?;
            // QEMU's option syntax gives commas a meaning.
            if s.contains(',') {
                return Err(VmmError::Spec(format!(
                    "path {s} contains a comma, which QEMU options cannot carry"
                )));
            }
            Ok(s.to_string())
        };
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let mut args: Vec<String> = vec![
            "-M".into(),
            "microvm,x-option-roms=off,rtc=on".into(),
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            cpu.into(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            // A guest reboot ends the process: that is how the agent powers off.
            "-no-reboot".into(),
            "-kernel".into(),
            path(&spec.vmlinux)?,
            "-initrd".into(),
            path(&spec.initrd)?,
            "-append".into(),
            self.cmdline(),
            "-chardev".into(),
            format!(
                "file,id=console,path={},append=on",
                path(&spec.console_log)?
            ),
            "-serial".into(),
            "chardev:console".into(),
        ];
        for disk in &spec.disks {
            let access = if disk.read_only {
                "readonly=on"
            } else {
                "discard=unmap"
            };
            args.push("-drive".into());
            args.push(format!(
                "id={},file={},format=raw,if=none,{access}",
                disk.id,
                path(&disk.path)?
            ));
            args.push("-device".into());
            args.push(format!("virtio-blk-device,drive={}", disk.id));
        }
        if let Some(nic) = &spec.nic {
            args.push("-netdev".into());
            args.push(format!(
                "tap,id=net0,ifname={},script=no,downscript=no",
                path(Path::new(&nic.tap))?
            ));
            args.push("-device".into());
            args.push(format!(
                "virtio-net-device,netdev=net0,mac={}",
                path(Path::new(&nic.mac))?
            ));
        }
        // Asked for the run status: a guest paused on a full disk must not
        // look like a running one.
        args.push("-qmp".into());
        args.push(format!(
            "unix:{},server=on,wait=off",
            path(&super::sockpath::for_vmm(&spec.dir, "qmp.sock"))?
        ));
        args.push("-device".into());
        args.push("virtio-serial-device".into());
        for (id, socket, name) in [
            (
                "ctl",
                super::sockpath::for_vmm(&spec.dir, "ctl.sock"),
                CTL_PORT_NAME,
            ),
            (
                "ssh",
                super::sockpath::for_vmm(&spec.dir, "ssh.sock"),
                SSH_PORT_NAME,
            ),
        ] {
            args.push("-chardev".into());
            args.push(format!(
                "socket,id={id},path={},server=on,wait=off",
                path(&socket)?
            ));
            args.push("-device".into());
            args.push(format!("virtserialport,chardev={id},name={name}"));
        }
        Ok(LaunchSpec {
            program: self.binary.clone(),
            args,
            log: spec.dir.join("vmm.log"),
            cwd: Some(spec.dir.clone()),
            user: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &str) -> BootSpec {
        let d = PathBuf::from(dir);
        BootSpec {
            vmlinux: d.join("vmlinux"),
            initrd: d.join("initrd"),
            disks: vec![
                Disk {
                    id: "root",
                    path: d.join("root.ext4"),
                    read_only: true,
                },
                Disk {
                    id: "work",
                    path: d.join("work.ext4"),
                    read_only: false,
                },
            ],
            console_log: d.join("console.log"),
            dir: d,
            vcpus: 2,
            memory_mib: 512,
            nic: Some(Nic {
                tap: "bgtap3".into(),
                mac: "06:00:0a:d5:00:07".into(),
            }),
        }
    }

    #[test]
    fn qemu_command_boots_the_elf_kernel_with_both_disks_and_agent_ports() {
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
        };
        let cmd = q.command(&spec("/vms/web")).unwrap();
        let line = cmd.args.join(" ");
        assert!(
            line.contains("-M microvm") && line.contains("-accel tcg -cpu max"),
            "{line}"
        );
        assert!(line.contains("-kernel /vms/web/vmlinux") && line.contains("-no-reboot"));
        let root = line.find("drive=root").unwrap();
        let work = line.find("drive=work").unwrap();
        assert!(root < work, "the root disk is the first virtio disk (vda)");
        assert!(line.contains("id=root,file=/vms/web/root.ext4,format=raw,if=none,readonly=on"));
        assert!(line.contains("id=work,file=/vms/web/work.ext4,format=raw,if=none,discard=unmap"));
        assert!(line.contains("name=banger.ssh") && line.contains("name=banger.ctl"));
        assert!(line.contains("tap,id=net0,ifname=bgtap3,script=no,downscript=no"));
        assert!(line.contains("virtio-net-device,netdev=net0,mac=06:00:0a:d5:00:07"));
        assert!(q.command(&spec("/vms/we,b")).is_err(), "commas are refused");
    }
}
