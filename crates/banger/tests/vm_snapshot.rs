//! Real VMs (QEMU, TCG): pause and resume, snapshots of running and stopped
//! VMs, restore, forks that become machines of their own, and what taking a
//! snapshot refuses, survives and leaves behind when it fails. The two tests
//! run in parallel, each with its own daemon. (Forks' addresses, NAT and
//! `NAME.vm` are checked in vm_network.rs, which has a network to test in.)

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use banger_testkit::registry::Registry;
use common::Banger;

/// A daemon with the test kernel and busybox as `bb`.
fn setup(registry: &Registry, tmp: &Path, agent: &Path, kernel: &Path) -> Banger {
    common::busybox_vm_daemon(registry, tmp, agent, kernel)
}

fn state(banger: &Banger, vm: &str) -> String {
    let out = banger.ok(&["vm", "inspect", vm, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["state"].as_str().unwrap().to_string()
}

fn sh(banger: &Banger, vm: &str, script: &str) -> String {
    banger
        .ok(&["vm", "exec", vm, "--", "sh", "-c", script])
        .trim()
        .to_string()
}

fn ticks(banger: &Banger, vm: &str) -> u64 {
    sh(banger, vm, "wc -l < /root/ticks").parse().unwrap()
}

fn snapshots(banger: &Banger) -> serde_json::Value {
    serde_json::from_str(&banger.ok(&["snapshot", "ls", "--json"])).unwrap()
}

/// What is under the snapshots directory (finished or not).
fn snapshot_dirs(banger: &Banger) -> Vec<String> {
    common::entries(&banger.path("state/snapshots"))
}

#[test]
fn pause_snapshot_restore_and_fork() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut banger = setup(&registry, tmp.path(), &agent, &kernel);
    banger.ok(&["vm", "run", "p1", "--image", "bb"]);
    // A process running at snapshot time: a counter, a line a second.
    sh(
        &banger,
        "p1",
        "mkdir -p /root; (while :; do echo x >> /root/ticks; sleep 1; done) </dev/null \
         >/dev/null 2>&1 & echo $! > /root/loop.pid",
    );
    std::thread::sleep(Duration::from_secs(2));

    // Paused: the guest's clock stands still (its uptime loses the paused
    // time), commands are refused with the way out, and a daemon killed
    // meanwhile finds the VM paused.
    let uptime = |banger: &Banger| -> f64 {
        sh(banger, "p1", "cut -d' ' -f1 /proc/uptime")
            .parse()
            .unwrap()
    };
    let (host_before, guest_before) = (Instant::now(), uptime(&banger));
    banger.ok(&["vm", "pause", "p1"]);
    assert_eq!(state(&banger, "p1"), "paused");
    let refused = banger.fails(&["vm", "exec", "p1", "--", "true"]);
    assert!(refused.contains("banger vm resume p1"), "{refused}");
    banger.kill_daemon(libc::SIGKILL);
    banger.start_daemon();
    assert_eq!(state(&banger, "p1"), "paused", "after a daemon restart");
    std::thread::sleep(Duration::from_secs(5));
    let paused_for = host_before.elapsed().as_secs_f64();
    banger.ok(&["vm", "resume", "p1"]);
    let guest_ran = uptime(&banger) - guest_before;
    let host_ran = host_before.elapsed().as_secs_f64();
    assert!(
        guest_ran < host_ran - paused_for + 1.0,
        "the guest ran {guest_ran:.1} s of the {host_ran:.1} s, {paused_for:.1} s of which it was paused"
    );
    let after = ticks(&banger, "p1");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(ticks(&banger, "p1") > after, "the counter runs again");

    // A snapshot of the running VM; the VM goes on.
    let said = banger.ok(&["vm", "snapshot", "p1", "s1"]);
    assert!(said.contains("memory and disks"), "{said}");
    assert_eq!(state(&banger, "p1"), "running");
    let list = snapshots(&banger);
    assert_eq!(list[0]["name"], "s1");
    assert_eq!(list[0]["vm"], "p1");
    assert_eq!(list[0]["memory"], true);
    assert!(list[0]["size_bytes"].as_u64().unwrap() > 1 << 20);

    // Changes after it, then back: the file is gone and the counter that
    // was killed runs again; the guest's clock is now, not then.
    sh(
        &banger,
        "p1",
        "echo later > /root/after; kill $(cat /root/loop.pid)",
    );
    std::thread::sleep(Duration::from_secs(2));
    banger.ok(&["vm", "restore", "p1", "s1"]);
    assert_eq!(
        sh(
            &banger,
            "p1",
            "test -e /root/after && echo still; kill -0 $(cat /root/loop.pid) && echo alive"
        ),
        "alive"
    );
    let restored = ticks(&banger, "p1");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        ticks(&banger, "p1") > restored,
        "the counter runs after the restore"
    );
    let guest_now: i64 = sh(&banger, "p1", "date +%s").parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() <= 3,
        "guest clock {guest_now}, host {host_now}"
    );

    // Two forks, running at once, each its own machine: name, host key
    // (the daemon's connection pins each fork's own), random numbers; the
    // snapshot's processes run in both.
    let started = Instant::now();
    banger.ok(&["vm", "run", "f1", "--from", "s1"]);
    eprintln!("fork ready in {:?}", started.elapsed());
    banger.ok(&["vm", "run", "f2", "--from", "s1"]);
    let mut random = Vec::new();
    for fork in ["f1", "f2"] {
        assert_eq!(state(&banger, fork), "running");
        assert_eq!(sh(&banger, fork, "hostname"), fork);
        assert_eq!(
            sh(&banger, fork, "kill -0 $(cat /root/loop.pid) && echo alive"),
            "alive"
        );
        random.push(sh(
            &banger,
            fork,
            "head -c 32 /dev/urandom | od -An -tx1 -v",
        ));
    }
    assert_ne!(random[0], random[1], "two forks read the same random bytes");
    assert_eq!(sh(&banger, "p1", "hostname"), "p1");
    let keys: Vec<String> = ["p1", "f1", "f2"]
        .iter()
        .map(|vm| {
            common::must(&format!(
                "ssh-keygen -y -f {}",
                banger.path(&format!("state/vms/{vm}/host_key")).display()
            ))
        })
        .collect();
    assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);

    // Refusals, each changing nothing.
    let nope = banger.fails(&["vm", "restore", "p1", "nope"]);
    assert!(nope.contains("no snapshot named `nope`"), "{nope}");
    let other = banger.fails(&["vm", "restore", "f1", "s1"]);
    assert!(
        other.contains("taken of VM `p1`") && other.contains("--from s1"),
        "{other}"
    );
    let taken = banger.fails(&["vm", "snapshot", "p1", "s1"]);
    assert!(taken.contains("exists"), "{taken}");
    let kernels: serde_json::Value =
        serde_json::from_str(&banger.ok(&["kernel", "ls", "--json"])).unwrap();
    let in_use = banger.fails(&["kernel", "rm", kernels[0]["name"].as_str().unwrap()]);
    assert!(
        in_use.contains("snapshot s1") && in_use.contains("p1"),
        "{in_use}"
    );
    let bad = banger.fails(&["vm", "snapshot", "p1", "Bad_Name"]);
    assert!(bad.contains("invalid snapshot name"), "{bad}");
    assert_eq!(state(&banger, "f1"), "running");

    // A stopped VM's snapshot holds its disks, and restores by booting.
    banger.ok(&["vm", "stop", "f2"]);
    let said = banger.ok(&["vm", "snapshot", "f2", "s2"]);
    assert!(said.contains("disks only"), "{said}");
    banger.ok(&["vm", "start", "f2"]);
    sh(&banger, "f2", "echo later > /root/after-s2");
    let restored: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "restore", "f2", "s2", "--json"])).unwrap();
    assert_eq!(restored["state"], "running", "{restored}");
    assert_eq!(state(&banger, "f2"), "running");
    assert_eq!(
        sh(&banger, "f2", "ls /root/after-s2 2>/dev/null; hostname"),
        "f2"
    );

    // A fork not yet started keeps its snapshot from going, unless forced;
    // it then boots from the disks it copied.
    banger.ok(&["vm", "create", "f3", "--from", "s1"]);
    // It is the snapshot's machine until it has started once.
    let refused = banger.fails(&["vm", "set", "f3", "--memory", "256M"]);
    assert!(refused.contains("resumes snapshot `s1`"), "{refused}");
    let waiting = banger.fails(&["snapshot", "rm", "s1"]);
    assert!(
        waiting.contains("f3") && waiting.contains("-f"),
        "{waiting}"
    );
    banger.ok(&["snapshot", "rm", "-f", "s1", "s2"]);
    assert_eq!(snapshots(&banger), serde_json::json!([]));
    assert!(
        snapshot_dirs(&banger).is_empty(),
        "{:?}",
        snapshot_dirs(&banger)
    );
    banger.ok(&["vm", "start", "f3"]);
    assert_eq!(
        sh(
            &banger,
            "f3",
            "hostname; cat /root/loop.pid >/dev/null && echo disk"
        ),
        "f3\ndisk"
    );
    banger.ok(&["vm", "rm", "-f", "p1", "f1", "f2", "f3"]);
}

#[test]
fn a_failed_snapshot_leaves_the_vm_as_it_was_and_nothing_behind() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut banger = setup(&registry, tmp.path(), &agent, &kernel);
    banger.ok(&["vm", "run", "q1", "--image", "bb"]);
    let unchanged = |banger: &Banger, when: &str| {
        assert_eq!(state(banger, "q1"), "running", "{when}");
        assert_eq!(sh(banger, "q1", "hostname"), "q1", "{when}");
        assert_eq!(snapshots(banger), serde_json::json!([]), "{when}");
        assert!(
            snapshot_dirs(banger).is_empty(),
            "{when}: {:?}",
            snapshot_dirs(banger)
        );
    };

    // No room: refused before anything is written.
    if common::root_or_skip("mounting a small tmpfs") {
        let dir = banger.path("state/snapshots");
        std::fs::create_dir_all(&dir).unwrap();
        let full = common::Mounted::tmpfs(&dir, "1m");
        let refused = banger.fails(&["vm", "snapshot", "q1", "full"]);
        assert!(
            refused.contains("not enough space") && refused.contains("banger snapshot rm"),
            "{refused}"
        );
        drop(full);
        unchanged(&banger, "no space");
    }

    // A failure at each step is undone: the VM runs, its agent answers.
    for step in [
        "snapshot-dir",
        "snapshot-hold",
        "snapshot-pause",
        "snapshot-save",
        "snapshot-disks",
        "snapshot-record",
    ] {
        banger.kill_daemon(libc::SIGTERM);
        banger.add_env("BANGER_TEST_FAIL_AT", Path::new(step));
        banger.start_daemon();
        let failed = banger.fails(&["vm", "snapshot", "q1", "fp"]);
        assert!(failed.contains(step), "{step}: {failed}");
        unchanged(&banger, step);
    }
    banger.kill_daemon(libc::SIGTERM);
    banger.remove_env("BANGER_TEST_FAIL_AT");

    // The daemon killed while the state is being written: the VM was
    // paused and its agent held; the next daemon lets it go on, and the
    // half-written snapshot is gone.
    banger.add_env("BANGER_TEST_KILL_AT", Path::new("snapshot-save"));
    banger.start_daemon();
    banger.fails(&["vm", "snapshot", "q1", "killed"]);
    banger.kill_daemon(libc::SIGKILL);
    banger.remove_env("BANGER_TEST_KILL_AT");
    banger.start_daemon();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !banger
        .run(&["vm", "exec", "q1", "--", "true"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "{}", banger.daemon_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    unchanged(&banger, "after a daemon killed mid-snapshot");

    // One snapshot at a time per VM: a second is refused while the first
    // is being written (its disk copy made to take 5 s).
    banger.kill_daemon(libc::SIGTERM);
    banger.add_env("BANGER_TEST_SLOW_AT", Path::new("snapshot-disks"));
    banger.start_daemon();
    let mut first = banger
        .cmd(&["vm", "snapshot", "q1", "one"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let second = banger.fails(&["vm", "snapshot", "q1", "two"]);
    assert!(second.contains("busy"), "{second}");
    assert!(first.wait().unwrap().success());
    assert_eq!(snapshots(&banger)[0]["name"], "one");
    assert_eq!(snapshots(&banger).as_array().unwrap().len(), 1);
    banger.kill_daemon(libc::SIGTERM);
    banger.remove_env("BANGER_TEST_SLOW_AT");
    banger.start_daemon();

    // A paused VM's snapshot leaves it paused; resumed, it answers as itself.
    let paused: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "pause", "q1", "--json"])).unwrap();
    assert_eq!(paused["state"], "paused", "{paused}");
    banger.ok(&["vm", "snapshot", "q1", "pz"]);
    assert_eq!(state(&banger, "q1"), "paused");
    let resumed: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "resume", "q1", "--json"])).unwrap();
    assert_eq!(resumed["state"], "running", "{resumed}");
    assert_eq!(sh(&banger, "q1", "hostname"), "q1");
    // Resumed again: it runs, and is said so at once (red team round 3,
    // item 19: it hung 32 s, then blamed the agent).
    let started = Instant::now();
    let again = banger.run(&["vm", "resume", "q1"]);
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && said.contains("is not paused"),
        "{again:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sh(&banger, "q1", "hostname"), "q1");
    banger.ok(&["snapshot", "rm", "pz"]);
    // `--stop`: written, then a clean stop.
    banger.ok(&["vm", "snapshot", "q1", "last", "--stop"]);
    assert_eq!(state(&banger, "q1"), "stopped");
    assert_eq!(snapshots(&banger)[0]["memory"], true);
    banger.ok(&["snapshot", "rm", "last"]);
    banger.ok(&["snapshot", "rm", "one"]);
    banger.ok(&["vm", "rm", "-f", "q1"]);
}

#[test]
fn a_warm_image_starts_by_forking_its_template() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut banger = setup(&registry, tmp.path(), &agent, &kernel);
    let started_from = |banger: &Banger, vm: &str| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&banger.ok(&["vm", "inspect", vm, "--json"])).unwrap();
        v[0]["started_from"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let said = banger.ok(&["image", "warm", "bb"]);
    assert!(said.contains("bb is warm"), "{said}");
    let list = snapshots(&banger);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["template"], "bb");
    assert!(
        banger.ok(&["vm", "ls"]).trim().lines().count() == 1,
        "the VM booted to warm it is gone"
    );

    // The same settings fork the template: a machine of its own, with a
    // workspace synced in as at a boot.
    let ws = tmp.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("hello.txt"), "from the host\n").unwrap();
    banger.ok(&[
        "vm",
        "run",
        "w1",
        "--image",
        "bb",
        "--workspace",
        ws.to_str().unwrap(),
    ]);
    assert!(started_from(&banger, "w1").starts_with("template warm-"));
    assert_eq!(
        sh(&banger, "w1", "hostname; cat /work/hello.txt"),
        "w1\nfrom the host"
    );
    // Asked to, or with other settings, it boots.
    banger.ok(&["vm", "run", "w2", "--image", "bb", "--cold"]);
    assert_eq!(started_from(&banger, "w2"), "boot");
    banger.ok(&["vm", "run", "w3", "--image", "bb", "--memory", "256M"]);
    assert_eq!(started_from(&banger, "w3"), "boot");
    banger.ok(&["vm", "rm", "-f", "w2", "w3"]);

    // Another agent makes the template stale: boot, until warmed again.
    let newer = tmp.path().join("banger-agent");
    std::fs::copy(&agent, &newer).unwrap();
    let mut bytes = std::fs::read(&newer).unwrap();
    bytes.extend_from_slice(b"\0another build");
    std::fs::write(&newer, bytes).unwrap();
    banger.kill_daemon(libc::SIGTERM);
    banger.add_env("BANGER_AGENT_BIN", &newer);
    banger.start_daemon();
    banger.ok(&["vm", "run", "w4", "--image", "bb"]);
    assert_eq!(started_from(&banger, "w4"), "boot");
    let warm: serde_json::Value =
        serde_json::from_str(&banger.ok(&["image", "warm", "bb", "--json"])).unwrap();
    assert_eq!(warm["template"], "bb", "{warm}");
    assert_eq!(
        snapshots(&banger).as_array().unwrap().len(),
        1,
        "replaced, not added"
    );
    banger.ok(&["vm", "run", "w5", "--image", "bb"]);
    assert!(started_from(&banger, "w5").starts_with("template "));

    // The image's removal takes its template along.
    banger.ok(&["vm", "rm", "-f", "w1", "w4", "w5"]);
    banger.ok(&["image", "rm", "bb"]);
    assert_eq!(snapshots(&banger), serde_json::json!([]));
    assert!(snapshot_dirs(&banger).is_empty());
}
