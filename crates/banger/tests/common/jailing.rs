//! Jailed Firecracker in tests: the fake (or real) binaries, a root helper
//! with a jailer it trusts, and what tells a jail from outside.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{must, Banger};

/// The daemon's user in the helper tests.
pub const USER: u32 = 4251;

pub fn vm_info(banger: &Banger, name: &str) -> Value {
    let out = banger.ok(&["vm", "inspect", name, "--json"]);
    serde_json::from_str::<Value>(&out).unwrap()[0].clone()
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or_default()
            .trim_start()
            .starts_with('Z')
    })
}

/// The directory of a cgroup path in the v1 hierarchy of `controller`, or
/// the unified one, if it is mounted where it usually is.
pub fn cgroup_dir(controller: &str, path: &str) -> Option<PathBuf> {
    [
        format!("/sys/fs/cgroup/{controller}"),
        "/sys/fs/cgroup".to_string(),
    ]
    .into_iter()
    .map(|base| PathBuf::from(base).join(path.trim_start_matches('/')))
    .find(|d| d.is_dir())
}

/// A directory's identity: a process's root after pivot_root reads as `/`
/// through its link, but is the very directory of its jail.
pub fn same_dir(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Kills, when a test ends (or fails), whatever still runs chrooted in a
/// jail under `base` (`<base>/…/<fc>/<vm>/root`): a jailed VMM's command
/// line names nothing of the test's home.
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let out = must(&format!(
            "find {} -maxdepth 5 -type d -name root 2>/dev/null || true",
            self.0.display()
        ));
        let roots: Vec<_> = out.lines().filter_map(|r| same_dir(Path::new(r))).collect();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let root = same_dir(Path::new(&format!("/proc/{pid}/root")));
            if root.is_some_and(|r| roots.contains(&r)) {
                // SAFETY: kill(2) on a process chrooted in this test's jails.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

pub struct Bins {
    pub firecracker: PathBuf,
    pub jailer: PathBuf,
    pub agent: PathBuf,
}

pub fn fakes() -> Option<Bins> {
    if !super::root_or_skip("the jailer runs as root") {
        return None;
    }
    let get = |key: &str| {
        std::env::var_os(key)
            .map(PathBuf::from)
            .filter(|p| p.is_file())
    };
    match (
        get("FAKE_FIRECRACKER_BIN"),
        get("FAKE_JAILER_BIN"),
        get("BANGER_AGENT_BIN"),
    ) {
        (Some(firecracker), Some(jailer), Some(agent)) => Some(Bins {
            firecracker,
            jailer,
            agent,
        }),
        _ => {
            let msg = "needs FAKE_FIRECRACKER_BIN, FAKE_JAILER_BIN and BANGER_AGENT_BIN (scripts/test sets them)";
            assert!(std::env::var_os("CI").is_none(), "{msg}");
            eprintln!("skipping: {msg}");
            None
        }
    }
}

/// The root helper, serving [`USER`], with a jailer it trusts.
pub struct Helper {
    pub dir: tempfile::TempDir,
    pub trusted: PathBuf,
    jailer: PathBuf,
    /// The one Firecracker it launches.
    pub firecracker: PathBuf,
    home: PathBuf,
    child: Option<Child>,
}

impl Helper {
    /// Serving [`USER`] with `home` allowed, the jailer and Firecracker of
    /// `f` copied where root alone may change them.
    pub fn start(f: &Bins, home: &Path) -> Helper {
        let dir = tempfile::tempdir().unwrap();
        must(&format!("chmod 0755 {}", dir.path().display()));
        // Root's and writable by root alone, all the way up: what the
        // helper demands of a program it runs or hands to the jailer.
        let trusted = PathBuf::from(format!("/run/banger-test-{}", std::process::id()));
        must(&format!(
            "mkdir -p {t} && chmod 0755 {t} && cp {fc} {j} {t}/",
            t = trusted.display(),
            fc = f.firecracker.display(),
            j = f.jailer.display()
        ));
        let mut helper = Helper {
            jailer: trusted.join(f.jailer.file_name().unwrap()),
            firecracker: trusted.join(f.firecracker.file_name().unwrap()),
            dir,
            trusted,
            home: home.to_path_buf(),
            child: None,
        };
        helper.spawn();
        helper
    }

    fn spawn(&mut self) {
        let dir = self.dir.path();
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("helper.log"))
            .unwrap();
        let child = Command::new(super::helper_exe())
            .arg("--socket")
            .arg(dir.join("helper.sock"))
            .args(["--owner", &USER.to_string()])
            .arg("--allow-dir")
            .arg(&self.home)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--jailer")
            .arg(&self.jailer)
            .arg("--firecracker")
            .arg(&self.firecracker)
            .arg("--jail-dir")
            .arg(dir.join("jail"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "helper did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the helper outright, runs `meanwhile`, and starts it again.
    pub fn restart_after(&mut self, meanwhile: impl FnOnce()) {
        self.kill();
        meanwhile();
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The jail of `vm` of the state directory `state`, run by the
    /// Firecracker named `fc`.
    pub fn jail(&self, state: &Path, fc: &str, vm: &str) -> PathBuf {
        let home = banger_proto::jail::home_id(state);
        self.dir
            .path()
            .join(format!("jail/{USER}/{home}/{fc}/{vm}"))
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("helper.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("helper.log")).unwrap_or_default()
    }

    /// One request as `uid`; the reply.
    pub fn ask(&self, uid: u32, request: Value) -> Value {
        const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
sys.stdout.write(s.makefile("rb").readline().decode())
"#;
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                CLIENT,
            ])
            .arg(self.socket())
            .arg(request.to_string())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.trusted);
    }
}
