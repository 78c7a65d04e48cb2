//! Firecracker through its jailer, end to end with the fake Firecracker and
//! the fake jailer (which does what the real 1.16 jailer does: chroot,
//! pivot_root, device nodes, cgroups, uid drop; `firecracker_real.rs`
//! holds them side by side). Once by a root daemon running the jailer
//! itself, once by a user's daemon through the root helper.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use banger_testkit::registry::Registry;
use common::{must, Banger};
use serde_json::{json, Value};

/// The daemon's user in the helper test, and someone else.
const USER: u32 = 4251;

struct Fakes {
    firecracker: PathBuf,
    jailer: PathBuf,
    agent: PathBuf,
}

fn fakes() -> Option<Fakes> {
    if !common::root_or_skip("the jailer runs as root") {
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
        (Some(firecracker), Some(jailer), Some(agent)) => Some(Fakes {
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

fn vm_info(banger: &Banger, name: &str) -> Value {
    let out = banger.ok(&["vm", "inspect", name, "--json"]);
    serde_json::from_str::<Value>(&out).unwrap()[0].clone()
}

fn alive(pid: u32) -> bool {
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
fn cgroup_dir(controller: &str, path: &str) -> Option<PathBuf> {
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
fn same_dir(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Kills, when a test ends (or fails), whatever still runs chrooted in a
/// jail under `base` (`<base>/…/<fc>/<vm>/root`): a jailed VMM's command
/// line names nothing of the test's home.
struct Reaper(PathBuf);

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

fn calls(root: &Path) -> Vec<Value> {
    std::fs::read_to_string(root.join("fc.sock.calls"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The process's cgroup path in the v1 hierarchy of `controller`, or the
/// unified one.
fn cgroup_of(pid: u64, controller: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, names, path) = (f.next()?, f.next()?, f.next()?);
            (names.split(',').any(|n| n == controller) || names.is_empty())
                .then(|| path.to_string())
        })
        .unwrap_or_default()
}

/// What the jail of a running VM looks like, checked the same way for both
/// paths: the process chrooted in it as `uid`, every API path inside it,
/// the VM's files linked in, its cgroup limits, its own log apart.
fn check_jail(banger: &Banger, vm: &str, uid: u32, expected_root: &Path) -> (u64, PathBuf) {
    let info = vm_info(banger, vm);
    let root = PathBuf::from(info["jail"].as_str().expect("a jailed VM says where"));
    assert_eq!(root, expected_root);
    let pid = info["pid"].as_u64().unwrap();
    assert_eq!(
        same_dir(Path::new(&format!("/proc/{pid}/root"))),
        same_dir(&root),
        "Firecracker runs chrooted in the jail"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uids.split_whitespace()
            .skip(1)
            .all(|u| u == uid.to_string()),
        "runs as uid {uid}: {uids}"
    );
    assert_eq!(std::fs::metadata(&root).unwrap().uid(), uid);
    // Every path Firecracker was told is inside its jail.
    let c = calls(&root);
    let paths: Vec<&str> = c
        .iter()
        .flat_map(|call| {
            [
                "metrics_path",
                "kernel_image_path",
                "initrd_path",
                "path_on_host",
                "uds_path",
            ]
            .into_iter()
            .filter_map(|k| call["body"][k].as_str())
        })
        .collect();
    assert_eq!(
        paths,
        [
            "/metrics.json",
            "/vmlinux",
            "/initrd.cpio",
            "/image.disk",
            "/work.disk",
            "/upper.disk",
            "/vsock.sock"
        ]
    );
    // Linked, not copied: the jail's work disk is the VM's.
    let dir = PathBuf::from(info["dir"].as_str().unwrap());
    assert_eq!(
        std::fs::metadata(root.join("work.disk")).unwrap().ino(),
        std::fs::metadata(dir.join("work.ext4")).unwrap().ino()
    );
    let vmm_log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    assert!(vmm_log.contains("Running Firecracker"), "{vmm_log}");
    (pid, root)
}

fn gone(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} is still there",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_root_daemon_runs_firecracker_in_a_jail_and_leaves_nothing_behind() {
    let Some(f) = fakes() else { return };
    let registry = Registry::start();
    let mut banger = Banger::without_daemon();
    let _reaper = Reaper(banger.path("state/jail"));
    banger.add_env("BANGER_FIRECRACKER_BIN", &f.firecracker);
    banger.add_env("BANGER_JAILER_BIN", &f.jailer);
    banger.add_env("BANGER_AGENT_BIN", &f.agent);
    banger.start_daemon();
    let status: Value = serde_json::from_str(&banger.ok(&["daemon", "status", "--json"])).unwrap();
    assert!(
        status["jailer"]
            .as_str()
            .unwrap()
            .starts_with("on: jails under"),
        "{status}"
    );
    common::busybox_and_fake_kernel(&banger, &registry);
    // A quota needs the jailer, and QEMU has none.
    let err = banger.fails(&[
        "vm",
        "create",
        "q",
        "--image",
        "busybox",
        "--kernel",
        "k",
        "--cpu-quota",
        "50",
    ]);
    assert!(
        err.contains("--cpu-quota") && err.contains("--vmm firecracker"),
        "{err}"
    );

    banger.ok(&[
        "vm",
        "run",
        "fcj",
        "--image",
        "busybox",
        "--kernel",
        "k",
        "--vmm",
        "firecracker",
        "--cpu-quota",
        "50",
    ]);
    let fc_name = f.firecracker.file_name().unwrap();
    let jail = banger.path("state/jail").join(fc_name).join("fcj");
    let (pid, root) = check_jail(&banger, "fcj", 0, &jail.join("root"));
    assert_eq!(vm_info(&banger, "fcj")["cpu_quota"], 50);
    // Its own cgroup, with the quota and a memory ceiling of the guest's
    // memory and the VMM's overhead (where the host has the controllers).
    let cpu = cgroup_of(pid, "cpu");
    assert!(cpu.ends_with("/fcj") && cpu.contains("banger-"), "{cpu}");
    if let Some(dir) = cgroup_dir("cpu", &cpu) {
        let quota = std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
            .or_else(|_| std::fs::read_to_string(dir.join("cpu.max")))
            .unwrap();
        assert!(quota.starts_with("50000"), "{quota}");
    }
    assert_eq!(
        banger.ok(&["vm", "exec", "fcj", "--", "echo", "jailed"]),
        "fake-firecracker ran on fcj: echo jailed\n"
    );

    // Stopped: the jail and its cgroup go; started again: a fresh one.
    banger.ok(&["vm", "stop", "fcj"]);
    gone(&jail);
    if let Some(dir) = cgroup_dir("cpu", &cpu) {
        gone(&dir);
    }
    banger.ok(&["vm", "start", "fcj"]);
    let (pid, _) = check_jail(&banger, "fcj", 0, &root);

    // A daemon killed outright re-attaches to the jailed VM; `rm -f` then
    // ends it through its jail and removes everything.
    banger.kill_daemon(libc::SIGKILL);
    banger.start_daemon();
    assert_eq!(vm_info(&banger, "fcj")["state"], "running");
    assert_eq!(vm_info(&banger, "fcj")["pid"], pid);
    banger.ok(&["vm", "rm", "-f", "fcj"]);
    gone(&jail);
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || !alive(pid as u32));
    assert!(common::entries(&banger.path("state/jail-records")).is_empty());
}

/// The root helper, serving [`USER`], with a jailer it trusts.
struct Helper {
    dir: tempfile::TempDir,
    trusted: PathBuf,
    child: Child,
}

impl Helper {
    fn start(f: &Fakes, home: &Path) -> Helper {
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
        let log = std::fs::File::create(dir.path().join("helper.log")).unwrap();
        let child = Command::new(common::helper_exe())
            .arg("--socket")
            .arg(dir.path().join("helper.sock"))
            .args(["--owner", &USER.to_string()])
            .arg("--allow-dir")
            .arg(home)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--jailer")
            .arg(trusted.join(f.jailer.file_name().unwrap()))
            .arg("--jail-dir")
            .arg(dir.path().join("jail"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let helper = Helper {
            dir,
            trusted,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !helper.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "helper did not start: {}",
                helper.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        helper
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("helper.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("helper.log")).unwrap_or_default()
    }

    /// One request as `uid`; the reply.
    fn ask(&self, uid: u32, request: Value) -> Value {
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
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.trusted);
    }
}

#[test]
fn through_the_helper_a_users_firecracker_runs_jailed_as_that_user() {
    let Some(f) = fakes() else { return };
    let registry = Registry::start();
    let mut banger = Banger::without_daemon();
    let helper = Helper::start(&f, banger.home.path());
    let _reaper = Reaper(helper.dir.path().join("jail"));
    let fc = helper.trusted.join(f.firecracker.file_name().unwrap());
    banger.add_env("BANGER_FIRECRACKER_BIN", &fc);
    banger.add_env("BANGER_AGENT_BIN", &f.agent);
    banger.run_as(USER, Some(&helper.socket()));
    banger.start_daemon();
    common::busybox_and_fake_kernel(&banger, &registry);
    banger.ok(&[
        "vm",
        "run",
        "web",
        "--image",
        "busybox",
        "--kernel",
        "k",
        "--vmm",
        "firecracker",
    ]);
    let home_id = banger_proto::jail::home_id(&banger.path("state"));
    let jail = helper
        .dir
        .path()
        .join(format!("jail/{USER}/{home_id}"))
        .join(fc.file_name().unwrap())
        .join("web");
    let (pid, _) = check_jail(&banger, "web", USER, &jail.join("root"));
    assert_eq!(
        banger.ok(&["vm", "exec", "web", "--", "echo", "hi"]),
        "fake-firecracker ran on web: echo hi\n"
    );

    // The helper signals only what it launched for the caller who asks:
    // root, asking about the same VM name, reaches nothing of the user's.
    let reply = helper.ask(
        0,
        json!({"op": "jail_signal", "home": home_id, "vm": "web", "signal": 9}),
    );
    assert!(
        reply["refused"]
            .as_str()
            .unwrap_or_default()
            .contains("no jailed firecracker"),
        "{reply}"
    );
    assert!(alive(pid as u32));
    // What it launches and with what, checked before anything is made.
    let file = banger.path("state/vms/web/console.log");
    for (request, why) in [
        (
            json!({"op": "jail_launch", "home": home_id, "vm": "x", "firecracker": file,
                   "files": [], "console": file}),
            "must be owned by root",
        ),
        (
            json!({"op": "jail_launch", "home": home_id, "vm": "x", "firecracker": fc,
                   "files": [{"path": "/etc/shadow", "name": "shadow", "writable": false}],
                   "console": file}),
            "outside the helper's directories",
        ),
        (
            json!({"op": "jail_launch", "home": home_id, "vm": "x", "firecracker": fc,
                   "files": [{"path": file, "name": "../x", "writable": true}], "console": file}),
            "cannot be a file in the jail",
        ),
        (
            json!({"op": "jail_launch", "home": home_id, "vm": "x", "firecracker": fc,
                   "files": [], "console": file, "limits": {"cpu_quota": 1000000}}),
            "CPU quota",
        ),
        (
            json!({"op": "jail_launch", "home": "../..", "vm": "x", "firecracker": fc,
                   "files": [], "console": file}),
            "not a state directory id",
        ),
        (
            json!({"op": "jail_signal", "home": home_id, "vm": "web", "signal": 19}),
            "TERM or KILL",
        ),
    ] {
        let reply = helper.ask(USER, request.clone());
        assert!(
            reply["refused"].as_str().unwrap_or_default().contains(why),
            "{request}: expected a refusal about `{why}`, got {reply}"
        );
    }
    assert!(!helper
        .dir
        .path()
        .join(format!("jail/{USER}/{home_id}"))
        .join(fc.file_name().unwrap())
        .join("x")
        .exists());

    banger.ok(&["vm", "rm", "-f", "web"]);
    gone(&jail);
    assert!(!alive(pid as u32));
    // Nothing recorded as launched any more.
    let records = helper
        .dir
        .path()
        .join(format!("state/jails/{USER}/{home_id}"));
    assert!(
        common::entries(&records).is_empty(),
        "{:?}",
        common::entries(&records)
    );
}
