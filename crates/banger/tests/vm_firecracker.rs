//! The Firecracker backend against a fake `firecracker` that speaks its
//! documented API, checks every body and records the calls (and plays the
//! guest: vsock readiness and SSH with the VM's pinned host key).

mod common;

use std::path::{Path, PathBuf};

use banger_testkit::images::push_busybox;
use banger_testkit::registry::Registry;
use common::Banger;

fn tools() -> Option<(PathBuf, PathBuf)> {
    let fake = std::env::var_os("FAKE_FIRECRACKER_BIN").map(PathBuf::from);
    let agent = std::env::var_os("BANGER_AGENT_BIN").map(PathBuf::from);
    match (fake, agent) {
        (Some(f), Some(a)) if f.is_file() && a.is_file() => Some((f, a)),
        _ => {
            let msg = "needs FAKE_FIRECRACKER_BIN and BANGER_AGENT_BIN (scripts/test sets both)";
            assert!(std::env::var_os("CI").is_none(), "{msg}");
            eprintln!("skipping: {msg}");
            None
        }
    }
}

fn calls(dir: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(Path::new(dir).join("fc.sock.calls"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A daemon using the fake Firecracker (with `extra` environment), a kernel
/// (any ELF does for the fake) and busybox pulled; the registry and temp
/// directory live as long as the test needs them.
fn fake_fc_setup(
    fake: &Path,
    agent: &Path,
    extra: &[(&str, &Path)],
) -> (Registry, tempfile::TempDir, Banger) {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");
    let mut env = vec![
        ("BANGER_FIRECRACKER_BIN", fake),
        ("BANGER_AGENT_BIN", agent),
    ];
    env.extend_from_slice(extra);
    let banger = Banger::start_with_env(&env);
    let kernel = tmp.path().join("vmlinux");
    std::fs::copy(agent, &kernel).unwrap();
    banger.ok(&["kernel", "import", kernel.to_str().unwrap(), "--name", "fc"]);
    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);
    (registry, tmp, banger)
}

/// No Firecracker on the host: `vm create --vmm firecracker` is refused
/// at once with the fix, nothing made, and doctor says it is missing (red
/// team round 3, item 24: the create succeeded and every start failed).
#[test]
fn without_firecracker_a_firecracker_vm_is_refused_at_create() {
    let Some((_fake, agent)) = tools() else {
        return;
    };
    let missing = Path::new("/nonexistent/firecracker");
    let (_registry, _tmp, banger) = fake_fc_setup(missing, &agent, &[]);
    let err = banger.fails(&[
        "vm",
        "create",
        "f",
        "--image",
        "busybox",
        "--kernel",
        "fc",
        "--vmm",
        "firecracker",
    ]);
    assert!(
        err.contains("no Firecracker here") && err.contains("--vmm qemu"),
        "{err}"
    );
    assert!(!banger.path("state/vms/f").exists());
    let doctor = String::from_utf8(
        banger
            .cmd(&["doctor"])
            .env("BANGER_FIRECRACKER_BIN", missing)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let line = doctor
        .lines()
        .find(|l| l.contains("firecracker") && l.contains("not found"))
        .unwrap_or_default();
    assert!(
        line.starts_with("warn") && line.contains("not found"),
        "{doctor}"
    );
}

#[test]
fn firecracker_boot_follows_the_api_order_and_runs_commands() {
    let Some((fake, agent)) = tools() else { return };
    let (_registry, _tmp, banger) = fake_fc_setup(&fake, &agent, &[]);

    banger.ok(&[
        "vm",
        "run",
        "fcvm",
        "--image",
        "busybox",
        "--vmm",
        "firecracker",
        "--vcpus",
        "2",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "fcvm"])).unwrap();
    assert_eq!(info[0]["vmm"], "firecracker");
    assert_eq!(info[0]["state"], "running");
    let dir = info[0]["dir"].as_str().unwrap().to_string();

    let seq: Vec<String> = calls(&dir)
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["method"].as_str().unwrap(),
                c["path"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        seq,
        [
            "PUT /metrics",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/image",
            "PUT /drives/work",
            "PUT /drives/upper",
            "PUT /vsock",
            "PUT /actions"
        ],
        "the documented boot order"
    );
    let mut c = calls(&dir);
    // Firecracker's metrics and log go to files of their own in the VM's
    // directory, apart from the guest's console.
    assert_eq!(
        c.remove(0)["body"]["metrics_path"],
        format!("{dir}/metrics.json")
    );
    let vmm_log = std::fs::read_to_string(Path::new(&dir).join("vmm.log")).unwrap();
    assert!(
        vmm_log.contains("Running Firecracker") && vmm_log.contains("PUT request on \"/vsock\""),
        "{vmm_log}"
    );
    let console = banger.ok(&["vm", "logs", "fcvm"]);
    assert!(!console.contains("Running Firecracker"), "{console}");
    assert_eq!(
        c[0]["body"],
        serde_json::json!({ "vcpu_count": 2, "mem_size_mib": 512 })
    );
    assert!(c[1]["body"]["initrd_path"]
        .as_str()
        .unwrap()
        .ends_with("initrd.cpio"));
    assert!(c[1]["body"]["boot_args"]
        .as_str()
        .unwrap()
        .contains("console=ttyS0"));
    // The overlay root: the image shared read-only, the VM's layer writable.
    let image: serde_json::Value =
        serde_json::from_str(&banger.ok(&["image", "inspect", "busybox"])).unwrap();
    assert_eq!(c[2]["body"]["path_on_host"], image[0]["rootfs_path"]);
    assert_eq!(c[2]["body"]["is_read_only"], true);
    assert_eq!(c[3]["body"]["is_read_only"], false);
    assert!(c[4]["body"]["path_on_host"]
        .as_str()
        .unwrap()
        .ends_with("upper.ext4"));
    assert_eq!(c[4]["body"]["is_read_only"], false);
    assert_eq!(c[5]["body"]["guest_cid"], 3);
    assert_eq!(
        c[6]["body"],
        serde_json::json!({ "action_type": "InstanceStart" })
    );

    // An image a VM uses cannot be removed without -f.
    let err = banger.fails(&["image", "rm", "busybox"]);
    assert!(err.contains("fcvm") && err.contains("-f"), "{err}");

    // Exec reaches the "guest" over vsock, authenticated with the pinned key.
    assert_eq!(
        banger.ok(&["vm", "exec", "fcvm", "--", "echo", "hi there"]),
        "fake-firecracker ran on fcvm: echo hi there\n"
    );
    assert!(banger
        .ok(&["vm", "logs", "fcvm"])
        .contains("banger-agent: ready"));

    // A clean stop is the agent's power-off, which ends the process.
    banger.ok(&["vm", "stop", "fcvm"]);
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "fcvm"])).unwrap();
    assert_eq!(info[0]["state"], "stopped");
    assert!(
        !Path::new(&dir).join("fc.sock").exists() && !Path::new(&dir).join("vsock.sock").exists()
    );

    // Sizes Firecracker cannot take are refused at create, with the range.
    let err = banger.fails(&[
        "vm",
        "create",
        "big",
        "--image",
        "busybox",
        "--vmm",
        "firecracker",
        "--vcpus",
        "64",
    ]);
    assert!(err.contains("--vcpus 64 is out of range"), "{err}");
    assert!(banger
        .fails(&["vm", "inspect", "big"])
        .contains("no VM named"));

    banger.ok(&["vm", "start", "fcvm"]);
    banger.ok(&["vm", "rm", "-f", "fcvm", "big"]);
    assert!(!Path::new(&dir).exists());
    assert_eq!(banger.ok(&["vm", "ls", "--json"]).trim(), "[]");
}

/// The calls after the first `skip`, as `METHOD PATH`.
fn sequence(dir: &str, skip: usize) -> Vec<String> {
    calls(dir)
        .iter()
        .skip(skip)
        .map(|c| {
            format!(
                "{} {}",
                c["method"].as_str().unwrap(),
                c["path"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn firecracker_pauses_snapshots_and_forks_through_its_api() {
    let Some((fake, agent)) = tools() else { return };
    let (_registry, _tmp, banger) = fake_fc_setup(&fake, &agent, &[]);
    banger.ok(&[
        "vm",
        "run",
        "fcvm",
        "--image",
        "busybox",
        "--vmm",
        "firecracker",
    ]);
    let dir = banger.path("state/vms/fcvm").display().to_string();
    let booted = calls(&dir).len();

    banger.ok(&["vm", "pause", "fcvm"]);
    assert!(banger
        .fails(&["vm", "exec", "fcvm", "--", "true"])
        .contains("vm resume fcvm"));
    banger.ok(&["vm", "resume", "fcvm"]);
    assert_eq!(sequence(&dir, booted), ["PATCH /vm", "PATCH /vm"]);
    let c = calls(&dir);
    assert_eq!(c[booted]["body"], serde_json::json!({ "state": "Paused" }));
    assert_eq!(
        c[booted + 1]["body"],
        serde_json::json!({ "state": "Resumed" })
    );

    // Held, paused, saved, resumed (the fake exits if a command reaches a
    // held guest, so the exec below also says the hold was lifted).
    banger.ok(&["vm", "snapshot", "fcvm", "s1"]);
    assert_eq!(
        sequence(&dir, booted + 2),
        ["PATCH /vm", "PUT /snapshot/create", "PATCH /vm"]
    );
    let c = calls(&dir);
    let create = &c[booted + 3]["body"];
    assert_eq!(create["snapshot_type"], "Full");
    assert!(create["snapshot_path"]
        .as_str()
        .unwrap()
        .ends_with("/.s1.partial/vmstate"));
    assert!(create["mem_file_path"]
        .as_str()
        .unwrap()
        .ends_with("/.s1.partial/memory"));
    assert_eq!(
        banger.ok(&["vm", "exec", "fcvm", "--", "echo", "on"]),
        "fake-firecracker ran on fcvm: echo on\n"
    );
    // The VM's own disks go by paths relative to its directory, so a fork's
    // Firecracker, started in its own, opens its own copies.
    assert_eq!(c[5]["body"]["path_on_host"], "upper.ext4");

    // A fork: one call, the load, with this VM's vsock socket; then its
    // guest is given its identity (name and host key, which the daemon's
    // connection pins) before anything runs.
    banger.ok(&["vm", "run", "fork", "--from", "s1"]);
    let fork_dir = banger.path("state/vms/fork").display().to_string();
    assert_eq!(sequence(&fork_dir, 0), ["PUT /snapshot/load"]);
    let snaps = banger.path("state/snapshots/s1").display().to_string();
    assert_eq!(
        calls(&fork_dir)[0]["body"],
        serde_json::json!({
            "snapshot_path": format!("{snaps}/vmstate"),
            "mem_backend": { "backend_type": "File", "backend_path": format!("{snaps}/memory") },
            "vsock_override": { "uds_path": format!("{fork_dir}/vsock.sock") },
            "resume_vm": true,
        })
    );
    assert_eq!(
        banger.ok(&["vm", "exec", "fork", "--", "echo", "hi"]),
        "fake-firecracker ran on fork: echo hi\n"
    );
    // Back to the snapshot: a new process, loaded the same way.
    let before = calls(&dir).len();
    banger.ok(&["vm", "restore", "fcvm", "s1"]);
    assert_eq!(sequence(&dir, before), ["PUT /snapshot/load"]);
    assert_eq!(
        banger.ok(&["vm", "exec", "fcvm", "--", "echo", "back"]),
        "fake-firecracker ran on fcvm: echo back\n"
    );
    banger.ok(&["vm", "rm", "-f", "fcvm", "fork"]);
    banger.ok(&["snapshot", "rm", "s1"]);
}

#[test]
fn a_guest_that_ignores_the_power_off_gets_ctrl_alt_del() {
    let Some((fake, agent)) = tools() else { return };
    let hang = Path::new("1");
    let (_registry, _tmp, banger) =
        fake_fc_setup(&fake, &agent, &[("FAKE_FC_HANG_ON_POWEROFF", hang)]);
    banger.ok(&[
        "vm",
        "run",
        "stubborn",
        "--image",
        "busybox",
        "--vmm",
        "firecracker",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "stubborn"])).unwrap();
    let dir = info[0]["dir"].as_str().unwrap().to_string();
    banger.ok(&["vm", "stop", "stubborn", "-t", "2"]);
    let last = calls(&dir).pop().unwrap();
    assert_eq!(last["path"], "/actions");
    assert_eq!(last["body"]["action_type"], "SendCtrlAltDel");
    let logs = banger.ok(&["vm", "logs", "stubborn"]);
    assert!(logs.contains("ignored the power-off"), "{logs}");
    let vmm_log = std::fs::read_to_string(Path::new(&dir).join("vmm.log")).unwrap();
    assert!(vmm_log.contains("Ctrl-Alt-Del"), "{vmm_log}");
    banger.ok(&["vm", "rm", "stubborn"]);
}

/// A Firecracker that accepts the start and then dies (as nested KVM makes
/// the real one do on these machines): the start fails at once with the
/// VM, the stage and Firecracker's own last words, and nothing is left.
#[test]
fn a_firecracker_that_dies_during_boot_fails_the_start_with_its_words() {
    let Some((fake, agent)) = tools() else { return };
    let die = Path::new("1");
    let (_registry, _tmp, banger) = fake_fc_setup(&fake, &agent, &[("FAKE_FC_DIE_IN_BOOT", die)]);
    let started = std::time::Instant::now();
    let err = banger.fails(&[
        "vm",
        "run",
        "doomed",
        "--image",
        "busybox",
        "--vmm",
        "firecracker",
    ]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "reported when the VMM died, not at the boot timeout"
    );
    assert!(
        err.contains("VM `doomed` failed to boot at stage")
            && err.contains("the VMM exited during boot"),
        "{err}"
    );
    let said = err
        .split("--- firecracker said ---")
        .nth(1)
        .unwrap_or_default();
    assert!(said.contains("KVM_EXIT_INTERNAL_ERROR"), "{err}");
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "doomed"])).unwrap();
    assert_eq!(info[0]["state"], "stopped");
    let dir = info[0]["dir"].as_str().unwrap();
    assert!(!Path::new(dir).join("fc.sock").exists());
    banger.ok(&["vm", "rm", "doomed"]);
}
