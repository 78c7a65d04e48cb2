//! Firecracker through its jailer, end to end with the fake Firecracker and
//! the fake jailer (which does what the real 1.16 jailer does: chroot,
//! pivot_root, device nodes, cgroups, uid drop; `firecracker_real.rs`
//! holds them side by side). Once by a root daemon running the jailer
//! itself, once by a user's daemon through the root helper.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use banger_host::acl;
use banger_host::jail_ids::DEFAULT_JAIL_IDS;
use banger_testkit::registry::Registry;
use common::jailing::{alive, cgroup_dir, fakes, same_dir, vm_info, Helper, Reaper, USER};
use common::{must, Banger};
use serde_json::{json, Value};

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

/// The uid a process runs as (all four of real, effective, saved, fs).
fn uid_of(pid: u64) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|u| *u == uids[0]), "{uids:?}");
    uids[0]
}

/// What the jail of a running VM looks like, checked the same way for both
/// paths: the process chrooted in it as a uid of its own (not `user`'s,
/// whose daemon runs it, nor root's: red team round 3, item 6), every API
/// path inside it, the VM's files linked in and granted to that uid, the
/// jail's root granted to the user, its cgroup limits, its own log apart.
/// Returns the pid, the jail's root and its uid.
fn check_jail(banger: &Banger, vm: &str, user: u32, expected_root: &Path) -> (u64, PathBuf, u32) {
    let info = vm_info(banger, vm);
    let root = PathBuf::from(info["jail"].as_str().expect("a jailed VM says where"));
    assert_eq!(root, expected_root);
    let pid = info["pid"].as_u64().unwrap();
    assert_eq!(
        same_dir(Path::new(&format!("/proc/{pid}/root"))),
        same_dir(&root),
        "Firecracker runs chrooted in the jail"
    );
    let uid = uid_of(pid);
    assert!(
        DEFAULT_JAIL_IDS.contains(uid) && uid != user && uid != 0,
        "runs as uid {uid}, the jail's own"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let gids = status.lines().find(|l| l.starts_with("Gid:")).unwrap();
    assert!(
        gids.split_whitespace()
            .skip(1)
            .all(|g| g == uid.to_string()),
        "and its own gid: {gids}"
    );
    assert_eq!(std::fs::metadata(&root).unwrap().uid(), uid);
    assert_eq!(std::fs::metadata(root.join("dev/kvm")).unwrap().uid(), uid);
    if user != 0 {
        assert_eq!(acl::user_perm(&root, user), Some(acl::RWX));
    }
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
    // Still the user's files, the jail's uid granted them as it uses them.
    let work = std::fs::metadata(dir.join("work.ext4")).unwrap();
    assert_eq!(work.uid(), user);
    assert_eq!(acl::user_perm(&dir.join("work.ext4"), uid), Some(acl::RW));
    assert_eq!(acl::user_perm(&dir.join("initrd.cpio"), uid), Some(acl::R));
    let vmm_log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    assert!(vmm_log.contains("Running Firecracker"), "{vmm_log}");
    (pid, root, uid)
}

/// `vm run NAME` of a jailed Firecracker VM with a CPU quota (a cgroup of
/// its own), from the test's busybox and fake kernel.
fn jailed_run(name: &str) -> [&str; 11] {
    [
        "vm",
        "run",
        name,
        "--image",
        "busybox",
        "--kernel",
        "k",
        "--vmm",
        "firecracker",
        "--cpu-quota",
        "50",
    ]
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

    banger.ok(&jailed_run("fcj"));
    let fc_name = f.firecracker.file_name().unwrap();
    let jail = banger.path("state/jail").join(fc_name).join("fcj");
    let (pid, root, fcj_uid) = check_jail(&banger, "fcj", 0, &jail.join("root"));
    assert_eq!(vm_info(&banger, "fcj")["cpu_quota"], 50);
    // Its own cgroup, with the quota and a memory ceiling of the guest's
    // memory and the VMM's overhead (where the host has the controllers).
    let cpu = cgroup_of(pid, "cpu");
    let memory = cgroup_of(pid, "memory");
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

    // Stopped: the jail and its cgroup go, and the uid's grants with them;
    // started again: a fresh one.
    banger.ok(&["vm", "stop", "fcj"]);
    gone(&jail);
    for (controller, path) in [("cpu", &cpu), ("memory", &memory)] {
        if let Some(dir) = cgroup_dir(controller, path) {
            gone(&dir);
        }
    }
    let work = banger.path("state/vms/fcj/work.ext4");
    assert_eq!(acl::user_perm(&work, fcj_uid), None);
    if let Some(dir) = cgroup_dir("cpu", &cpu) {
        gone(&dir);
    }
    // The quota can change while it is stopped; the next jail has it.
    banger.ok(&["vm", "set", "fcj", "--cpu-quota", "30"]);
    banger.ok(&["vm", "start", "fcj"]);
    let (pid, _, fcj_uid) = check_jail(&banger, "fcj", 0, &root);
    assert_eq!(vm_info(&banger, "fcj")["cpu_quota"], 30);
    let cpu = cgroup_of(pid, "cpu");
    if let Some(dir) = cgroup_dir("cpu", &cpu) {
        let quota = std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
            .or_else(|_| std::fs::read_to_string(dir.join("cpu.max")))
            .unwrap();
        assert!(quota.starts_with("30000"), "{quota}");
    }

    // A snapshot is written inside the jail and moved out into banger's
    // snapshot; a fork resumes it in a jail of its own, from jail paths.
    banger.ok(&["vm", "snapshot", "fcj", "s1"]);
    let snap = banger.path("state/snapshots/s1");
    assert!(snap.join("vmstate").is_file() && snap.join("memory").is_file());
    assert!(!root.join("vmstate").exists() && !root.join("memory").exists());
    banger.ok(&["vm", "run", "fork", "--from", "s1"]);
    let fork_root = banger
        .path("state/jail")
        .join(f.firecracker.file_name().unwrap())
        .join("fork/root");
    assert_eq!(
        vm_info(&banger, "fork")["jail"],
        fork_root.display().to_string()
    );
    assert_eq!(
        calls(&fork_root)[0]["body"],
        json!({
            "snapshot_path": "/vmstate",
            "mem_backend": { "backend_type": "File", "backend_path": "/memory" },
            "vsock_override": { "uds_path": "/vsock.sock" },
            "resume_vm": true,
        })
    );
    assert_eq!(
        banger.ok(&["vm", "exec", "fork", "--", "echo", "forked"]),
        "fake-firecracker ran on fork: echo forked\n"
    );
    // Two VMs running at once never share a uid.
    let fork_pid = vm_info(&banger, "fork")["pid"].as_u64().unwrap();
    let fork_uid = uid_of(fork_pid);
    assert!(DEFAULT_JAIL_IDS.contains(fork_uid) && fork_uid != fcj_uid);
    banger.ok(&["vm", "rm", "-f", "fork"]);
    banger.ok(&["snapshot", "rm", "s1"]);
    gone(&fork_root);

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

    // Removed while it boots, at several moments: the jail's cgroups go
    // too (red team round 3, item 18: one in three left its memory cgroup).
    let parent = cpu.rsplit_once('/').map(|(p, _)| p.to_string()).unwrap();
    for wait_ms in [0u64, 40, 120] {
        let mut run = banger
            .cmd(&jailed_run("race"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(wait_ms));
        banger.ok(&["vm", "rm", "-f", "race"]);
        let _ = run.wait();
        let _ = banger.run(&["vm", "rm", "-f", "race"]);
        for controller in ["cpu", "memory"] {
            if let Some(dir) = cgroup_dir(controller, &parent) {
                gone(&dir.join("race"));
            }
        }
        gone(&banger.path("state/jail").join(fc_name).join("race"));
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
    let fc_name = fc.file_name().unwrap().to_str().unwrap();
    let jail = helper.jail(&banger.path("state"), fc_name, "web");
    let (pid, _, _) = check_jail(&banger, "web", USER, &jail.join("root"));
    assert_eq!(
        banger.ok(&["vm", "exec", "web", "--", "echo", "hi"]),
        "fake-firecracker ran on web: echo hi\n"
    );
    // What it uses is read from the jailed process and the VM's own files.
    let stats: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "stats", "web", "--json"])).unwrap();
    assert!(stats[0]["vmm_rss_bytes"].as_u64() > Some(0), "{stats}");
    assert!(stats[0]["cpu_percent"].is_number(), "{stats}");
    assert!(
        stats[0]["disks"].as_array().is_some_and(|d| !d.is_empty()),
        "{stats}"
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
    // A block device named as the old `banger-<vm>` and as the new name
    // would be, neither set up by the helper for this caller.
    let fake_dm = [
        "/dev/mapper/banger-x".to_string(),
        format!("/dev/mapper/banger-{USER}-{home_id}-x"),
    ];
    for node in &fake_dm {
        must(&format!("mkdir -p /dev/mapper && mknod {node} b 7 0"));
    }
    let refusals = [
        (
            json!({"op": "jail_launch", "home": home_id, "vm": "x", "firecracker": file,
                   "files": [], "console": file}),
            "is not a Firecracker this helper launches",
        ),
        // Root's files, in root's directories: never copied into a jail.
        (
            json!({"op": "jail_launch", "home": home_id, "vm": "x", "firecracker": "/etc/shadow",
                   "files": [], "console": file}),
            "is not a Firecracker this helper launches",
        ),
        (
            json!({"op": "jail_launch", "home": home_id, "vm": "x", "firecracker": "/usr/bin/python3",
                   "files": [], "console": file}),
            "is not a Firecracker this helper launches",
        ),
        (
            json!({"op": "jail_launch", "home": home_id, "vm": "x", "firecracker": fc,
                   "files": [{"path": fake_dm[0], "name": "root", "writable": true}],
                   "console": file}),
            "not a snapshot device this helper set up",
        ),
        (
            json!({"op": "jail_launch", "home": home_id, "vm": "x", "firecracker": fc,
                   "files": [{"path": fake_dm[1], "name": "root", "writable": true}],
                   "console": file}),
            "not a snapshot device this helper set up",
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
    ];
    let replies: Vec<_> = refusals
        .iter()
        .map(|(request, _)| helper.ask(USER, request.clone()))
        .collect();
    for node in &fake_dm {
        let _ = std::fs::remove_file(node);
    }
    for ((request, why), reply) in refusals.iter().zip(replies) {
        assert!(
            reply["refused"].as_str().unwrap_or_default().contains(why),
            "{request}: expected a refusal about `{why}`, got {reply}"
        );
    }
    assert!(!helper.jail(&banger.path("state"), fc_name, "x").exists());

    // A helper that restarts sweeps away jails whose Firecracker is gone
    // (here killed while the helper was down, as a reboot would).
    let mut helper = helper;
    helper.restart_after(|| {
        // SAFETY: kill(2) on the VM's Firecracker, checked above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    gone(&jail);
    assert_eq!(vm_info(&banger, "web")["state"], "stopped");
    banger.ok(&["vm", "start", "web"]);
    let pid = vm_info(&banger, "web")["pid"].as_u64().unwrap();
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
