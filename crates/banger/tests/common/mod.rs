//! A banger daemon with its own BANGER_HOME, driven through the real CLI.

#![allow(dead_code)]

pub mod jailing;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Banger {
    pub home: tempfile::TempDir,
    daemon: Option<Child>,
    daemon_env: Vec<(String, PathBuf)>,
    /// The network namespace the daemon runs in (`ip netns exec`).
    netns: Option<String>,
    /// The unprivileged uid and gid the daemon runs as, if not root.
    user: Option<(u32, u32)>,
    /// The banger run (the build under test unless a test installs one).
    exe: PathBuf,
    /// Environment the CLI and daemon must not inherit from the test.
    unset: Vec<String>,
}

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_banger")
}

/// The root helper's own binary, built beside `banger` by the workspace
/// build (`cargo test --workspace` or `cargo build -p banger-helper`).
pub fn helper_exe() -> PathBuf {
    let path = Path::new(exe()).with_file_name("banger-root-helper");
    assert!(
        path.is_file(),
        "{} is not built; run `cargo build -p banger-helper` (the workspace test run builds it)",
        path.display()
    );
    path
}

impl Banger {
    /// A fresh home with a daemon running in the foreground of a child process.
    pub fn start() -> Banger {
        let mut b = Banger::without_daemon();
        b.start_daemon();
        b
    }

    pub fn without_daemon() -> Banger {
        Banger::with_home(tempfile::tempdir().unwrap())
    }

    /// A home whose name starts with `prefix` (a long one makes a deep home).
    pub fn with_home_prefix(prefix: &str) -> Banger {
        Banger::with_home(tempfile::Builder::new().prefix(prefix).tempdir().unwrap())
    }

    fn with_home(home: tempfile::TempDir) -> Banger {
        Banger {
            home,
            daemon: None,
            // Choosing an accelerator runs a probe guest at daemon start;
            // only the test of that choice needs it.
            daemon_env: vec![("BANGER_QEMU_ACCEL".into(), PathBuf::from("tcg"))],
            netns: None,
            user: None,
            exe: PathBuf::from(exe()),
            unset: Vec::new(),
        }
    }

    /// Like [`Banger::start`], with extra environment for the daemon.
    pub fn start_with_env(env: &[(&str, &Path)]) -> Banger {
        let mut b = Banger::without_daemon();
        b.daemon_env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_path_buf())));
        b.start_daemon();
        b
    }

    /// From now on the daemon runs inside network namespace `ns`, with VM
    /// networking on. Takes effect at the next `start_daemon`.
    pub fn move_to_netns(&mut self, ns: &str) {
        self.netns = Some(ns.to_string());
        self.daemon_env
            .push(("BANGER_NETWORK".into(), PathBuf::from("tap")));
    }

    /// From now on the CLI and the daemon are `exe` (an installed banger),
    /// which must find what it needs by itself: the test's own
    /// `BANGER_AGENT_BIN` is not passed on.
    pub fn use_installed(&mut self, exe: &Path) {
        self.exe = exe.to_path_buf();
        self.unset.push("BANGER_AGENT_BIN".into());
    }

    /// Drops extra environment `key` from the daemon's next start.
    pub fn remove_env(&mut self, key: &str) {
        self.daemon_env.retain(|(k, _)| k != key);
    }

    /// Extra environment for the daemon, from its next start.
    pub fn add_env(&mut self, key: &str, value: &Path) {
        self.daemon_env.push((key.into(), value.to_path_buf()));
    }

    /// From the next `start_daemon` on, the daemon runs as `uid` (gid the
    /// same, no supplementary groups) and owns the home; privileged work goes
    /// to the root helper at `helper` when one is given.
    pub fn run_as(&mut self, uid: u32, helper: Option<&Path>) {
        self.run_as_in_group(uid, uid, helper)
    }

    /// Like [`run_as`](Self::run_as), with `gid` as the daemon's group.
    pub fn run_as_in_group(&mut self, uid: u32, gid: u32, helper: Option<&Path>) {
        let home = self.home.path().display().to_string();
        let out = Command::new("chown")
            .args(["-R", &format!("{uid}:{gid}"), &home])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.user = Some((uid, gid));
        if let Some(socket) = helper {
            self.daemon_env
                .push(("BANGER_HELPER_SOCKET".into(), socket.to_path_buf()));
        }
    }

    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.path().join("daemon-test.log"))
            .unwrap();
        // Tests about networking opt in (inside a namespace of their own);
        // the rest never touch the host's network.
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        if let Some((uid, gid)) = self.user {
            // Distributions make /dev/net/tun 0666; this machine may not. A
            // 0666 node bound over it in the daemon's own mount namespace
            // (`ip netns exec` made one) stands in, changing nothing outside.
            let tun = self.home.path().join("tun");
            let bind = if self.netns.is_some() {
                format!(
                    "[ -e {t} ] || mknod -m 0666 {t} c 10 200; mount --bind {t} /dev/net/tun; ",
                    t = tun.display()
                )
            } else {
                String::new()
            };
            argv.extend([
                "sh".into(),
                "-c".into(),
                format!("{bind}exec setpriv --reuid={uid} --regid={gid} --clear-groups -- \"$@\""),
                "sh".into(),
            ]);
        }
        argv.push(self.exe.to_string_lossy().into_owned());
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        for key in &self.unset {
            command.env_remove(key);
        }
        let child = command
            .arg("daemon")
            .env("BANGER_HOME", self.home.path())
            .env("BANGER_NETWORK", "none")
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill_daemon(&mut self, signal: i32) {
        if let Some(mut child) = self.daemon.take() {
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    pub fn socket(&self) -> PathBuf {
        self.home.path().join("run/banger.sock")
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("daemon-test.log")).unwrap_or_default()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        for key in &self.unset {
            c.env_remove(key);
        }
        c.args(args)
            .env("BANGER_HOME", self.home.path())
            .env("BANGER_NETWORK", "none")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "banger {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and asserts failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "banger {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// `vm port-forward NAME SPEC --json` left running, and the address it
    /// listens on (its first line).
    pub fn port_forward(&self, name: &str, spec: &str) -> (Child, String) {
        let mut forward = self
            .cmd(&["vm", "port-forward", name, spec, "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(forward.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        let listening = event["listening"].as_str().unwrap().to_string();
        (forward, listening)
    }

    pub fn inspect(&self, name: &str) -> serde_json::Value {
        let out = self.ok(&["image", "inspect", name, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }
}

impl Drop for Banger {
    fn drop(&mut self) {
        self.kill_daemon(libc::SIGTERM);
        // A daemon the CLI auto-started is not our child: stop it through its pid.
        if let Ok(out) = Command::new(exe())
            .args(["doctor", "--json"])
            .env("BANGER_HOME", self.home.path())
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(pid) = text
                .split("reachable (pid ")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .and_then(|s| s.parse::<i32>().ok())
            {
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        // A test that panicked left its VMs running: their VMMs name files
        // under this home on their command lines. Idle TCG guests still eat
        // CPU and would slow every later test (and benchmark) on the machine.
        for pid in pids_naming(&[&self.home.path().to_string_lossy()]) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Other processes whose command line contains every one of `needles`.
pub fn pids_naming(needles: &[&str]) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline);
            needles.iter().all(|n| text.contains(n))
        })
        .collect()
}

/// Entries of a directory (empty when it does not exist).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The kernel package and agent the harness needs, or why the test cannot run.
pub fn vm_assets() -> Option<(PathBuf, PathBuf)> {
    let kernel = std::env::var_os("BANGER_TEST_KERNEL_DEB").map(PathBuf::from);
    let agent = std::env::var_os("BANGER_AGENT_BIN").map(PathBuf::from);
    match (kernel, agent) {
        (Some(k), Some(a)) if k.is_file() && a.is_file() => Some((k, a)),
        _ => {
            let msg = "real-VM tests need BANGER_TEST_KERNEL_DEB and BANGER_AGENT_BIN (scripts/test sets both)";
            assert!(std::env::var_os("CI").is_none(), "{msg}");
            eprintln!("skipping: {msg}");
            None
        }
    }
}

/// Starts `banger`'s daemon for real VMs: its own HOME (user keys come from
/// HOME/.ssh), QEMU under TCG, and the agent under test.
pub fn start_vm_daemon(banger: &mut Banger, agent: &Path) {
    start_with_agent(banger, agent);
}

/// [`start_vm_daemon`] leaving the accelerator to the daemon (`auto`).
pub fn start_vm_daemon_choosing_accel(banger: &mut Banger, agent: &Path) {
    banger.remove_env("BANGER_QEMU_ACCEL");
    start_with_agent(banger, agent);
}

fn start_with_agent(banger: &mut Banger, agent: &Path) {
    let home = banger.path("user-home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    banger.add_env("HOME", &home);
    banger.add_env("BANGER_AGENT_BIN", agent);
    banger.start_daemon();
}

/// A daemon for real VMs with the test kernel and busybox (pushed to
/// `registry` from a layout under `tmp`) pulled as `bb`.
pub fn busybox_vm_daemon(
    registry: &banger_testkit::registry::Registry,
    tmp: &Path,
    agent: &Path,
    kernel: &Path,
) -> Banger {
    let mut banger = Banger::without_daemon();
    start_vm_daemon(&mut banger, agent);
    add_busybox_and_kernel(&banger, registry, tmp, kernel);
    banger
}

/// Imports the test kernel into a running daemon and pulls busybox (pushed
/// to `registry` from a layout under `tmp`) as `bb`.
pub fn add_busybox_and_kernel(
    banger: &Banger,
    registry: &banger_testkit::registry::Registry,
    tmp: &Path,
    kernel: &Path,
) {
    banger_testkit::images::push_busybox(registry, &tmp.join("oci"), "busybox:latest");
    banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    banger.ok(&[
        "image",
        "pull",
        &registry.reference("busybox:latest"),
        "--name",
        "bb",
    ]);
}

/// The Debian minbase tarball scripts/test builds, or why the test cannot run.
pub fn debian_tar() -> Option<PathBuf> {
    let tar = std::env::var_os("BANGER_TEST_DEBIAN_TAR")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    if tar.is_none() {
        let msg = "needs BANGER_TEST_DEBIAN_TAR (scripts/test builds it with mmdebstrap)";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("skipping: {msg}");
    }
    tar
}

/// A daemon for real VMs with the Debian minbase image pulled as `debian`
/// and the test kernel imported; `None` (the test skips) without them.
pub struct DebianVms {
    pub banger: Banger,
    /// The image's own tarball, to compare the guest against.
    pub tar: PathBuf,
    _registry: banger_testkit::registry::Registry,
}

impl DebianVms {
    pub fn start() -> Option<DebianVms> {
        let (kernel, agent) = vm_assets()?;
        let tar = debian_tar()?;
        let registry = banger_testkit::registry::Registry::start();
        let mut banger = Banger::without_daemon();
        let mut layout = banger_testkit::layout::Layout::new(&banger.path("fixtures/oci"));
        let image = layout.image(
            &[(
                banger_testkit::layer::Compression::None,
                std::fs::read(&tar).unwrap(),
            )],
            "amd64",
        );
        layout.tag("t", &image);
        registry.push(&layout.dir, "t", "debian:bookworm", &[]);
        start_vm_daemon(&mut banger, &agent);
        banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
        let reference = registry.reference("debian:bookworm");
        banger.ok(&["image", "pull", &reference, "--name", "debian"]);
        Some(DebianVms {
            banger,
            tar,
            _registry: registry,
        })
    }
}

/// Runs `cmd` with `input` on its standard input; its output.
pub fn with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// A shell script's output.
pub fn sh(script: &str) -> Output {
    Command::new("sh").args(["-c", script]).output().unwrap()
}

/// A shell script that must succeed; its stdout.
pub fn must(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the test runs as root; if not, says why it skips (and fails
/// under CI, which runs as root).
pub fn root_or_skip(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{why} needs root");
    eprintln!("skipping: {why} needs root");
    false
}

/// A tmpfs of `size` mounted on `dir`, unmounted (lazily) when dropped,
/// however the test ends.
pub struct Mounted(PathBuf);

impl Mounted {
    pub fn tmpfs(dir: &Path, size: &str) -> Mounted {
        must(&format!(
            "mount -t tmpfs -o size={size} tmpfs {}",
            dir.display()
        ));
        Mounted(dir.to_path_buf())
    }

    /// A fresh xfs (it can reflink) of `size` on `dir`, backed by `file`.
    pub fn xfs(dir: &Path, file: &Path, size: &str) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        must(&format!(
            "truncate -s {size} {f} && mkfs.xfs -q {f} && mount -o loop {f} {d}",
            f = file.display(),
            d = dir.display()
        ));
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = sh(&format!("umount -l {}", self.0.display()));
    }
}

/// The daemon's peak memory (VmHWM), in KiB.
pub fn daemon_peak_kib(banger: &Banger) -> u64 {
    let pid = banger.daemon_pid().expect("the test's own daemon");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The busybox image pulled from `registry` and any ELF imported as kernel
/// `k`: enough to create VMs that never boot.
pub fn busybox_and_fake_kernel(banger: &Banger, registry: &banger_testkit::registry::Registry) {
    let dir = banger.path("fixtures");
    banger_testkit::images::push_busybox(registry, &dir.join("oci"), "busybox:latest");
    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);
    let fake = dir.join("vmlinux");
    std::fs::copy("/bin/true", &fake).unwrap();
    banger.ok(&["kernel", "import", fake.to_str().unwrap(), "--name", "k"]);
}
