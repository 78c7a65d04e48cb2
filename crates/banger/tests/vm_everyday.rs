//! Real VMs (QEMU, TCG) through the everyday commands: `vm stats` against a
//! guest doing known work, `vm set` changing what a VM boots with (and
//! every refusal), `vm run … -- CMD` with the image's configuration. The
//! tests run in parallel, each with its own daemon.

mod common;

use std::path::Path;
use std::time::Duration;

use banger_testkit::images::push_busybox;
use banger_testkit::registry::Registry;
use common::Banger;

/// A daemon with the test kernel and busybox as `bb`.
fn setup(registry: &Registry, tmp: &Path, agent: &Path, kernel: &Path) -> Banger {
    push_busybox(registry, &tmp.join("oci"), "busybox:latest");
    let mut banger = Banger::without_daemon();
    common::start_vm_daemon(&mut banger, agent);
    banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    banger.ok(&[
        "image",
        "pull",
        &registry.reference("busybox:latest"),
        "--name",
        "bb",
    ]);
    banger
}

fn sh(banger: &Banger, vm: &str, script: &str) -> String {
    banger
        .ok(&["vm", "exec", vm, "--", "sh", "-c", script])
        .trim()
        .to_string()
}

fn stats(banger: &Banger, vm: &str) -> serde_json::Value {
    let out = banger.ok(&["vm", "stats", vm, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

fn disk<'a>(stats: &'a serde_json::Value, which: &str) -> &'a serde_json::Value {
    stats["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == which)
        .unwrap()
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

const MIB: u64 = 1 << 20;

#[test]
fn stats_and_set() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let banger = setup(&registry, tmp.path(), &agent, &kernel);
    banger.ok(&[
        "vm",
        "run",
        "s1",
        "--image",
        "bb",
        "--vcpus",
        "1",
        "--memory",
        "256M",
        "--work-disk",
        "1G",
    ]);

    // What the host and the guest say.
    let s = stats(&banger, "s1");
    assert_eq!(s["state"], "running");
    assert!(u(&s["vmm_rss_bytes"]) > 16 * MIB, "{s}");
    let total = u(&s["guest_memory"]["total_bytes"]);
    assert!(total > 200 * MIB && total <= 256 * MIB, "{s}");
    assert!(u(&s["guest_memory"]["used_bytes"]) < total);
    assert!(s["load"].as_array().unwrap().len() == 3, "{s}");
    assert!(s["uptime_secs"].as_u64().is_some(), "{s}");
    let work = disk(&s, "work");
    assert_eq!(work["guest_path"], "/work");
    assert_eq!(u(&work["size_bytes"]), 1 << 30);
    let work_total = u(&work["fs_total_bytes"]);
    assert!(work_total > 900 * MIB && work_total <= 1 << 30, "{work}");
    assert!(u(&disk(&s, "root")["fs_total_bytes"]) > 0);

    // A CPU burner shows as most of the one vCPU.
    sh(
        &banger,
        "s1",
        "(while :; do :; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/burn.pid",
    );
    stats(&banger, "s1");
    std::thread::sleep(Duration::from_millis(1500));
    let busy = stats(&banger, "s1");
    let cpu = busy["cpu_percent"].as_f64().unwrap();
    assert!(cpu > 50.0, "the burner shows: {cpu}%");
    sh(&banger, "s1", "kill $(cat /tmp/burn.pid)");

    // A 100 MB file shows in the guest's use and on the host.
    let before = stats(&banger, "s1");
    sh(
        &banger,
        "s1",
        "dd if=/dev/urandom of=/work/big bs=1M count=100 2>/dev/null; sync",
    );
    let after = stats(&banger, "s1");
    let grew = |field: &str| {
        u(&disk(&after, "work")[field]).saturating_sub(u(&disk(&before, "work")[field]))
    };
    assert!(grew("fs_used_bytes") >= 95 * MIB, "{after}");
    assert!(grew("allocated_bytes") >= 95 * MIB, "{after}");
    let table = banger.ok(&["vm", "stats"]);
    assert!(table.starts_with("NAME") && table.contains("s1"), "{table}");

    // Refusals change nothing: the VM keeps running with what it has.
    let refused = banger.fails(&["vm", "set", "s1", "--vcpus", "2"]);
    assert!(
        refused.contains("banger vm stop s1") && refused.contains("--restart"),
        "{refused}"
    );
    let refused = banger.fails(&["vm", "set", "s1", "--work-disk", "512M", "--restart"]);
    assert!(refused.contains("only grow"), "{refused}");
    let refused = banger.fails(&["vm", "set", "s1", "--restart"]);
    assert!(refused.contains("nothing to change"), "{refused}");
    let refused = banger.fails(&["vm", "set", "s1", "--vcpus", "999", "--restart"]);
    assert!(refused.contains("out of range"), "{refused}");
    let refused = banger.fails(&["vm", "set", "s1", "--memory", "100000G", "--restart"]);
    assert!(refused.contains("out of range"), "{refused}");
    let refused = banger.fails(&["vm", "set", "s1", "--work-disk", "1000T", "--restart"]);
    assert!(
        refused.contains("free space") || refused.contains("out of range"),
        "{refused}"
    );
    assert_eq!(sh(&banger, "s1", "nproc"), "1");

    // Changed with a restart: the guest sees every new size, files kept.
    let set = banger.ok(&[
        "vm",
        "set",
        "s1",
        "--vcpus",
        "2",
        "--memory",
        "384M",
        "--work-disk",
        "2G",
        "--disk",
        "6G",
        "--restart",
        "--json",
    ]);
    let info: serde_json::Value = serde_json::from_str(&set).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_mib"], 384);
    assert_eq!(info["disk_bytes"], 6u64 << 30);
    assert_eq!(sh(&banger, "s1", "nproc"), "2");
    let s = stats(&banger, "s1");
    let total = u(&s["guest_memory"]["total_bytes"]);
    assert!(total > 320 * MIB && total <= 384 * MIB, "{s}");
    let work_total = u(&disk(&s, "work")["fs_total_bytes"]);
    assert!(work_total > 1900 * MIB && work_total <= 2 << 30, "{s}");
    let root_total = u(&disk(&s, "root")["fs_total_bytes"]);
    assert!(root_total > 5 << 30, "{s}");
    assert_eq!(
        sh(&banger, "s1", "wc -c < /work/big"),
        (100 * MIB).to_string()
    );

    // A stopped VM is changed without asking, and boots so.
    banger.ok(&["vm", "stop", "s1"]);
    let stopped = stats(&banger, "s1");
    assert_eq!(stopped["state"], "stopped");
    assert!(stopped.get("cpu_percent").is_none() && stopped.get("guest_memory").is_none());
    assert_eq!(u(&disk(&stopped, "work")["size_bytes"]), 2 << 30);
    banger.ok(&["vm", "set", "s1", "--memory", "320M"]);
    banger.ok(&["vm", "start", "s1"]);
    let total = u(&stats(&banger, "s1")["guest_memory"]["total_bytes"]);
    assert!(total > 260 * MIB && total <= 320 * MIB, "{total}");
    banger.ok(&["vm", "rm", "-f", "s1"]);
}
