//! Real VMs (QEMU, TCG) through the everyday commands: `vm stats` against a
//! guest doing known work, `vm set` changing what a VM boots with (and
//! every refusal), `vm run … -- CMD` with the image's configuration. The
//! tests run in parallel, each with its own daemon.

mod common;

use std::path::Path;
use std::time::Duration;

use banger_testkit::registry::Registry;
use common::Banger;

/// A daemon with the test kernel and busybox as `bb`.
fn setup(registry: &Registry, tmp: &Path, agent: &Path, kernel: &Path) -> Banger {
    common::busybox_vm_daemon(registry, tmp, agent, kernel)
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

/// `vm stats` with the guest's figures from an answer it gave after now
/// (guests are asked in the background; a round may show an older one).
fn fresh_stats(banger: &Banger, vm: &str) -> serde_json::Value {
    let asked = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    loop {
        let s = stats(banger, vm);
        if let Some(age) = s["guest_age_ms"].as_u64() {
            if (age as u128) + 100 < asked.elapsed().as_millis() {
                return s;
            }
        }
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "no fresh answer: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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
    let mut banger = setup(&registry, tmp.path(), &agent, &kernel);
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
    let s = fresh_stats(&banger, "s1");
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
    let before = fresh_stats(&banger, "s1");
    sh(
        &banger,
        "s1",
        "dd if=/dev/urandom of=/work/big bs=1M count=100 2>/dev/null; sync",
    );
    let after = fresh_stats(&banger, "s1");
    let grew = |field: &str| {
        u(&disk(&after, "work")[field]).saturating_sub(u(&disk(&before, "work")[field]))
    };
    assert!(grew("fs_used_bytes") >= 95 * MIB, "{after}");
    assert!(grew("allocated_bytes") >= 95 * MIB, "{after}");
    let table = banger.ok(&["vm", "stats"]);
    assert!(table.starts_with("NAME") && table.contains("s1"), "{table}");

    // `daemon stop` leaves the VM running; the next daemon takes it back.
    let vmm = common::pids_naming(&[&banger.path("state/vms/s1").to_string_lossy()]);
    assert_eq!(vmm.len(), 1, "one VMM");
    banger.ok(&["daemon", "stop"]);
    assert_eq!(banger.run(&["daemon", "status"]).status.code(), Some(3));
    assert!(
        std::path::Path::new(&format!("/proc/{}", vmm[0])).exists(),
        "the VMM lives on"
    );
    banger.start_daemon();
    assert_eq!(
        banger.ok(&["vm", "ls", "-q", "--filter", "state=running"]),
        "s1\n"
    );
    assert_eq!(
        sh(&banger, "s1", "cat /work/big | wc -c"),
        (100 * MIB).to_string()
    );

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
    let refused = banger.fails(&["vm", "set", "s1", "--work-disk", "15T", "--restart"]);
    assert!(refused.contains("free space"), "{refused}");
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
    let s = fresh_stats(&banger, "s1");
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
    let total = u(&fresh_stats(&banger, "s1")["guest_memory"]["total_bytes"]);
    assert!(total > 260 * MIB && total <= 320 * MIB, "{total}");
    banger.ok(&["vm", "rm", "-f", "s1"]);
}

fn output(banger: &Banger, args: &[&str]) -> (i32, String, String) {
    let out = banger.run(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_commands_with_the_images_config() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    banger_testkit::images::push_busybox_with(
        &registry,
        &tmp.path().join("oci"),
        "cfg:1",
        serde_json::json!({
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello from the image"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo default $GREETING; id -u; pwd; exit 7"],
            "WorkingDir": "/tmp",
            "User": "nobody",
        }),
    );
    let mut banger = Banger::without_daemon();
    common::start_vm_daemon(&mut banger, &agent);
    banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    banger.ok(&[
        "image",
        "pull",
        &registry.reference("cfg:1"),
        "--name",
        "cfg",
    ]);

    // A command once ready: its output and status, then the VM removed.
    let refused = banger.fails(&["vm", "run", "r0", "--image", "cfg", "--rm"]);
    assert!(refused.contains("-- CMD"), "{refused}");
    let (code, stdout, stderr) = output(
        &banger,
        &[
            "vm",
            "run",
            "r1",
            "--image",
            "cfg",
            "--rm",
            "--",
            "sh",
            "-c",
            "echo $GREETING; id -u; pwd; exit 3",
        ],
    );
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(stdout, "hello from the image\n65534\n/tmp\n");
    assert_eq!(banger.ok(&["vm", "ls", "-q"]), "", "--rm removed it");

    // The image's own command; the VM keeps running.
    let (code, stdout, stderr) = output(
        &banger,
        &["vm", "run", "r2", "--image", "cfg", "--run-default"],
    );
    assert_eq!(code, 7, "{stderr}");
    assert_eq!(stdout, "default hello from the image\n65534\n/tmp\n");
    assert_eq!(
        banger.ok(&["vm", "ls", "-q", "--filter", "state=running"]),
        "r2\n"
    );

    // Each default overridden per exec; variables from a file too.
    let said = banger.ok(&[
        "vm",
        "exec",
        "r2",
        "-e",
        "GREETING=over",
        "-u",
        "root",
        "-w",
        "/",
        "--",
        "sh",
        "-c",
        "echo $GREETING; id -u; pwd",
    ]);
    assert_eq!(said, "over\n0\n/\n");
    let env_file = tmp.path().join("env");
    std::fs::write(&env_file, "A=1\n# a comment\n\nB=two words\n").unwrap();
    let said = banger.ok(&[
        "vm",
        "exec",
        "r2",
        "--env-file",
        env_file.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo \"$A|$B|$GREETING\"",
    ]);
    assert_eq!(said, "1|two words|hello from the image\n");

    // Detached: the pid at once, the output in a log the command's user owns.
    let started = banger.ok(&[
        "vm",
        "exec",
        "r2",
        "-d",
        "--json",
        "--",
        "sh",
        "-c",
        "echo started; sleep 2; echo done",
    ]);
    let d: serde_json::Value = serde_json::from_str(&started).unwrap();
    let log = d["log"].as_str().unwrap().to_string();
    assert!(log.starts_with("/var/log/banger/"), "{d}");
    assert!(u(&d["pid"]) > 1);
    let running = banger.ok(&["vm", "exec", "r2", "--", "cat", &log]);
    assert_eq!(running, "started\n", "returned before the command ended");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        banger.ok(&["vm", "exec", "r2", "--", "cat", &log]),
        "started\ndone\n"
    );
    let owner = banger.ok(&["vm", "exec", "r2", "--", "stat", "-c", "%u", &log]);
    assert_eq!(owner.trim(), "65534");
    let pid = banger.ok(&["vm", "exec", "r2", "-d", "--", "sleep", "30"]);
    assert!(pid.trim().parse::<u32>().unwrap() > 1, "{pid}");

    // banger's own failures where a command would run exit 125, each said
    // as `error:` and as what it is (red team round 3, item 24).
    let missing = banger.path("no-such.env");
    for (args, said) in [
        (
            vec![
                "vm",
                "exec",
                "r2",
                "--env-file",
                missing.to_str().unwrap(),
                "--",
                "true",
            ],
            "error: --env-file",
        ),
        (vec!["vm", "cp", "/etc/hostname", "nosuch:/tmp/"], "error:"),
        (vec!["vm", "cp", "r2:/no/such/file", "/tmp/"], "error:"),
    ] {
        let (code, _, err) = output(&banger, &args);
        assert_eq!(code, 125, "{args:?}: {err}");
        assert!(
            err.starts_with(said) && !err.contains("banger-tar"),
            "{args:?}: {err}"
        );
    }
    let (code, _, err) = output(&banger, &["vm", "exec", "r2", "-w", "/nope", "--", "pwd"]);
    assert_eq!(code, 126, "{err}");
    assert!(
        err.contains("working directory /nope does not exist"),
        "{err}"
    );

    // What a command detaches itself (nohup, setsid, a double fork)
    // outlives it, as over ssh (red team round 3, item 14: the server of
    // `sh -c 'nohup server &'` was killed when the exec returned). This
    // busybox has no `nohup`; the shell does what it does: ignore SIGHUP.
    banger.ok(&[
        "vm",
        "exec",
        "r2",
        "-u",
        "0",
        "--",
        "sh",
        "-c",
        "(trap '' HUP; exec sleep 301) >/dev/null 2>&1 & setsid sleep 302 >/dev/null 2>&1 & \
         (sleep 303 >/dev/null 2>&1 &)",
    ]);
    std::thread::sleep(Duration::from_secs(1));
    let ps = banger.ok(&["vm", "exec", "r2", "--", "ps", "-o", "args"]);
    for s in ["sleep 301", "sleep 302", "sleep 303"] {
        assert!(ps.contains(s), "`{s}` did not outlive its exec:\n{ps}");
    }

    // Plain OpenSSH to a VM without a network: `vm dial` as ProxyCommand
    // reaches the agent's SSH on the guest's loopback.
    let out = std::process::Command::new("ssh")
        .arg("-i")
        .arg(banger.path("state/ssh/id_ed25519"))
        .arg("-o")
        .arg(format!("ProxyCommand={} vm dial r2 22", common::exe()))
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "root@r2",
            "--",
            "hostname",
        ])
        .env("BANGER_HOME", banger.home.path())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "r2",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    banger.ok(&["vm", "rm", "-f", "r2"]);
}

/// A QEMU as nested KVM (kvm-pvm, these machines) makes it: firmware runs
/// on KVM and quits cleanly, a kernel dies of a KVM internal error and
/// QEMU stays up with it halted; under TCG, the real QEMU.
const NESTED_QEMU: &str = r#"#!/bin/sh
case " $* " in
*" -accel kvm "*)
  case " $* " in *" -monitor stdio "*) read -r line; exit 0 ;; esac
  echo "KVM internal error. Suberror: 1" >&2
  echo "emulation failure" >&2
  exec python3 -c 'import time; time.sleep(120)' "$@"
  ;;
esac
exec qemu-system-x86_64 "$@"
"#;

/// `auto` where KVM runs firmware but kills a kernel (red team round 3,
/// item 7: README's quickstart died after the boot timeout while doctor
/// called KVM usable). The first boot dies at once, is said on stderr,
/// marks KVM unusable and boots again under TCG; doctor then says why,
/// and the next VM goes straight to TCG. A daemon killed mid-probe leaves
/// no probe QEMU behind.
#[test]
fn auto_accel_boots_again_under_tcg_when_kvm_kills_the_guest() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipping: /dev/kvm cannot be opened, so auto never tries KVM");
        return;
    }
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let qemu = tmp.path().join("qemu-nested");
    std::fs::write(&qemu, NESTED_QEMU).unwrap();
    common::must(&format!("chmod 755 {}", qemu.display()));
    let mut banger = Banger::without_daemon();
    std::fs::create_dir_all(banger.path("config")).unwrap();
    std::fs::write(
        banger.path("config/config.toml"),
        format!("[qemu]\nbinary = \"{}\"\n", qemu.display()),
    )
    .unwrap();
    common::start_vm_daemon_choosing_accel(&mut banger, &agent);
    common::add_busybox_and_kernel(&banger, &registry, tmp.path(), &kernel);
    let doctor = banger.ok(&["doctor"]);
    assert!(
        doctor.contains("firmware runs on KVM here; the first VM boot shows"),
        "{doctor}"
    );

    let started = std::time::Instant::now();
    let run = banger.run(&["vm", "run", "a1", "--image", "bb"]);
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{run:?}\n{}", banger.daemon_log());
    assert!(
        said.contains("a1: the guest died on KVM (KVM internal error. Suberror: 1)")
            && said.contains("booting again under TCG"),
        "{said}"
    );
    // Far inside the 60 s boot timeout the KVM attempt waited out before.
    assert!(started.elapsed() < std::time::Duration::from_secs(50));
    assert_eq!(sh(&banger, "a1", "echo up"), "up");
    let accel_of = |vm: &str| {
        let vmm =
            common::pids_naming(&[&banger.path(&format!("state/vms/{vm}")).to_string_lossy()]);
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", vmm[0])).unwrap();
        String::from_utf8_lossy(&cmdline).replace('\0', " ")
    };
    assert!(accel_of("a1").contains("-accel tcg"));
    // The halted KVM attempt is gone, not left running.
    let a1 = banger.path("state/vms/a1");
    assert!(common::pids_naming(&[&a1.to_string_lossy(), "time.sleep(120)"]).is_empty());
    let doctor = banger.ok(&["doctor"]);
    assert!(
        doctor.contains("unusable here (a guest kernel died on KVM: KVM internal error. Suberror: 1), using tcg"),
        "{doctor}"
    );
    // The next VM boots under TCG straight away, with nothing to say.
    let run = banger.run(&["vm", "run", "a2", "--image", "bb"]);
    assert!(run.status.success(), "{run:?}");
    assert!(!String::from_utf8_lossy(&run.stderr).contains("died on KVM"));
    assert!(accel_of("a2").contains("-accel tcg"));
    banger.ok(&["vm", "rm", "-f", "a1", "a2"]);

    // A probe whose QEMU never quits, its daemon SIGKILLed mid-probe: the
    // QEMU goes with it (before, probes were left running for good).
    let hang = tmp.path().join("qemu-hang");
    std::fs::write(
        &hang,
        "#!/bin/sh\nexec python3 -c 'import time; time.sleep(60)' \"$0\"\n",
    )
    .unwrap();
    common::must(&format!("chmod 755 {}", hang.display()));
    let mut probing = Banger::without_daemon();
    std::fs::create_dir_all(probing.path("config")).unwrap();
    std::fs::write(
        probing.path("config/config.toml"),
        format!("[qemu]\nbinary = \"{}\"\n", hang.display()),
    )
    .unwrap();
    common::start_vm_daemon_choosing_accel(&mut probing, &agent);
    let hung = || common::pids_naming(&[hang.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while hung().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the probe never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    probing.kill_daemon(libc::SIGKILL);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !hung().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the probe's QEMU outlived its daemon: {:?}",
            hung()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
