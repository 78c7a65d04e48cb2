//! A full state filesystem (a guest filling its work disk is enough) fails
//! no request: listing, logs, removal and cache pruning all still work, and
//! the daemon keeps serving. The home is a small tmpfs this test mounts.

mod common;

use banger_testkit::images::push_busybox;
use banger_testkit::registry::Registry;
use common::{must, Banger};

#[test]
fn a_full_state_disk_fails_no_request() {
    if !common::root_or_skip("mounting a small filesystem") {
        return;
    }
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");
    let mut banger = Banger::without_daemon();
    let home = banger.home.path().to_path_buf();
    let _mounted = common::Mounted::tmpfs(&home, "96m");
    banger.start_daemon();
    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);
    // Any ELF will do as a kernel: nothing boots here.
    let fake = tmp.path().join("vmlinux");
    std::fs::copy("/bin/true", &fake).unwrap();
    banger.ok(&["kernel", "import", fake.to_str().unwrap(), "--name", "k"]);
    banger.ok(&["vm", "create", "v", "--image", "busybox", "--kernel", "k"]);

    // Fill it up.
    let _ = common::sh(&format!(
        "dd if=/dev/zero of={}/filler bs=1M status=none",
        home.display()
    ));
    let df = must(&format!(
        "df --output=avail -B1 {} | tail -1",
        home.display()
    ));
    assert_eq!(df.trim(), "0", "the filesystem is full");

    // Enough requests that their log lines outgrow the log file's last
    // page (whose slack still took writes).
    for _ in 0..10 {
        for args in [
            &["vm", "ls"][..],
            &["image", "ls"],
            &["vm", "inspect", "v"],
            &["vm", "logs", "v"],
            &["kernel", "ls"],
        ] {
            banger.ok(args);
        }
    }
    // Requests that free space work, and then the rest works again.
    banger.ok(&["image", "cache", "prune"]);
    banger.ok(&["vm", "rm", "-f", "v"]);
    assert!(!home.join("state/vms/v").exists());
    std::fs::remove_file(home.join("filler")).unwrap();
    banger.ok(&["vm", "create", "w", "--image", "busybox", "--kernel", "k"]);
    banger.ok(&["vm", "rm", "w"]);
}

/// A guest that fills the filesystem its disks live on is paused by QEMU
/// (it stops a guest whose write hit ENOSPC): `vm ls` and `doctor` say so
/// with the fix, and `vm rm -f` still removes it.
#[test]
fn a_guest_filling_the_host_disk_shows_as_paused() {
    if !common::root_or_skip("mounting a small filesystem") {
        return;
    }
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");
    let banger = Banger::start_with_env(&[
        ("BANGER_QEMU_ACCEL", std::path::Path::new("tcg")),
        ("BANGER_AGENT_BIN", &agent),
    ]);
    banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);
    // Only the VMs' directory is small: the daemon's log and database are not.
    let vms = banger.path("state/vms");
    std::fs::create_dir_all(&vms).unwrap();
    let _mounted = common::Mounted::tmpfs(&vms, "48m");
    banger.ok(&["vm", "run", "v", "--image", "busybox", "--memory", "128M"]);
    let mut filler = banger
        .cmd(&[
            "vm",
            "exec",
            "v",
            "--",
            "dd",
            "if=/dev/zero",
            "of=/work/fill",
            "bs=1M",
            "count=200",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let info = loop {
        let out = banger.ok(&["vm", "inspect", "v", "--json"]);
        let info: serde_json::Value = serde_json::from_str(&out).unwrap();
        if info[0]["state"] == "paused" {
            break info;
        }
        assert!(std::time::Instant::now() < deadline, "never paused: {out}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let problem = info[0]["problem"].as_str().unwrap();
    assert!(
        problem.contains("full") && problem.contains("banger vm restart v"),
        "{problem}"
    );
    let ls = banger.run(&["vm", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("paused"));
    assert!(String::from_utf8_lossy(&ls.stderr).contains("is paused"));
    let doctor = banger.run(&["doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let vms_check = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "vms")
        .unwrap();
    assert_eq!(vms_check["status"], "fail", "{vms_check}");
    banger.ok(&["vm", "rm", "-f", "v"]);
    let _ = filler.kill();
    let _ = filler.wait();
    assert_eq!(banger.ok(&["vm", "ls", "--json"]).trim(), "[]");
}
