//! The reliability suite: banger under concurrency, crashes and full disks,
//! with a consistency check after every fault. What must hold each time:
//! nothing leaked (VMM processes, taps, routes, files, half-made VMs or
//! images), nothing lost (a VM that was running is running or cleanly
//! stopped, its data there; an operation can be redone), nothing let in.
//! It ends with a summary table (see docs/reliability.md).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use banger_testkit::images::push_busybox;
use banger_testkit::registry::Registry;
use common::{entries, must, sh, Banger};

/// One row of the summary.
struct Row {
    check: &'static str,
    operations: u32,
    faults: u32,
    leaks: u32,
}

#[derive(Default)]
struct Tally(Vec<Row>);

impl Tally {
    fn add(&mut self, check: &'static str, operations: u32, faults: u32, leaks: u32) {
        self.0.push(Row {
            check,
            operations,
            faults,
            leaks,
        });
    }

    /// Straight to stderr, past the test harness's capture, so every run
    /// (CI's included) shows it.
    fn print(&self) {
        use std::io::Write;
        let mut text = format!(
            "\n{:<52} {:>10} {:>8} {:>6}\n",
            "check", "operations", "faults", "leaks"
        );
        for r in &self.0 {
            text += &format!(
                "{:<52} {:>10} {:>8} {:>6}\n",
                r.check, r.operations, r.faults, r.leaks
            );
        }
        let (o, f, l) = self.0.iter().fold((0, 0, 0), |(o, f, l), r| {
            (o + r.operations, f + r.faults, l + r.leaks)
        });
        text += &format!("{:<52} {:>10} {:>8} {:>6}\n\n", "total", o, f, l);
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
}

/// Everything that must agree for one home; each disagreement is a leak,
/// described. `netns`: where its taps and routes live, if it has a network.
fn leaks(banger: &Banger, netns: Option<&str>) -> Vec<String> {
    let mut found = Vec::new();
    let home = banger.home.path().to_string_lossy().into_owned();
    let vms: serde_json::Value = serde_json::from_str(&banger.ok(&["vm", "ls", "--json"])).unwrap();
    let vms = vms.as_array().unwrap();
    let running: Vec<&serde_json::Value> = vms.iter().filter(|v| v["state"] == "running").collect();
    // VMM processes: exactly one per running VM, none for the rest.
    let vmms = common::pids_naming(&["qemu-system", &home]);
    let expected: Vec<u32> = running
        .iter()
        .map(|v| v["pid"].as_u64().unwrap() as u32)
        .collect();
    for pid in &vmms {
        if !expected.contains(pid) {
            found.push(format!("VMM pid {pid} belongs to no running VM"));
        }
    }
    for pid in &expected {
        if !vmms.contains(pid) {
            found.push(format!("running VM's pid {pid} is not a live VMM"));
        }
    }
    // Files: one directory per VM record, no run files for stopped VMs,
    // no scratch, image directories only for images.
    let names: Vec<String> = vms
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    for dir in entries(&banger.path("state/vms")) {
        if !names.contains(&dir) {
            found.push(format!("state/vms/{dir} has no VM record"));
        }
    }
    for v in vms.iter().filter(|v| v["state"] == "stopped") {
        let dir = Path::new(v["dir"].as_str().unwrap());
        for f in ["ctl.sock", "ssh.sock", "qmp.sock", "initrd.cpio"] {
            if dir.join(f).exists() {
                found.push(format!("{} of stopped VM {}", f, v["name"]));
            }
        }
    }
    for leftover in entries(&banger.path("state/tmp")) {
        found.push(format!("state/tmp/{leftover} left behind"));
    }
    let images: serde_json::Value =
        serde_json::from_str(&banger.ok(&["image", "ls", "--json"])).unwrap();
    let image_dirs: Vec<String> = images
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| {
            Path::new(i["rootfs_path"].as_str()?)
                .parent()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .collect();
    for dir in entries(&banger.path("state/images")) {
        if !image_dirs.contains(&dir) {
            found.push(format!("state/images/{dir} has no image record"));
        }
    }
    // Network: taps of running VMs exist and are theirs; routes only to
    // running VMs; nothing of another instance.
    if let Some(ns) = netns {
        let routes = must(&format!("ip -n {ns} route"));
        for v in vms {
            let Some(ip) = v["ip"].as_str() else { continue };
            let routed = routes.lines().any(|l| l.starts_with(&format!("{ip} ")));
            match (v["state"].as_str(), routed) {
                (Some("running"), false) => {
                    found.push(format!("running VM {} has no route", v["name"]))
                }
                (Some("stopped"), true) => {
                    found.push(format!("stopped VM {} is still routed", v["name"]))
                }
                _ => {}
            }
        }
        let links = must(&format!("ip -n {ns} -o link show"));
        let taps: Vec<&str> = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter(|n| banger_host::net::tap_instance(n).is_some())
            .collect();
        let used: Vec<&str> = running.iter().filter_map(|v| v["tap"].as_str()).collect();
        for tap in &used {
            if !taps.contains(tap) {
                found.push(format!("running VM's tap {tap} is gone"));
            }
        }
        let spare = taps.iter().filter(|t| !used.contains(t)).count();
        if spare > 2 {
            found.push(format!(
                "{spare} spare taps, more than the pool of 2: {taps:?}"
            ));
        }
    }
    found
}

/// Asserts nothing leaked; returns the count (0) for the tally.
fn check(banger: &Banger, netns: Option<&str>, when: &str) -> u32 {
    let found = leaks(banger, netns);
    assert!(
        found.is_empty(),
        "{when}: {found:#?}\n{}",
        banger.daemon_log()
    );
    found.len() as u32
}

fn run_parallel(banger: &Banger, args: &[Vec<String>]) -> Vec<std::process::Output> {
    let children: Vec<_> = args
        .iter()
        .map(|a| {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            banger
                .cmd(&a)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn all_ok(outs: &[std::process::Output], what: &str, banger: &Banger) {
    for o in outs {
        assert!(
            o.status.success(),
            "{what}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            banger.daemon_log()
        );
    }
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "ip netns pids {0} | xargs -r kill -9; ip netns del {0}",
            self.0
        ));
    }
}

#[test]
fn reliability_suite() {
    if !common::root_or_skip("the reliability suite") {
        return;
    }
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");
    let reference = registry.reference("busybox:latest");
    let mut tally = Tally::default();

    parallel_operations(&mut tally, &kernel, &agent, &reference);
    kill_points(&mut tally, &kernel, &agent, &reference);
    full_disks(&mut tally, &reference);
    hostile_guest(&mut tally, &kernel, &agent, &reference);

    tally.print();
    assert_eq!(tally.0.iter().map(|r| r.leaks).sum::<u32>(), 0);
}

fn new_banger(kernel: &Path, agent: &Path, reference: &str) -> Banger {
    let mut banger = Banger::without_daemon();
    common::start_vm_daemon(&mut banger, agent);
    banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    banger.ok(&["image", "pull", reference]);
    banger
}

/// Six VMs made, booted, stopped, restarted and removed all at once, with
/// networking, in a namespace of their own.
fn parallel_operations(tally: &mut Tally, kernel: &Path, agent: &Path, reference: &str) {
    let mut banger = new_banger(kernel, agent, reference);
    let ns = Netns(format!("bgrel{}", std::process::id() % 100_000));
    must(&format!(
        "ip netns add {0} && ip -n {0} link set lo up",
        ns.0
    ));
    banger.kill_daemon(libc::SIGTERM);
    banger.move_to_netns(&ns.0);
    banger.start_daemon();
    let names: Vec<String> = (1..=6).map(|i| format!("p{i}")).collect();
    let mut ops = 0;
    let mut leaks = 0;
    let each = |verb: &[&str], tail: &[&str]| -> Vec<Vec<String>> {
        names
            .iter()
            .map(|n| {
                let mut a = argv(verb);
                a.push(n.clone());
                a.extend(argv(tail));
                a
            })
            .collect()
    };
    let outs = run_parallel(
        &banger,
        &each(&["vm", "run"], &["--image", "busybox", "--memory", "128M"]),
    );
    all_ok(&outs, "parallel vm run", &banger);
    ops += 6;
    leaks += check(&banger, Some(&ns.0), "after 6 parallel runs");
    // Data written before a stop is there after the start.
    let outs = run_parallel(
        &banger,
        &names
            .iter()
            .map(|n| {
                argv(&[
                    "vm",
                    "exec",
                    n,
                    "--",
                    "sh",
                    "-c",
                    &format!("echo {n} > /work/mark && sync"),
                ])
            })
            .collect::<Vec<_>>(),
    );
    all_ok(&outs, "parallel exec", &banger);
    ops += 6;
    // Stops of half, execs on the other half, at once.
    let mut mixed: Vec<Vec<String>> = names[..3]
        .iter()
        .map(|n| argv(&["vm", "stop", n]))
        .collect();
    mixed.extend(
        names[3..]
            .iter()
            .map(|n| argv(&["vm", "exec", n, "--", "cat", "/work/mark"])),
    );
    all_ok(
        &run_parallel(&banger, &mixed),
        "stops beside execs",
        &banger,
    );
    ops += 6;
    leaks += check(&banger, Some(&ns.0), "after 3 stops beside 3 execs");
    let outs = run_parallel(&banger, &each(&["vm", "start"], &[]));
    all_ok(&outs, "parallel start", &banger);
    ops += 6;
    for n in &names {
        assert_eq!(
            banger
                .ok(&["vm", "exec", n, "--", "cat", "/work/mark"])
                .trim(),
            n.as_str(),
            "data synced before the stop"
        );
    }
    leaks += check(&banger, Some(&ns.0), "after 6 parallel starts");
    let outs = run_parallel(&banger, &each(&["vm", "restart"], &[]));
    all_ok(&outs, "parallel restart", &banger);
    ops += 6;
    leaks += check(&banger, Some(&ns.0), "after 6 parallel restarts");
    let outs = run_parallel(&banger, &each(&["vm", "rm", "-f"], &[]));
    all_ok(&outs, "parallel rm -f", &banger);
    ops += 6;
    leaks += check(&banger, Some(&ns.0), "after 6 parallel removals");
    tally.add(
        "6 VMs: run/exec/stop/start/restart/rm at once",
        ops,
        0,
        leaks,
    );
}

/// The daemon SIGKILLs itself at every step of create, start, stop, rm and
/// pull; a fresh daemon must find a consistent home and redo the operation.
fn kill_points(tally: &mut Tally, kernel: &Path, agent: &Path, reference: &str) {
    let mut banger = new_banger(kernel, agent, reference);
    let mut faults = 0;
    let mut ops = 0;
    let mut leaks = 0;
    let mut die_at = |banger: &mut Banger, step: &str, args: &[&str]| {
        banger.kill_daemon(libc::SIGTERM);
        banger.add_env("BANGER_TEST_KILL_AT", Path::new(step));
        banger.start_daemon();
        let before = banger.daemon_log().matches("kill point reached").count();
        let out = banger.run(args);
        let log = banger.daemon_log();
        assert!(
            !out.status.success() && log.matches("kill point reached").count() == before + 1,
            "{step}: the daemon did not die there: {}\n{log}",
            String::from_utf8_lossy(&out.stderr)
        );
        banger.kill_daemon(libc::SIGKILL);
        banger.remove_env("BANGER_TEST_KILL_AT");
        banger.start_daemon();
        faults += 1;
    };
    // create
    for step in ["dir", "root-disk", "work-disk", "host-key", "record"] {
        die_at(
            &mut banger,
            step,
            &["vm", "create", "c", "--image", "busybox"],
        );
        leaks += check(&banger, None, &format!("killed at create step {step}"));
        banger.ok(&["vm", "create", "c", "--image", "busybox"]);
        banger.ok(&["vm", "rm", "-f", "c"]);
        ops += 3;
    }
    // start
    banger.ok(&[
        "vm", "create", "s", "--image", "busybox", "--memory", "128M",
    ]);
    for step in [
        "initramfs",
        "network",
        "launch",
        "runtime",
        "configure",
        "agent",
        "ssh",
    ] {
        die_at(&mut banger, step, &["vm", "start", "s"]);
        leaks += check(&banger, None, &format!("killed at start step {step}"));
        banger.ok(&["vm", "start", "s"]);
        assert_eq!(
            banger.ok(&["vm", "exec", "s", "--", "hostname"]).trim(),
            "s"
        );
        banger.ok(&["vm", "stop", "s"]);
        ops += 4;
    }
    // stop
    for step in ["stop-kill", "stop-release"] {
        banger.ok(&["vm", "start", "s"]);
        die_at(&mut banger, step, &["vm", "stop", "-t", "2", "s"]);
        leaks += check(&banger, None, &format!("killed at stop step {step}"));
        banger.ok(&["vm", "stop", "s"]);
        ops += 3;
    }
    // rm
    for step in ["rm-record", "rm-files"] {
        banger.ok(&["vm", "create", "r", "--image", "busybox"]);
        die_at(&mut banger, step, &["vm", "rm", "-f", "r"]);
        leaks += check(&banger, None, &format!("killed at rm step {step}"));
        banger.ok(&["vm", "rm", "-f", "r"]);
        ops += 3;
    }
    // pull (under another name, so each is a fresh pull)
    for step in ["pull-download", "pull-ext4", "pull-move", "pull-record"] {
        die_at(
            &mut banger,
            step,
            &["image", "pull", reference, "--name", "again"],
        );
        leaks += check(&banger, None, &format!("killed at pull step {step}"));
        banger.ok(&["image", "pull", reference, "--name", "again"]);
        banger.ok(&["image", "rm", "again"]);
        ops += 3;
    }
    banger.ok(&["vm", "rm", "-f", "s"]);
    leaks += check(&banger, None, "after the kill points");
    tally.add(
        "daemon SIGKILLed at every step (20 steps)",
        ops,
        faults,
        leaks,
    );
}

/// Pulls and creates on a state filesystem with little room, at many
/// levels of free space: each succeeds or fails with a clear error, and
/// leaves nothing half made; with room again, both work.
fn full_disks(tally: &mut Tally, reference: &str) {
    let mut banger = Banger::without_daemon();
    let home = banger.home.path().to_path_buf();
    let _mounted = common::Mounted::tmpfs(&home, "160m");
    std::fs::create_dir_all(banger.path("config")).unwrap();
    // No early refusal: let the writes themselves meet ENOSPC.
    std::fs::write(
        banger.path("config/config.toml"),
        "[limits]\nmin_free_bytes = 0\n",
    )
    .unwrap();
    banger.start_daemon();
    let fake = banger.path("vmlinux");
    std::fs::copy("/bin/true", &fake).unwrap();
    banger.ok(&["kernel", "import", fake.to_str().unwrap(), "--name", "k"]);
    let filler = home.join("filler");
    let (mut ops, mut faults, mut leaks) = (0, 0, 0);
    // Every MiB up to 24 (past what a pull and a create write here) meets
    // ENOSPC at a different write: the blob, the tree, mkfs, the record, the
    // root disk copy, the work disk, the host key.
    for free_mib in (0u64..=24).chain([32]) {
        let _ = std::fs::remove_file(&filler);
        let avail = must(&format!(
            "df --output=avail -B1 {} | tail -1",
            home.display()
        ));
        let avail: u64 = avail.trim().parse().unwrap();
        let fill = avail.saturating_sub(free_mib << 20);
        must(&format!("fallocate -l {fill} {}", filler.display()));
        let pulled = banger.run(&["image", "pull", reference, "--name", "bb"]);
        ops += 1;
        if !pulled.status.success() {
            faults += 1;
            let err = String::from_utf8_lossy(&pulled.stderr);
            assert!(
                err.contains("full") || err.contains("free space") || err.contains("MiB left"),
                "a full disk is named: {err}"
            );
        }
        leaks += check(&banger, None, &format!("pull with {free_mib} MiB free"));
        if pulled.status.success() {
            let created = banger.run(&["vm", "create", "v", "--image", "bb", "--kernel", "k"]);
            ops += 1;
            if !created.status.success() {
                faults += 1;
                let err = String::from_utf8_lossy(&created.stderr);
                assert!(err.contains("space") || err.contains("full"), "{err}");
            }
            leaks += check(&banger, None, &format!("create with {free_mib} MiB free"));
            let _ = banger.run(&["vm", "rm", "-f", "v"]);
            let _ = banger.run(&["image", "rm", "-f", "bb"]);
        }
        leaks += check(&banger, None, &format!("cleanup with {free_mib} MiB free"));
    }
    std::fs::remove_file(&filler).unwrap();
    banger.ok(&["image", "pull", reference, "--name", "bb"]);
    banger.ok(&["vm", "create", "v", "--image", "bb", "--kernel", "k"]);
    banger.ok(&["vm", "rm", "-f", "v"]);
    ops += 3;
    leaks += check(&banger, None, "with room again");
    tally.add(
        "pull and create at 26 levels of free space",
        ops,
        faults,
        leaks,
    );
}

/// A guest that misbehaves: floods its console, writes junk into the
/// agent's control port, produces output faster than anyone reads; the
/// host stays bounded and the VM keeps working.
fn hostile_guest(tally: &mut Tally, kernel: &Path, agent: &Path, reference: &str) {
    let banger = new_banger(kernel, agent, reference);
    banger.ok(&["vm", "run", "h", "--image", "busybox", "--memory", "128M"]);
    let (mut ops, mut faults) = (1, 0);
    // Junk into the agent's own control port, from inside.
    let out = banger.run(&[
        "vm", "exec", "h", "--", "sh", "-c",
        "for p in /dev/vport*; do timeout 3 sh -c \"head -c 65536 /dev/urandom > $p\"; done; echo done",
    ]);
    ops += 1;
    faults += 1;
    let _ = out;
    assert_eq!(
        banger
            .ok(&["vm", "exec", "h", "--", "echo", "alive"])
            .trim(),
        "alive"
    );
    // A console flood: the log stays capped.
    banger.ok(&[
        "vm",
        "exec",
        "h",
        "--",
        "sh",
        "-c",
        "head -c 10000000 /dev/zero | tr '\\0' 'x' | fold -w 200 > /dev/console",
    ]);
    ops += 1;
    faults += 1;
    std::thread::sleep(Duration::from_secs(7));
    let dir = banger.path("state/vms/h");
    let log = std::fs::metadata(dir.join("console.log"))
        .map(|m| m.len())
        .unwrap_or(0);
    let rotated = std::fs::metadata(dir.join("console.log.1"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        rotated > 0,
        "the flooded console log was rotated ({log} bytes)"
    );
    assert!(log + rotated < 20 << 20, "console {log} + {rotated} bytes");
    // Output nobody reads fast: all of it arrives, the daemon stays small.
    let out = banger
        .cmd(&[
            "vm",
            "exec",
            "h",
            "--",
            "head",
            "-c",
            "33554432",
            "/dev/zero",
        ])
        .output()
        .unwrap();
    assert_eq!(out.stdout.len(), 32 << 20);
    ops += 1;
    // The VM survives a restart after all of it.
    banger.ok(&["vm", "restart", "h"]);
    assert_eq!(
        banger
            .ok(&["vm", "exec", "h", "--", "echo", "alive"])
            .trim(),
        "alive"
    );
    ops += 2;
    banger.ok(&["vm", "rm", "-f", "h"]);
    let leaks = check(&banger, None, "after the hostile guest");
    tally.add(
        "hostile guest: port junk, console flood, output",
        ops,
        faults,
        leaks,
    );
}
