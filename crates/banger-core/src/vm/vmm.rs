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
    /// Resume from the saved state in this snapshot directory instead of
    /// booting (the files [`Vmm::save`] wrote there).
    pub restore: Option<PathBuf>,
    /// CPU time the VMM may use, percent of one host CPU (jailed VMMs).
    pub cpu_quota: Option<u32>,
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

/// The VM's network device and what backs it on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub backend: NicBackend,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    /// A host tap on banger's subnet (bridged).
    Tap(String),
    /// The VMM's own user-mode NAT; only QEMU has one.
    User,
}

impl Nic {
    pub fn tap(&self) -> Option<&str> {
        match &self.backend {
            NicBackend::Tap(tap) => Some(tap),
            NicBackend::User => None,
        }
    }

    /// The tap, for a VMM that has no other way to a network.
    pub fn require_tap(&self, vmm: &str) -> Result<&str, VmmError> {
        self.tap().ok_or_else(|| {
            VmmError::Spec(format!(
                "{vmm} has no user-mode networking; bridged networking needs the root helper \
                 (`sudo banger system install`), or use --vmm qemu"
            ))
        })
    }
}

/// QEMU user-mode networking: the guests' subnet, the host as the guest
/// sees it (the host's loopback services answer there) and the DNS relay.
pub const USER_NET: (&str, &str, &str) = ("10.0.2.0/24", "10.0.2.2", "10.0.2.3");

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
    /// The VMM's program is not on this host.
    #[error("{0}")]
    NotInstalled(String),
}

impl VmmError {
    pub(crate) fn connect(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
        move |source| VmmError::Connect { what, source }
    }
}

pub trait Vmm: Send + Sync {
    fn kind(&self) -> &'static str;
    /// Whether its program is here: asked at create, so a VM that could
    /// never start is refused then, not at its first start.
    fn installed(&self) -> Result<(), VmmError> {
        Ok(())
    }
    /// How the agent is reached on this backend.
    fn transport(&self) -> Transport;
    /// The process to launch.
    fn command(&self, spec: &BootSpec) -> Result<LaunchSpec, VmmError>;
    /// The jail to launch it in instead, for a backend run by a jailer.
    fn jail(&self, _spec: &BootSpec) -> Result<Option<banger_proto::jail::JailRequest>, VmmError> {
        Ok(None)
    }
    /// Where the agent's readiness reports arrive.
    fn ctl(&self, dir: &Path) -> CtlEndpoint;
    /// The root of a jailed VM's jail on the host.
    fn jail_root(&self, _dir: &Path) -> Option<PathBuf> {
        None
    }
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
    /// How a guest that died under this VMM's accelerator shows while it
    /// boots: the VMM stays up with its guest halted, so only its log says.
    fn fatal_watch(&self, _dir: &Path) -> Option<FatalWatch> {
        None
    }
    /// A VMM-level shutdown request, tried when the agent does not answer.
    fn request_shutdown<'a>(&'a self, _dir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    /// Stops the guest's vCPUs; memory and devices stay as they are.
    fn pause<'a>(&'a self, _dir: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        self.unsupported("pause a VM")
    }
    /// Lets a paused guest run again.
    fn resume<'a>(&'a self, _dir: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        self.unsupported("resume a VM")
    }
    /// Writes a paused guest's memory and device state into the directory
    /// `into`, as the files [`Vmm::state_files`] names.
    fn save<'a>(&'a self, _dir: &'a Path, _into: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        self.unsupported("save a VM's state")
    }
    /// The files [`Vmm::save`] writes.
    fn state_files(&self) -> &'static [&'static str] {
        &[]
    }
    fn unsupported(&self, what: &str) -> BoxFuture<'static, Result<(), VmmError>> {
        let message = format!("the {} backend cannot {what}", self.kind());
        Box::pin(async move { Err(VmmError::Spec(message)) })
    }
}

/// Runs QMP commands on a blocking thread: QMP is a plain socket protocol.
fn with_qmp<T: Send + 'static>(
    dir: &Path,
    timeout: std::time::Duration,
    work: impl FnOnce(&mut super::qmp::Qmp) -> Result<T, String> + Send + 'static,
) -> BoxFuture<'static, Result<T, VmmError>> {
    let socket = dir.join("qmp.sock");
    Box::pin(async move {
        tokio::task::spawn_blocking(move || {
            let mut qmp = super::qmp::Qmp::connect(&socket, timeout)?;
            work(&mut qmp)
        })
        .await
        .map_err(|e| VmmError::Api(e.to_string()))?
        .map_err(VmmError::Api)
    })
}

/// The file QEMU's saved state goes to within a snapshot.
pub const QEMU_STATE_FILE: &str = "vmstate";

/// A path as one `/bin/sh` word: QEMU runs `exec:` migration URIs with it.
fn shell_word(path: &Path) -> Result<String, VmmError> {
    let text = path
        .to_str()
        .ok_or_else(|| VmmError::Spec(format!("path {} is not UTF-8", path.display())))?;
    Ok(format!("'{}'", text.replace('\'', "'\\''")))
}

/// Waits for a migration (save or restore) to end; QEMU's error if it failed.
fn await_migration(
    qmp: &mut super::qmp::Qmp,
    limit: std::time::Duration,
    what: &str,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let info = qmp.execute("query-migrate", None)?;
        match info["status"].as_str().unwrap_or("none") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(format!(
                    "{what} failed: {}",
                    info["error-desc"].as_str().unwrap_or("QEMU gave no reason")
                ))
            }
            _ if std::time::Instant::now() > deadline => {
                return Err(format!("{what} did not finish in {}s", limit.as_secs()))
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
}

/// Makes the backend for a kind of VMM: the configured real ones in the
/// daemon, a fake in tests that want to drive a boot's failures.
/// A VMM's log and the words in it that mean its guest is dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatalWatch {
    pub log: PathBuf,
    pub marker: &'static str,
    /// The accelerator was banger's choice (`auto`): a death here marks it
    /// unusable and the boot is tried again without it.
    pub retry_without_kvm: bool,
}

impl FatalWatch {
    /// Where the log ends now: only what is written after counts.
    pub fn from_now(self) -> ArmedWatch {
        let start = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        ArmedWatch { watch: self, start }
    }
}

/// A [`FatalWatch`] looking at what its log gained since it was armed.
#[derive(Debug, Clone)]
pub struct ArmedWatch {
    pub watch: FatalWatch,
    start: u64,
}

impl ArmedWatch {
    /// The log's line naming the guest's death, once there is one.
    pub fn fired(&self) -> Option<String> {
        use std::io::{Read, Seek};
        let mut file = std::fs::File::open(&self.watch.log).ok()?;
        // Polled while the guest boots: a log that did not grow says nothing.
        if file.metadata().ok()?.len() <= self.start {
            return None;
        }
        file.seek(std::io::SeekFrom::Start(self.start)).ok()?;
        let mut text = Vec::new();
        // A boot's worth of VMM output; a guest's death is said early.
        file.take(256 << 10).read_to_end(&mut text).ok()?;
        String::from_utf8_lossy(&text)
            .lines()
            .find(|l| l.contains(self.watch.marker))
            .map(|l| l.trim().to_string())
    }
}

pub trait VmmProvider: Send + Sync {
    fn vmm(&self, kind: banger_proto::domain::VmmKind) -> Result<Box<dyn Vmm>, VmmError>;
}

/// The real backends, as the configuration names their binaries.
pub struct ConfiguredVmms {
    pub qemu_binary: String,
    pub qemu_accel: String,
    pub firecracker_binary: String,
    /// Firecracker VMs run in jails under this chroot base (`Ok(None)`:
    /// unjailed; `Err`: a jailer was asked for and cannot be had).
    pub jail: Result<Option<super::firecracker::Jailed>, String>,
    /// Where `auto` keeps KVM's verdict.
    pub state_dir: std::path::PathBuf,
}

impl ConfiguredVmms {
    pub fn new(config: &crate::config::Config, state_dir: &Path) -> ConfiguredVmms {
        ConfiguredVmms {
            state_dir: state_dir.to_path_buf(),
            qemu_binary: config
                .qemu
                .binary
                .clone()
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
            qemu_accel: config.qemu.accel.clone().unwrap_or_else(|| "auto".into()),
            firecracker_binary: config.firecracker(),
            jail: Ok(None),
        }
    }

    pub fn with_jails(mut self, choice: &super::jailing::JailChoice) -> ConfiguredVmms {
        use super::jailing::JailChoice;
        self.jail = match choice {
            JailChoice::Off => Ok(None),
            JailChoice::On(jails) => Ok(Some(super::firecracker::Jailed {
                base: jails.base(),
                home: banger_proto::jail::home_id(&self.state_dir),
            })),
            JailChoice::Missing(why) => Err(why.clone()),
        };
        self
    }
}

impl VmmProvider for ConfiguredVmms {
    fn vmm(&self, kind: banger_proto::domain::VmmKind) -> Result<Box<dyn Vmm>, VmmError> {
        use banger_proto::domain::VmmKind;
        Ok(match kind {
            VmmKind::Qemu => Box::new(Qemu {
                binary: self.qemu_binary.clone(),
                accel: Accel::choose(&self.qemu_accel, &self.qemu_binary, &self.state_dir)?,
                auto: matches!(self.qemu_accel.as_str(), "auto" | ""),
            }),
            VmmKind::Firecracker => Box::new(super::firecracker::Firecracker {
                binary: self.firecracker_binary.clone(),
                jail: self.jail.clone().map_err(VmmError::Spec)?,
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
    /// `auto` picks KVM when a probe of it ran a guest here (see
    /// [`super::accel`]), else TCG.
    pub fn choose(wanted: &str, qemu: &str, state_dir: &Path) -> Result<Accel, VmmError> {
        match wanted {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            "auto" | "" => Ok(if super::accel::kvm_verdict(qemu, state_dir).usable {
                Accel::Kvm
            } else {
                Accel::Tcg
            }),
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
    /// The accelerator was chosen by the probe (`auto`), not configured.
    pub auto: bool,
}

/// Where QEMU's own output goes, in the VM's directory.
const VMM_LOG: &str = "vmm.log";

/// How long one QMP answer may take.
const QMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Saving or loading a guest's state: memory-sized, at disk speed.
const MIGRATION_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);
/// QEMU's default (128 MiB/s) paces migrations meant for live guests; a
/// paused guest's state should go as fast as the disk takes it.
const MIGRATION_BANDWIDTH: u64 = 1 << 40;

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

    fn fatal_watch(&self, dir: &Path) -> Option<FatalWatch> {
        (self.accel == Accel::Kvm).then(|| FatalWatch {
            log: dir.join(VMM_LOG),
            marker: super::accel::KVM_INTERNAL_ERROR,
            retry_without_kvm: self.auto,
        })
    }

    fn pause<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        with_qmp(dir, QMP_TIMEOUT, |q| q.execute("stop", None).map(drop))
    }

    fn resume<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        with_qmp(dir, QMP_TIMEOUT, |q| q.execute("cont", None).map(drop))
    }

    fn save<'a>(&'a self, dir: &'a Path, into: &'a Path) -> BoxFuture<'a, Result<(), VmmError>> {
        let target = match shell_word(&into.join(QEMU_STATE_FILE)) {
            Ok(t) => t,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        // A migration into a file: QEMU 7.2 has `exec:` URIs, not `file:`.
        // The guest is paused, so one pass copies everything; zero pages
        // take a few bytes each.
        with_qmp(dir, QMP_TIMEOUT, move |q| {
            q.execute(
                "migrate-set-parameters",
                Some(serde_json::json!({ "max-bandwidth": MIGRATION_BANDWIDTH })),
            )?;
            q.execute(
                "migrate",
                Some(serde_json::json!({ "uri": format!("exec:cat > {target}") })),
            )?;
            await_migration(q, MIGRATION_LIMIT, "saving the VM's state")
        })
    }

    fn state_files(&self) -> &'static [&'static str] {
        &[QEMU_STATE_FILE]
    }

    fn configure<'a>(
        &'a self,
        spec: &'a BootSpec,
        alive: &'a (dyn Fn() -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            if spec.restore.is_none() {
                return Ok(());
            }
            // Loaded with `-incoming` and held (`-S`) until it is all in.
            let socket = spec.dir.join("qmp.sock");
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while !socket.exists() {
                if !alive() || tokio::time::Instant::now() > deadline {
                    return Err(VmmError::Api(
                        "QEMU exited before loading the snapshot".into(),
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            with_qmp(&spec.dir, QMP_TIMEOUT, |q| {
                await_migration(q, MIGRATION_LIMIT, "loading the snapshot")?;
                q.execute("cont", None).map(drop)
            })
            .await
        })
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
            args.push(match &nic.backend {
                NicBackend::Tap(tap) => format!(
                    "tap,id=net0,ifname={},script=no,downscript=no",
                    path(Path::new(tap))?
                ),
                // libslirp's defaults, written out: the guest config the
                // network service hands the agent assumes them.
                NicBackend::User => format!(
                    "user,id=net0,net={},host={},dns={},ipv6=off",
                    USER_NET.0, USER_NET.1, USER_NET.2
                ),
            });
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
        if let Some(snapshot) = &spec.restore {
            args.push("-S".into());
            args.push("-incoming".into());
            args.push(format!(
                "exec:cat < {}",
                shell_word(&snapshot.join(QEMU_STATE_FILE))?
            ));
        }
        Ok(LaunchSpec {
            program: self.binary.clone(),
            args,
            log: spec.dir.join(VMM_LOG),
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
                backend: NicBackend::Tap("bgtap3".into()),
                mac: "06:00:0a:d5:00:07".into(),
            }),
            restore: None,
            cpu_quota: None,
        }
    }

    #[test]
    fn qemu_command_boots_the_elf_kernel_with_both_disks_and_agent_ports() {
        let q = Qemu {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            auto: false,
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
        let mut user = spec("/vms/web");
        user.nic.as_mut().unwrap().backend = NicBackend::User;
        let line = q.command(&user).unwrap().args.join(" ");
        assert!(
            line.contains(
                "-netdev user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,ipv6=off"
            ),
            "{line}"
        );
        assert!(q.command(&spec("/vms/we,b")).is_err(), "commas are refused");
        assert!(!line.contains("-incoming"));
        let mut restoring = spec("/vms/web");
        restoring.restore = Some(PathBuf::from("/snaps/it's"));
        let line = q.command(&restoring).unwrap().args.join(" ");
        assert!(
            line.ends_with("-S -incoming exec:cat < '/snaps/it'\\''s/vmstate'"),
            "{line}"
        );
    }
}
