//! Boot: early mounts, modules, the root switch, then the services.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_proto::agent::{
    driver, AgentReport, BootConfig, HostMessage, Transport, AGENT_PROTOCOL, BOOT_CONFIG_PATH,
    CTL_PORT_NAME, MODULES_ORDER_PATH, SSH_PORT_NAME, VSOCK_CTL_PORT, VSOCK_SSH_PORT,
};
use nix::mount::{mount, MsFlags};

use crate::console::log;
use crate::power;

pub fn main() {
    if let Err(e) = kernel_mounts("") {
        power::fail("mounts", &e);
    }
    let config = match read_config() {
        Ok(c) => c,
        Err(e) => power::fail("config", &e),
    };
    // The transport first: SSH comes up while the disk's driver loads.
    let transport = match config.transport {
        Transport::VirtioSerial => driver::SERIAL,
        Transport::Vsock => driver::VSOCK,
    };
    if let Err(e) = load_modules(&[driver::BUS, transport]) {
        power::fail("modules", &e);
    }
    let host_key = match russh::keys::PrivateKey::from_openssh(config.host_key.as_bytes()) {
        Ok(key) => key,
        Err(e) => power::fail("config", &format!("host key: {e}")),
    };
    let identity = crate::identity::State::new(host_key);
    let control = Control::start(&config.transport, identity.clone());
    control.report("modules", None);
    // Overlayfs needs no device: it loads from the start, alongside the
    // rest of the boot (under emulation a module costs tens of ms).
    let overlay = config
        .root_upper
        .is_some()
        .then(|| std::thread::spawn(|| load_modules(&[driver::OVERLAY])));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => power::fail("runtime", &e.to_string()),
    };
    runtime.block_on(async move {
        tokio::spawn(crate::reaper::run());
        // SSH comes up first, still on the initramfs, so the host's handshake
        // overlaps mounting the disks; commands wait for the root switch.
        let (root_tx, root_rx) = tokio::sync::watch::channel(false);
        let ssh = tokio::spawn(serve(config.clone(), control.clone(), identity, root_rx));
        // Fork and exec, warmed for the first command (see warm.rs).
        tokio::spawn(crate::warm::run());
        let (cfg, ctl) = (config.clone(), control.clone());
        let mounted = tokio::task::spawn_blocking(move || mount_disks(&cfg, &ctl, overlay))
            .await
            .unwrap_or_else(|e| Err(("root", e.to_string())));
        if let Err((stage, e)) = mounted {
            control.report("failed", Some(format!("{stage}: {e}")));
            power::fail(stage, &e);
        }
        let _ = root_tx.send(true);
        control.report("ready", None);
        log(&format!("ready, {} after the kernel started", uptime()));
        match ssh.await {
            Ok(Err(e)) => power::fail("ssh", &e),
            _ => power::fail("ssh", "the SSH server stopped"),
        }
    });
}

/// The guest's uptime, for the console ("1.23 s").
fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(|s| format!("{s} s")))
        .unwrap_or_else(|| "?".into())
}

/// The root switch, the hostname and the work disk.
fn mount_disks(
    config: &BootConfig,
    control: &Control,
    overlay: Option<std::thread::JoinHandle<Result<(), String>>>,
) -> Result<(), (&'static str, String)> {
    let mut drivers = vec![driver::DISK];
    if config.network.is_some() {
        drivers.push(driver::NET);
    }
    load_modules(&drivers).map_err(|e| ("modules", e))?;
    match &config.network {
        Some(net) => crate::net::configure(net).map_err(|e| ("network", e))?,
        // Loopback either way: guest services on 127.0.0.1 are what
        // `vm port-forward` reaches, with or without VM networking.
        None => {
            if let Err(e) = crate::net::loopback_up() {
                log(&e);
            }
        }
    }
    if let Some(loading) = overlay {
        let loaded = loading.join().unwrap_or_else(|_| Err("panicked".into()));
        loaded.map_err(|e| ("modules", e))?;
    }
    switch_root(config).map_err(|e| ("root", e))?;
    control.report("root", None);
    crate::prefetch::start();
    if let Some(net) = &config.network {
        if let Err(e) = crate::net::write_resolv_conf(net) {
            log(&e);
        }
    }
    if let Err(e) = nix::unistd::sethostname(&config.hostname) {
        log(&format!("cannot set hostname: {e}"));
    }
    mount_work(config).map_err(|e| ("work disk", e))
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!("mounting {fstype} on {target}: {e}")),
    }
}

/// /proc, /sys and /dev under `root` ("" for the initramfs itself).
fn kernel_mounts(root: &str) -> Result<(), String> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("proc", &format!("{root}/proc"), "proc", nosuid, None)?;
    mount_fs("sysfs", &format!("{root}/sys"), "sysfs", nosuid, None)?;
    mount_fs(
        "devtmpfs",
        &format!("{root}/dev"),
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
}

fn read_config() -> Result<BootConfig, String> {
    let text = std::fs::read_to_string(BOOT_CONFIG_PATH)
        .map_err(|e| format!("{BOOT_CONFIG_PATH}: {e}"))?;
    let config: BootConfig =
        serde_json::from_str(&text).map_err(|e| format!("{BOOT_CONFIG_PATH}: {e}"))?;
    if config.protocol != AGENT_PROTOCOL {
        return Err(format!(
            "boot config protocol {} but this agent speaks {AGENT_PROTOCOL}",
            config.protocol
        ));
    }
    Ok(config)
}

/// Loads the modules the manifest lists for `drivers`, each once. Threads
/// may load different drivers at once: a module two of them need is loaded
/// by whichever comes first, the kernel making the other wait (EEXIST).
fn load_modules(drivers: &[&str]) -> Result<(), String> {
    static LOADED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let Ok(manifest) = std::fs::read_to_string(MODULES_ORDER_PATH) else {
        return Ok(()); // Drivers built into the kernel.
    };
    let todo = {
        let loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
        modules_for(&manifest, drivers, &loaded)
    };
    for path in todo {
        let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        let params = CString::default();
        match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {
                LOADED.lock().unwrap_or_else(|p| p.into_inner()).push(path)
            }
            Err(e) => return Err(format!("loading {path}: {e}")),
        }
    }
    Ok(())
}

/// The manifest's modules needed by any of `drivers` and not yet loaded, in
/// its (dependency) order. A line naming no drivers is always needed.
fn modules_for(manifest: &str, drivers: &[&str], loaded: &[String]) -> Vec<String> {
    manifest
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| line.split_once(' ').unwrap_or((line, "")))
        .filter(|(_, needed_by)| {
            needed_by.is_empty() || needed_by.split(',').any(|d| drivers.contains(&d))
        })
        .map(|(path, _)| path.to_string())
        .filter(|path| !loaded.contains(path))
        .collect()
}

fn wait_for(path: &str, timeout: Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    while !Path::new(path).exists() {
        if std::time::Instant::now() > deadline {
            return Err(format!("{path} did not appear"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Mounts the root filesystem and makes it `/`, keeping /proc, /sys and /dev.
fn switch_root(config: &BootConfig) -> Result<(), String> {
    wait_for(&config.root_device, Duration::from_secs(10))?;
    tune_readahead(&config.root_device);
    match &config.root_upper {
        None => mount_fs(
            &config.root_device,
            "/newroot",
            "ext4",
            MsFlags::empty(),
            None,
        )?,
        Some(upper) => mount_overlay(&config.root_device, upper)?,
    }
    // Fresh mounts rather than moved ones: /dev, /proc and /sys never vanish
    // from under the threads already serving SSH while the root changes.
    kernel_mounts("/newroot")?;
    std::env::set_current_dir("/newroot").map_err(|e| e.to_string())?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving root: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| e.to_string())?;
    let _ = mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    );
    let _ = mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    let _ = mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    Ok(())
}

/// Mount options for the disks banger makes empty and sparse (the work disk,
/// an overlay's upper disk). Their inode tables were never written, and a
/// hole reads as zeros: the kernel's background zeroing of them would only
/// cost the guest CPU at boot and the host real blocks.
const FRESH_SPARSE_EXT4: &str = "noinit_itable";

/// The overlay root: the image read-only below, the VM's own disk above.
/// The two mounts stay in the initramfs, out of the guest's sight once the
/// root is switched; only the overlay is `/`.
fn mount_overlay(image: &str, upper_device: &str) -> Result<(), String> {
    mount_fs(image, "/lower", "ext4", MsFlags::MS_RDONLY, None)?;
    wait_for(upper_device, Duration::from_secs(10))?;
    mount_fs(
        upper_device,
        "/upper",
        "ext4",
        MsFlags::empty(),
        Some(FRESH_SPARSE_EXT4),
    )?;
    let (upper, work) = ("/upper/root", "/upper/work");
    if !Path::new(upper).exists() {
        // The merged `/` takes its owner, mode and times from the upper
        // directory: on the first boot they become the image's own.
        std::fs::create_dir(upper).map_err(|e| format!("mkdir {upper}: {e}"))?;
        copy_dir_attrs("/lower", upper)?;
    }
    std::fs::create_dir_all(work).map_err(|e| format!("mkdir {work}: {e}"))?;
    let options = format!("lowerdir=/lower,upperdir={upper},workdir={work}");
    mount_fs(
        "overlay",
        "/newroot",
        "overlay",
        MsFlags::empty(),
        Some(&options),
    )
    .map_err(|e| {
        if e.contains("ENODEV") {
            format!("{e}: the kernel has no overlayfs; create the VM with --root-mode copy")
        } else {
            e
        }
    })
}

fn copy_dir_attrs(from: &str, to: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(from).map_err(|e| format!("{from}: {e}"))?;
    std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid()))
        .map_err(|e| format!("chown {to}: {e}"))?;
    std::fs::set_permissions(
        to,
        std::os::unix::fs::PermissionsExt::from_mode(meta.mode() & 0o7777),
    )
    .map_err(|e| format!("chmod {to}: {e}"))?;
    let times = std::fs::FileTimes::new()
        .set_accessed(meta.accessed().map_err(|e| e.to_string())?)
        .set_modified(meta.modified().map_err(|e| e.to_string())?);
    std::fs::File::open(to)
        .and_then(|dir| dir.set_times(times))
        .map_err(|e| format!("setting the times of {to}: {e}"))
}

fn mount_work(config: &BootConfig) -> Result<(), String> {
    let (Some(device), Some(target)) = (&config.work_device, &config.work_mount) else {
        return Ok(());
    };
    wait_for(device, Duration::from_secs(10))?;
    tune_readahead(device);
    mount_fs(
        device,
        target,
        "ext4",
        MsFlags::empty(),
        Some(FRESH_SPARSE_EXT4),
    )
}

/// Reads ahead a MiB instead of the kernel's 128 KiB. A program's first run
/// faults its pages in with synchronous reads around each fault; on a virtual
/// disk (and above all under emulation) each read costs far more than its
/// bytes, so wider windows mean fewer of them: the first command after boot
/// ran about 12 ms sooner under TCG (median of 8 interleaved boots).
fn tune_readahead(device: &str) {
    let Some(name) = device.strip_prefix("/dev/") else {
        return;
    };
    let knob = format!("/sys/block/{name}/queue/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, "1024") {
        log(&format!("cannot set {knob}: {e}"));
    }
}

/// Reports boot stages to the host. The latest report is (re)sent whenever
/// the host (re)connects, so a restarted daemon learns the state at once.
#[derive(Clone)]
pub struct Control {
    latest: Arc<Mutex<Option<String>>>,
    changed: Arc<std::sync::Condvar>,
    identity: Arc<crate::identity::State>,
}

impl Control {
    fn start(transport: &Transport, identity: Arc<crate::identity::State>) -> Control {
        let control = Control {
            latest: Arc::default(),
            changed: Arc::default(),
            identity,
        };
        let worker = control.clone();
        let transport = transport.clone();
        std::thread::spawn(move || worker.run(transport));
        control
    }

    pub fn report(&self, stage: &str, error: Option<String>) {
        let report = AgentReport {
            protocol: AGENT_PROTOCOL,
            version: env!("CARGO_PKG_VERSION").to_string(),
            stage: stage.to_string(),
            error,
            identities: self.identity.taken(),
        };
        let mut line = serde_json::to_string(&report).expect("reports serialise");
        line.push('\n');
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(line);
        self.changed.notify_all();
    }

    fn run(&self, transport: Transport) {
        // Nobody listens on the host between a boot and a restore or a
        // daemon's next question: try again, less often the longer it lasts.
        let mut pause = Duration::from_millis(50);
        loop {
            let fd = match &transport {
                Transport::VirtioSerial => crate::transport::open_port(CTL_PORT_NAME),
                Transport::Vsock => crate::transport::vsock_connect_host(VSOCK_CTL_PORT),
            };
            match fd {
                Ok(fd) => {
                    pause = Duration::from_millis(50);
                    self.serve(&transport, fd)
                }
                Err(_) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn serve(&self, transport: &Transport, fd: OwnedFd) {
        let raw = fd.as_raw_fd();
        // The host's messages come in on the same stream, read by a thread
        // of their own (its own descriptor: it outlives a closed connection).
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Ok(reader) = fd.try_clone() {
            let (control, transport, closed) = (self.clone(), transport.clone(), closed.clone());
            std::thread::spawn(move || {
                control.read_messages(&transport, reader);
                closed.store(true, std::sync::atomic::Ordering::SeqCst);
                control.changed.notify_all();
            });
        }
        let mut sent: Option<String> = None;
        loop {
            // A vsock connection the host closed (a restore resets them all):
            // connect again, to whoever listens now.
            if closed.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let connected = match transport {
                Transport::VirtioSerial => crate::transport::host_connected(raw),
                Transport::Vsock => true,
            };
            if !connected {
                sent = None;
            }
            let latest = self
                .latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if connected && latest.is_some() && latest != sent {
                let line = latest.clone().unwrap_or_default();
                // SAFETY: writing a buffer we own to our descriptor.
                let n = unsafe { libc::write(raw, line.as_ptr().cast(), line.len()) };
                if n < 0 && matches!(transport, Transport::Vsock) {
                    return; // Reconnect.
                }
                sent = latest;
            }
            let guard = self.latest.lock().unwrap_or_else(|p| p.into_inner());
            let _ = self.changed.wait_timeout(guard, Duration::from_millis(50));
        }
    }

    /// Reads the host's messages, a JSON line each, and acts on them.
    fn read_messages(&self, transport: &Transport, fd: OwnedFd) {
        let raw = fd.as_raw_fd();
        let mut line: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let mut pfd = libc::pollfd {
                fd: raw,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 200) };
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                let retry = n < 0
                    && matches!(
                        std::io::Error::last_os_error().kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    );
                if !retry && matches!(transport, Transport::Vsock) {
                    return; // The connection is gone; the next one gets a reader.
                }
                // A virtio-serial port without a host reads as EOF: whatever
                // a departed host half-sent is dropped.
                if n == 0 {
                    line.clear();
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            line.extend_from_slice(&buf[..n as usize]);
            while let Some(end) = line.iter().position(|b| *b == b'\n') {
                let message: Vec<u8> = line.drain(..=end).collect();
                self.handle(&message);
            }
            if line.len() > 1 << 20 {
                line.clear();
            }
        }
    }

    fn handle(&self, message: &[u8]) {
        match serde_json::from_slice::<HostMessage>(message) {
            Ok(HostMessage::Identity(identity)) => match self.identity.apply(&identity) {
                Ok(()) => {
                    log(&format!("took the identity of {}", identity.hostname));
                    self.report("ready", None);
                }
                Err(e) => {
                    log(&format!("cannot take a new identity: {e}"));
                    self.report("failed", Some(format!("identity: {e}")));
                }
            },
            Err(e) => log(&format!("unreadable message from the host: {e}")),
        }
    }
}

async fn serve(
    config: BootConfig,
    control: Control,
    identity: Arc<crate::identity::State>,
    root: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let parse = |keys: &[String]| crate::ssh::parse_keys(keys.iter().map(String::as_str));
    let authorized = parse(&config.authorized_keys);
    let user_keys = std::sync::RwLock::new(parse(&config.user_keys));
    let image_env = config
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let shared = Arc::new(crate::ssh::Shared {
        authorized,
        user_keys,
        image_env,
        root,
        identity,
        control: control.clone(),
    });
    // Plain `ssh` over the VM network too, keys the only way in; without a
    // network, on loopback, where `banger vm dial NAME 22` (ssh's
    // ProxyCommand) reaches it through the host's SSH session.
    let listen = if config.network.is_some() {
        "0.0.0.0"
    } else {
        "127.0.0.1"
    };
    match tokio::net::TcpListener::bind((listen, 22)).await {
        Ok(listener) => {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    spawn_session(stream, &shared);
                }
            });
        }
        Err(e) => log(&format!("cannot listen on TCP port 22: {e}")),
    }
    match config.transport {
        Transport::VirtioSerial => {
            let fd = crate::transport::open_port(SSH_PORT_NAME).map_err(|e| e.to_string())?;
            let raw = fd.as_raw_fd();
            control.report("ssh", None);
            let stream = crate::transport::FdStream::new(fd).map_err(|e| e.to_string())?;
            let stream = Arc::new(tokio::sync::Mutex::new(stream));
            loop {
                // One SSH connection at a time: the host's. A new one starts
                // whenever the host reconnects (a restarted daemon).
                crate::transport::wait_for_host(raw).await;
                let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let session = SharedStream(stream.clone(), ended.clone());
                let handler = crate::ssh::Handler::new(shared.clone());
                match russh::server::run_stream(shared.ssh_config(), session, handler).await {
                    Ok(running) => {
                        let _ = running.await;
                    }
                    Err(e) => log(&format!("ssh session failed to start: {e}")),
                }
                // The port read as ended: its host left with nothing unread,
                // and a host there now is a new one (a daemon restarted while
                // the guest was paused connects before the guest sees the
                // old one go) whose session starts at once.
                if ended.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                // Let a disconnect settle before waiting for the next host.
                while crate::transport::host_connected(raw) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let stale = crate::transport::discard_stale(raw);
                if stale > 0 {
                    log(&format!(
                        "discarded {stale} bytes the last host left unread"
                    ));
                }
            }
        }
        Transport::Vsock => {
            let listener = crate::transport::vsock_listen(VSOCK_SSH_PORT)
                .map_err(|e| format!("vsock listen: {e}"))?;
            let listener = crate::transport::register(listener).map_err(|e| e.to_string())?;
            control.report("ssh", None);
            loop {
                let conn = crate::transport::accept(&listener)
                    .await
                    .map_err(|e| e.to_string())?;
                let Ok(stream) = crate::transport::FdStream::new(conn) else {
                    continue;
                };
                spawn_session(stream, &shared);
            }
        }
    }
}

/// Serves one SSH connection on its own task, for transports that accept many.
fn spawn_session<S>(stream: S, shared: &Arc<crate::ssh::Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handler = crate::ssh::Handler::new(shared.clone());
    let config = shared.ssh_config();
    tokio::spawn(async move {
        if let Ok(running) = russh::server::run_stream(config, stream, handler).await {
            let _ = running.await;
        }
    });
}

/// The port stream outlives each SSH session, which needs ownership of one.
/// It also notes reading the end of the stream: the host went away.
struct SharedStream(
    Arc<tokio::sync::Mutex<crate::transport::FdStream>>,
    Arc<std::sync::atomic::AtomicBool>,
);

impl tokio::io::AsyncRead for SharedStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match self.0.try_lock() {
            Ok(mut s) => {
                let read = std::pin::Pin::new(&mut *s).poll_read(cx, buf);
                if matches!(read, std::task::Poll::Ready(Ok(()))) && buf.filled().len() == before {
                    self.1.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                read
            }
            Err(_) => {
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        }
    }
}

impl tokio::io::AsyncWrite for SharedStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.0.try_lock() {
            Ok(mut s) => std::pin::Pin::new(&mut *s).poll_write(cx, data),
            Err(_) => {
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_each_drivers_closure_once_in_manifest_order() {
        let manifest = "/m/virtio_ring.ko virtio_mmio,virtio_console,virtio_blk\n\
                        /m/virtio_mmio.ko virtio_mmio\n\
                        /m/virtio_console.ko virtio_console\n\
                        /m/vsock.ko vmw_vsock_virtio_transport\n\
                        /m/virtio_blk.ko virtio_blk\n\
                        /m/old-style.ko\n";
        let first = modules_for(manifest, &[driver::BUS, driver::SERIAL], &[]);
        assert_eq!(
            first,
            [
                "/m/virtio_ring.ko",
                "/m/virtio_mmio.ko",
                "/m/virtio_console.ko",
                "/m/old-style.ko"
            ]
        );
        assert_eq!(
            modules_for(manifest, &[driver::DISK], &first),
            ["/m/virtio_blk.ko"]
        );
        assert!(modules_for("", &[driver::DISK], &[]).is_empty());
    }
}
