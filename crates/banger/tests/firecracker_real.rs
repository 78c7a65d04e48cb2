//! Conformance against a real Firecracker and jailer, gated on
//! `BANGER_FIRECRACKER_BIN` (and `BANGER_JAILER_BIN`); build them with
//! `scripts/build-firecracker` (docs/vms.md). CI has no Firecracker and
//! runs the fake-based tests; these hold the fakes to the real thing.
//!
//! - The API: one request list sent to the real binary and to the fake
//!   (`FAKE_FIRECRACKER_BIN`), answers compared status by status, fault
//!   message by fault message.
//! - Through banger, directly and through the root helper's jailer: the
//!   whole configure-and-start sequence, the jail (chroot, uid, cgroup),
//!   and teardown. Where nested KVM cannot run the guest (these machines
//!   are themselves Firecracker guests), the boot fails with banger's
//!   error naming the VM, the stage and what Firecracker said, and
//!   nothing is left; where it can, the guest runs commands.
//! - A full boot, for machines whose KVM runs guests (`banger doctor`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::registry::Registry;
use common::jailing::{alive, cgroup_dir, same_dir, vm_info, Bins, Helper, Reaper, USER};
use common::Banger;
use serde_json::{json, Value};

fn real() -> Option<(PathBuf, Option<PathBuf>)> {
    let fc = std::env::var_os("BANGER_FIRECRACKER_BIN").map(PathBuf::from)?;
    let jailer = std::env::var_os("BANGER_JAILER_BIN").map(PathBuf::from);
    Some((fc, jailer))
}

fn skip() {
    eprintln!("skipping: set BANGER_FIRECRACKER_BIN (and BANGER_JAILER_BIN) to a real build");
}

/// One Firecracker process on a socket in `dir`.
struct Fc {
    child: Child,
    socket: PathBuf,
}

impl Fc {
    fn start(binary: &Path, dir: &Path) -> Fc {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("fc.sock");
        let child = Command::new(binary)
            .arg("--api-sock")
            .arg(&socket)
            .arg("--log-path")
            .arg(dir.join("vmm.log"))
            .args(["--level", "Info", "--show-level"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not serve",
                binary.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Fc { child, socket }
    }

    /// One request; its status and fault message (empty on success).
    fn call(&self, method: &str, path: &str, body: &Value) -> (u16, String) {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let text = body.to_string();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let fault = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(str::to_string))
            .unwrap_or_default();
        (
            status.split_whitespace().nth(1).unwrap().parse().unwrap(),
            fault,
        )
    }

    fn exited(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Fc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The requests the fake's table covers, in an order one process takes
/// them; paths under `d` (each binary gets its own directory).
fn requests(d: &Path) -> Vec<(&'static str, String, Value)> {
    let p = |name: &str| d.join(name).display().to_string();
    let drive = |id: &str, path: String| json!({"drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": false});
    let mut list = vec![
        ("PATCH", "/vm".into(), json!({"state": "Paused"})),
        (
            "PUT",
            "/actions".into(),
            json!({"action_type": "SendCtrlAltDel"}),
        ),
        (
            "PUT",
            "/snapshot/create".into(),
            json!({"snapshot_type": "Full", "snapshot_path": p("st"), "mem_file_path": p("mem")}),
        ),
        (
            "PUT",
            "/metrics".into(),
            json!({"metrics_path": p("metrics.json")}),
        ),
        (
            "PUT",
            "/metrics".into(),
            json!({"metrics_path": p("metrics2.json")}),
        ),
        (
            "PUT",
            "/machine-config".into(),
            json!({"vcpu_count": 0, "mem_size_mib": 128}),
        ),
        (
            "PUT",
            "/machine-config".into(),
            json!({"vcpu_count": 33, "mem_size_mib": 128}),
        ),
        (
            "PUT",
            "/machine-config".into(),
            json!({"vcpu_count": 32, "mem_size_mib": 128}),
        ),
        (
            "PUT",
            "/machine-config".into(),
            json!({"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}),
        ),
        ("PUT", "/machine-config".into(), json!({"vcpu_count": 1})),
        (
            "PUT",
            "/machine-config".into(),
            json!({"vcpu_count": 2, "mem_size_mib": 256}),
        ),
        (
            "PUT",
            "/boot-source".into(),
            json!({"kernel_image_path": p("nope")}),
        ),
        (
            "PUT",
            "/boot-source".into(),
            json!({"kernel_image_path": p("vmlinux"), "initrd_path": p("nope")}),
        ),
        (
            "PUT",
            "/boot-source".into(),
            json!({"kernel_image_path": p("vmlinux"), "boot_args": "console=ttyS0"}),
        ),
        ("PUT", "/drives/root".into(), drive("root", p("nope"))),
        ("PUT", "/drives/root".into(), drive("other", p("disk"))),
        (
            "PUT",
            "/drives/root".into(),
            json!({"drive_id": "root", "path_on_host": p("disk"), "is_root_device": false}),
        ),
        ("PUT", "/drives/root".into(), drive("root", p("disk"))),
        (
            "PUT",
            "/network-interfaces/eth0".into(),
            json!({"iface_id": "eth1", "host_dev_name": "bgnotap1"}),
        ),
        (
            "PUT",
            "/vsock".into(),
            json!({"guest_cid": 3, "uds_path": p("stale.sock")}),
        ),
        (
            "PUT",
            "/vsock".into(),
            json!({"guest_cid": 2, "uds_path": p("v.sock")}),
        ),
        ("PUT", "/actions".into(), json!({"action_type": "Nope"})),
        ("PUT", "/nope".into(), json!({})),
    ];
    // As root, Firecracker makes a tap that does not exist.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        list.push((
            "PUT",
            "/network-interfaces/eth0".into(),
            json!({"iface_id": "eth0", "host_dev_name": format!("bgfc{}", std::process::id() % 10000), "guest_mac": "06:00:0a:00:00:02"}),
        ));
    }
    list
}

fn fixtures(d: &Path) {
    std::fs::create_dir_all(d).unwrap();
    std::fs::write(d.join("vmlinux"), vec![0u8; 4096]).unwrap();
    std::fs::write(d.join("disk"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(d.join("stale.sock"), b"").unwrap();
}

#[test]
fn the_fake_answers_every_request_as_the_real_firecracker_does() {
    let Some((real_fc, _)) = real() else {
        return skip();
    };
    let Some(fake_fc) = std::env::var_os("FAKE_FIRECRACKER_BIN").map(PathBuf::from) else {
        return skip();
    };
    let tmp = tempfile::tempdir().unwrap();
    let (rd, fd) = (tmp.path().join("real"), tmp.path().join("fake"));
    fixtures(&rd);
    fixtures(&fd);
    let (real, fake) = (Fc::start(&real_fc, &rd), Fc::start(&fake_fc, &fd));
    let mut table = Vec::new();
    for ((method, path, rbody), (_, _, fbody)) in requests(&rd).into_iter().zip(requests(&fd)) {
        let (rs, rf) = real.call(method, &path, &rbody);
        let (fs, ff) = fake.call(method, &path, &fbody);
        // The same words, up to each one's directory; the fake may stop
        // short of the real one's list of expected fields.
        let (rf, ff) = (
            rf.replace(&rd.display().to_string(), "DIR"),
            ff.replace(&fd.display().to_string(), "DIR"),
        );
        table.push(format!(
            "{method} {path} {rbody}\n  real: {rs} {rf}\n  fake: {fs} {ff}"
        ));
        assert_eq!(rs, fs, "{}", table.last().unwrap());
        assert!(rf.starts_with(&ff), "{}", table.last().unwrap());
    }
    eprintln!("{}", table.join("\n"));
    // Both logs say who they are, in Firecracker's format.
    for d in [&rd, &fd] {
        let log = std::fs::read_to_string(d.join("vmm.log")).unwrap();
        assert!(
            log.contains(":main:INFO] Running Firecracker v1.16.1"),
            "{log}"
        );
    }
    drop((real, fake));

    // After a real start (the cloud kernel): what may and may not follow.
    if let Some((kernel, agent)) = common::vm_assets() {
        let banger = Banger::start_with_env(&[("BANGER_AGENT_BIN", agent.as_path())]);
        let imported: Value = serde_json::from_str(&banger.ok(&[
            "kernel",
            "import",
            kernel.to_str().unwrap(),
            "--json",
        ]))
        .unwrap();
        let vmlinux = imported["vmlinux_path"].as_str().unwrap().to_string();
        let after = |d: &Path| -> Vec<(&'static str, String, Value)> {
            let p = |name: &str| d.join(name).display().to_string();
            vec![
                (
                    "PUT",
                    "/machine-config".into(),
                    json!({"vcpu_count": 1, "mem_size_mib": 128}),
                ),
                (
                    "PUT",
                    "/boot-source".into(),
                    json!({"kernel_image_path": vmlinux, "boot_args": "console=ttyS0 reboot=k panic=1"}),
                ),
                (
                    "PUT",
                    "/actions".into(),
                    json!({"action_type": "InstanceStart"}),
                ),
                (
                    "PUT",
                    "/actions".into(),
                    json!({"action_type": "InstanceStart"}),
                ),
                (
                    "PUT",
                    "/machine-config".into(),
                    json!({"vcpu_count": 1, "mem_size_mib": 128}),
                ),
                (
                    "PUT",
                    "/boot-source".into(),
                    json!({"kernel_image_path": vmlinux}),
                ),
                (
                    "PUT",
                    "/drives/root".into(),
                    json!({"drive_id": "root", "path_on_host": p("disk"), "is_root_device": false, "is_read_only": false}),
                ),
                (
                    "PUT",
                    "/vsock".into(),
                    json!({"guest_cid": 3, "uds_path": p("v2.sock")}),
                ),
                (
                    "PUT",
                    "/metrics".into(),
                    json!({"metrics_path": p("m.json")}),
                ),
                (
                    "PUT",
                    "/snapshot/create".into(),
                    json!({"snapshot_type": "Full", "snapshot_path": p("st"), "mem_file_path": p("mem")}),
                ),
                ("PATCH", "/vm".into(), json!({"state": "Paused"})),
                (
                    "PUT",
                    "/snapshot/load".into(),
                    json!({"snapshot_path": p("st"), "mem_backend": {"backend_type": "File", "backend_path": p("mem")}}),
                ),
                ("PATCH", "/vm".into(), json!({"state": "Resumed"})),
                (
                    "PUT",
                    "/actions".into(),
                    json!({"action_type": "SendCtrlAltDel"}),
                ),
            ]
        };
        let (rd, fd) = (
            tmp.path().join("real-started"),
            tmp.path().join("fake-started"),
        );
        fixtures(&rd);
        fixtures(&fd);
        let (real, fake) = (Fc::start(&real_fc, &rd), Fc::start(&fake_fc, &fd));
        for ((method, path, rbody), (_, _, fbody)) in after(&rd).into_iter().zip(after(&fd)) {
            let (rs, rf) = real.call(method, &path, &rbody);
            let (fs, ff) = fake.call(method, &path, &fbody);
            let line = format!("{method} {path} (started)\n  real: {rs} {rf}\n  fake: {fs} {ff}");
            eprintln!("{line}");
            assert_eq!((rs, rf.as_str()), (fs, ff.as_str()), "{line}");
        }
    }

    // Loading a snapshot is the first call or none; a failed load ends the process.
    for (bin, d) in [(&real_fc, rd.join("load")), (&fake_fc, fd.join("load"))] {
        let fc = Fc::start(bin, &d);
        fc.call(
            "PUT",
            "/machine-config",
            &json!({"vcpu_count": 1, "mem_size_mib": 128}),
        );
        let body = json!({"snapshot_path": d.join("nope"), "mem_backend": {"backend_type": "File", "backend_path": d.join("nope")}});
        let (status, fault) = fc.call("PUT", "/snapshot/load", &body);
        assert_eq!(status, 400);
        assert!(fault.starts_with("Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."), "{}: {fault}", bin.display());
        let mut fresh = Fc::start(bin, &d.join("fresh"));
        let (status, fault) = fresh.call("PUT", "/snapshot/load", &body);
        assert_eq!(status, 400);
        assert!(
            fault.contains("Failed to open snapshot file: No such file or directory"),
            "{fault}"
        );
        assert_eq!(
            fresh.exited(),
            Some(1),
            "{} exits after a failed load",
            bin.display()
        );
    }
    // A stale API socket file: exit 1 before serving.
    for bin in [&real_fc, &fake_fc] {
        let stale = tmp.path().join("stale-api.sock");
        std::fs::write(&stale, b"").unwrap();
        let status = Command::new(bin)
            .arg("--api-sock")
            .arg(&stale)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(1), "{}", bin.display());
    }
}

/// A daemon for the real binaries, with the test kernel and busybox, and a
/// short boot timeout (30 s: a guest that cannot boot here should not take
/// the default minute; `BANGER_TEST_FC_BOOT_TIMEOUT` sets a longer one, to
/// see Firecracker die of nested KVM on its own).
fn real_daemon(banger: &mut Banger, registry: &Registry, kernel: &Path) {
    let secs = std::env::var("BANGER_TEST_FC_BOOT_TIMEOUT").unwrap_or_else(|_| "30".into());
    std::fs::create_dir_all(banger.path("config")).unwrap();
    std::fs::write(
        banger.path("config/config.toml"),
        format!("boot_timeout_secs = {secs}\n"),
    )
    .unwrap();
    banger.start_daemon();
    let tmp = banger.path("fixtures");
    common::add_busybox_and_kernel(banger, registry, &tmp, kernel);
}

/// Starts `vm` and, while it boots, checks its jail (when jailed) as `uid`;
/// then the start's outcome: commands run, or a failure that names the VM,
/// the stage and what Firecracker said. Returns the VMM's pid.
fn start_and_check(banger: &Banger, vm: &str, jail: Option<(&Path, u32)>) -> u32 {
    let mut start = banger.cmd(&["vm", "start", vm]);
    let child = start
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = vm_info(banger, vm)["pid"].as_u64() {
            break pid as u32;
        }
        assert!(
            Instant::now() < deadline,
            "no VMM was launched: {}",
            banger.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some((root, uid)) = jail {
        assert_eq!(
            same_dir(Path::new(&format!("/proc/{pid}/root"))),
            same_dir(root)
        );
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uids = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap()
            .to_string();
        assert!(
            uids.split_whitespace()
                .skip(1)
                .all(|u| u == uid.to_string()),
            "{uids}"
        );
        let mut inside = common::entries(root);
        inside.retain(|n| !n.starts_with("vsock.sock"));
        eprintln!("the jail holds: {inside:?}");
        for name in [
            "dev",
            "fc.sock",
            "initrd.cpio",
            "vmlinux",
            "vmm.log",
            "metrics.json",
            "work.disk",
        ] {
            assert!(inside.contains(&name.to_string()), "{name} in {inside:?}");
        }
        let cpu = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        eprintln!("its cgroups:\n{cpu}");
        assert!(cpu.contains(&format!("/{vm}\n")), "{cpu}");
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("vm start {vm}: {}\n{err}", out.status);
    if out.status.success() {
        assert_eq!(banger.ok(&["vm", "exec", vm, "--", "hostname"]).trim(), vm);
    } else {
        assert!(
            err.contains(&format!("VM `{vm}` failed to boot at stage")),
            "{err}"
        );
        // Firecracker's own log lines (`<time> [<id>:<thread>:<LEVEL>] …`).
        let said = err
            .split("--- firecracker said ---")
            .nth(1)
            .unwrap_or_default();
        assert!(
            [":INFO]", ":WARN]", ":ERROR]"]
                .iter()
                .any(|l| said.contains(l)),
            "{err}"
        );
    }
    pid
}

#[test]
fn real_firecracker_runs_banger_boots_directly_and_through_the_jailer() {
    let (Some((fc, jailer)), Some((kernel, agent))) = (real(), common::vm_assets()) else {
        return skip();
    };
    if !common::root_or_skip("taps and the jailer need root") {
        return;
    }
    let registry = Registry::start();

    // Directly: Firecracker as the daemon's process.
    let mut banger = Banger::without_daemon();
    banger.add_env("BANGER_FIRECRACKER_BIN", &fc);
    banger.add_env("BANGER_AGENT_BIN", &agent);
    banger.add_env("BANGER_JAILER", Path::new("0"));
    real_daemon(&mut banger, &registry, &kernel);
    banger.ok(&[
        "vm",
        "create",
        "direct",
        "--image",
        "bb",
        "--vmm",
        "firecracker",
    ]);
    let pid = start_and_check(&banger, "direct", None);
    banger.ok(&["vm", "rm", "-f", "direct"]);
    assert!(!alive(pid));
    let Some(jailer) = jailer else {
        eprintln!("BANGER_JAILER_BIN is not set: the jailer half is skipped");
        return;
    };

    // Through the root helper's jailer, for an unprivileged user.
    let mut banger = Banger::without_daemon();
    let helper = Helper::start(
        &Bins {
            firecracker: fc.clone(),
            jailer,
            agent: agent.clone(),
        },
        banger.home.path(),
    );
    let _reaper = Reaper(helper.dir.path().join("jail"));
    banger.add_env(
        "BANGER_FIRECRACKER_BIN",
        &helper.trusted.join("firecracker"),
    );
    banger.add_env("BANGER_AGENT_BIN", &agent);
    banger.run_as(USER, Some(&helper.socket()));
    real_daemon(&mut banger, &registry, &kernel);
    banger.ok(&[
        "vm",
        "create",
        "jailed",
        "--image",
        "bb",
        "--vmm",
        "firecracker",
        "--cpu-quota",
        "100",
    ]);
    let jail = helper.jail(&banger.path("state"), "firecracker", "jailed");
    let pid = start_and_check(&banger, "jailed", Some((&jail.join("root"), USER)));
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    banger.ok(&["vm", "rm", "-f", "jailed"]);
    assert!(!alive(pid));
    assert!(!jail.exists(), "the jail is removed");
    for line in cgroup.lines().filter(|l| l.ends_with("/jailed")) {
        let controller = line.split(':').nth(1).unwrap_or_default();
        let path = line.rsplit(':').next().unwrap();
        assert!(
            cgroup_dir(controller, path).is_none(),
            "cgroup {line} is removed"
        );
    }
    eprintln!("helper log:\n{}", helper.log());
}

/// Where KVM runs guests: the cloud kernel and the agent boot under the
/// real Firecracker, jailed when a jailer is given, and run commands.
#[test]
fn real_firecracker_boots_the_cloud_kernel() {
    let (Some((fc, jailer)), Some((kernel, agent))) = (real(), common::vm_assets()) else {
        return skip();
    };
    let doctor = Command::new(common::exe())
        .args(["doctor", "--json"])
        .env("BANGER_HOME", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    let checks: Value = serde_json::from_slice(&doctor.stdout).unwrap_or_default();
    let kvm_runs = checks
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["name"] == "kvm" && c["status"] == "ok");
    if !kvm_runs {
        eprintln!("skipping: KVM cannot run guests here (`banger doctor`)");
        return;
    }
    let registry = Registry::start();
    let mut banger = Banger::without_daemon();
    banger.add_env("BANGER_FIRECRACKER_BIN", &fc);
    banger.add_env("BANGER_AGENT_BIN", &agent);
    if let Some(jailer) = &jailer {
        banger.add_env("BANGER_JAILER_BIN", jailer);
    }
    real_daemon(&mut banger, &registry, &kernel);
    banger.ok(&["vm", "run", "real", "--image", "bb", "--vmm", "firecracker"]);
    assert_eq!(
        banger.ok(&["vm", "exec", "real", "--", "hostname"]).trim(),
        "real"
    );
    banger.ok(&["vm", "stop", "real"]);
    banger.ok(&["vm", "rm", "real"]);
}
