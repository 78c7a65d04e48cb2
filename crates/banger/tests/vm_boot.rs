//! Real VMs: the Debian cloud kernel imported from its .deb, a busybox image
//! from the local registry, booted with QEMU microvm under TCG.

mod common;

use std::time::Duration;

use banger_testkit::images::push_busybox;
use banger_testkit::layer::Compression;
use banger_testkit::layout::Layout;
use banger_testkit::registry::Registry;
use common::Banger;

fn start_banger(agent: &std::path::Path) -> Banger {
    let mut banger = Banger::without_daemon();
    common::start_vm_daemon(&mut banger, agent);
    banger
}

fn qemu_pids_for(dir: &str) -> Vec<u32> {
    common::pids_naming(&["qemu-system", dir])
}

#[test]
fn vms_boot_run_commands_persist_and_survive_a_daemon_kill() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");

    let mut banger = start_banger(&agent);
    let out = banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    assert!(out.contains("default"), "{out}");
    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);

    // vm run, then exec: output, separate streams, exit codes, stdin.
    let out = banger.ok(&["vm", "run", "web", "--image", "busybox", "--memory", "256M"]);
    assert!(out.contains("ready"), "{out}");
    let run = banger.run(&[
        "vm",
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo out:$(hostname); echo err >&2; exit 7",
    ]);
    assert_eq!(run.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&run.stdout), "out:web\n");
    assert_eq!(String::from_utf8_lossy(&run.stderr), "err\n");
    streams_keep_to_their_readers(&banger);
    let run = banger.run(&[
        "vm",
        "exec",
        "web",
        "--",
        "printf",
        "%s|",
        "two words",
        "*",
        "$HOME",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "two words|*|$HOME|",
        "argv passes unchanged"
    );
    assert_eq!(
        banger
            .run(&["vm", "exec", "web", "--", "no-such-command"])
            .status
            .code(),
        Some(127)
    );
    let mut child = banger
        .cmd(&["vm", "exec", "web", "--", "sh", "-c", "tr a-z A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"piped stdin\n").unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED STDIN\n");
    // Never hangs with stdin at /dev/null (the harness's default).
    assert!(banger
        .run(&["vm", "exec", "web", "--", "cat"])
        .status
        .success());

    copy_round_trip(&banger, tmp.path());

    // Working directory, environment and user.
    let out = banger.ok(&[
        "vm",
        "exec",
        "-w",
        "/tmp",
        "-e",
        "GREETING=hi there",
        "-u",
        "nobody",
        "web",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING|$(pwd)|$(id -u)\"",
    ]);
    assert_eq!(out, "hi there|/tmp|65534\n");

    // A terminal when asked for; `vm ssh` is a login shell on one.
    let tty = banger.ok(&["vm", "exec", "-t", "web", "--", "tty"]);
    assert!(tty.starts_with("/dev/pts/"), "{tty}");
    let mut shell = banger
        .cmd(&["vm", "ssh", "web"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        shell.stdin.as_mut().unwrap(),
        b"echo in-$((40+2))-shell; exit 3\n",
    )
    .unwrap();
    let out = shell.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("in-42-shell"));

    // Ctrl-C reaches the guest process.
    let mut child = banger
        .cmd(&[
            "vm",
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 9' INT; echo started; while true; do sleep 1; done",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert_eq!(first, "started\n");
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(9), "{rest}");
    assert!(rest.contains("got-int"), "{rest}");

    // Files written in the guest survive stop/start, on the root and work disks.
    banger.ok(&[
        "vm",
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "echo root-data > /etc/kept; echo work-data > /work/kept",
    ]);
    banger.ok(&["vm", "stop", "web"]);
    let ls: serde_json::Value = serde_json::from_str(&banger.ok(&["vm", "ls", "--json"])).unwrap();
    assert_eq!(ls[0]["state"], "stopped");
    let stopped = banger.run(&["vm", "exec", "web", "--", "true"]);
    assert_eq!(stopped.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("banger vm start web"));
    banger.ok(&["vm", "start", "web"]);
    let out = banger.ok(&["vm", "exec", "web", "--", "cat", "/etc/kept", "/work/kept"]);
    assert_eq!(out, "root-data\nwork-data\n");
    let logs = banger.ok(&["vm", "logs", "web"]);
    assert!(logs.matches("banger-agent: ready").count() >= 2, "{logs}");
    assert!(
        banger
            .ok(&["vm", "logs", "web", "--tail", "1"])
            .lines()
            .count()
            <= 1
    );

    // The daemon dies hard; the VM keeps running and is re-attached.
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "web", "--json"])).unwrap();
    let qemu_pid = info[0]["pid"].as_u64().unwrap();
    banger.kill_daemon(libc::SIGKILL);
    banger.start_daemon();
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "web", "--json"])).unwrap();
    assert_eq!(info[0]["state"], "running");
    assert_eq!(info[0]["pid"].as_u64().unwrap(), qemu_pid);
    assert_eq!(
        banger.ok(&["vm", "exec", "web", "--", "cat", "/work/kept"]),
        "work-data\n"
    );

    // A host that leaves bytes unread in the agent's SSH port (here: junk,
    // then gone) must not wedge the next connection.
    banger.kill_daemon(libc::SIGKILL);
    {
        use std::io::Write;
        let dir = info[0]["dir"].as_str().unwrap();
        let mut junk = std::os::unix::net::UnixStream::connect(format!("{dir}/ssh.sock")).unwrap();
        let _ = junk.write_all(&[b'x'; 64 * 1024]);
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(300));
    banger.start_daemon();
    assert_eq!(
        banger.ok(&["vm", "exec", "web", "--", "cat", "/work/kept"]),
        "work-data\n"
    );

    // A VM whose VMM died while the daemon was away is reported stopped.
    banger.kill_daemon(libc::SIGKILL);
    unsafe { libc::kill(qemu_pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    banger.start_daemon();
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "web", "--json"])).unwrap();
    assert_eq!(info[0]["state"], "stopped");
    let dir = info[0]["dir"].as_str().unwrap().to_string();
    assert!(
        !std::path::Path::new(&dir).join("ssh.sock").exists(),
        "leftovers cleaned"
    );

    // The daemon dies between spawning QEMU and recording it: the next
    // daemon finds the unrecorded VMM by its command line and stops it, and
    // the VM starts again.
    banger.kill_daemon(libc::SIGTERM);
    banger.add_env("BANGER_TEST_KILL_AT", std::path::Path::new("runtime"));
    banger.start_daemon();
    let died = banger.run(&["vm", "start", "web"]);
    assert!(!died.status.success(), "the daemon was to die mid-start");
    assert_eq!(qemu_pids_for(&dir).len(), 1, "an orphaned VMM");
    banger.kill_daemon(libc::SIGKILL);
    banger.remove_env("BANGER_TEST_KILL_AT");
    banger.start_daemon();
    assert!(qemu_pids_for(&dir).is_empty(), "the orphan was stopped");
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "web", "--json"])).unwrap();
    assert_eq!(info[0]["state"], "stopped");
    banger.ok(&["vm", "start", "web"]);
    assert_eq!(
        banger.ok(&["vm", "exec", "web", "--", "cat", "/work/kept"]),
        "work-data\n"
    );

    // Four VMs start at once.
    let names = ["p1", "p2", "p3", "p4"];
    let children: Vec<_> = names
        .iter()
        .map(|n| {
            banger
                .cmd(&["vm", "run", n, "--image", "busybox", "--memory", "192M"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            banger.daemon_log()
        );
    }
    for n in names {
        assert_eq!(banger.ok(&["vm", "exec", n, "--", "hostname"]).trim(), n);
    }
    a_frozen_vm_holds_up_nothing(&banger);

    // rm -f stops and removes everything: no process, no file.
    let dirs: Vec<String> = names
        .iter()
        .map(|n| {
            let v: serde_json::Value =
                serde_json::from_str(&banger.ok(&["vm", "inspect", n, "--json"])).unwrap();
            v[0]["dir"].as_str().unwrap().to_string()
        })
        .collect();
    let mut all = names.to_vec();
    all.push("web");
    let mut args = vec!["vm", "rm", "-f"];
    args.extend(all.iter().copied());
    banger.ok(&args);
    for d in dirs.iter().chain(std::iter::once(&dir)) {
        assert!(!std::path::Path::new(d).exists(), "{d} left behind");
        assert!(qemu_pids_for(d).is_empty(), "a VMM of {d} still runs");
    }
    assert_eq!(banger.ok(&["vm", "ls", "--json"]).trim(), "[]");
    // Idempotent.
    banger.ok(&["vm", "rm", "-f", "web"]);
}

/// Socket paths stay within `sun_path` whatever the home and the name: a
/// 63-character VM name in a deep home boots and runs commands.
#[test]
fn a_long_name_in_a_deep_home_boots() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let mut banger = Banger::with_home_prefix(&"deep-home-".repeat(5));
    banger.add_env("BANGER_QEMU_ACCEL", std::path::Path::new("tcg"));
    banger.add_env("BANGER_AGENT_BIN", &agent);
    banger.start_daemon();
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");
    banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);
    let name = "a".repeat(63);
    let socket = banger.path(&format!("state/vms/{name}/ssh.sock"));
    assert!(socket.as_os_str().len() > 107, "{}", socket.display());
    banger.ok(&["vm", "run", &name, "--image", "busybox", "--memory", "192M"]);
    assert_eq!(
        banger.ok(&["vm", "exec", &name, "--", "hostname"]).trim(),
        name
    );
    banger.ok(&["vm", "rm", "-f", &name]);
}

#[test]
fn a_boot_failure_names_the_stage_and_shows_the_console() {
    let Some((_, agent)) = common::vm_assets() else {
        return;
    };
    let banger = start_banger(&agent);
    // A "kernel" that is an ELF but not a kernel: QEMU refuses it.
    let fake = banger.path("fake-vmlinux");
    std::fs::copy(&agent, &fake).unwrap();
    let out = banger.ok(&[
        "kernel",
        "import",
        fake.to_str().unwrap(),
        "--name",
        "broken",
    ]);
    assert!(out.contains("broken"), "{out}");
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");
    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);
    let err = banger.fails(&[
        "vm", "run", "bad", "--image", "busybox", "--kernel", "broken",
    ]);
    assert!(err.contains("failed to boot at stage"), "{err}");
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "bad", "--json"])).unwrap();
    assert_eq!(info[0]["state"], "stopped", "the failed start was undone");
    assert!(qemu_pids_for(info[0]["dir"].as_str().unwrap()).is_empty());
}

#[test]
fn a_debian_image_boots_and_runs_its_own_tools() {
    let Some(vms) = common::DebianVms::start() else {
        return;
    };
    let banger = &vms.banger;
    banger.ok(&["vm", "run", "deb", "--image", "debian", "--memory", "256M"]);
    // The agent reads root's login shell (bash here) into the page cache
    // after the root switch, ahead of the first `vm ssh`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let res = banger.ok(&[
            "vm",
            "exec",
            "deb",
            "--",
            "fincore",
            "--bytes",
            "--noheadings",
            "--output",
            "RES,SIZE",
            "/usr/bin/bash",
        ]);
        // RES counts whole pages.
        let fields: Vec<u64> = res
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        if fields.len() == 2 && fields[0] >= fields[1] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bash never fully cached: {res}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let readahead = banger.ok(&[
        "vm",
        "exec",
        "deb",
        "--",
        "cat",
        "/sys/block/vda/queue/read_ahead_kb",
        "/sys/block/vdb/queue/read_ahead_kb",
    ]);
    assert_eq!(readahead, "1024\n1024\n");
    let version = banger.ok(&["vm", "exec", "deb", "--", "cat", "/etc/debian_version"]);
    assert!(version.starts_with("12"), "{version}");
    let out = banger.ok(&[
        "vm",
        "exec",
        "deb",
        "--",
        "bash",
        "-c",
        "echo $BASH_VERSION; id -un; dpkg-query -W -f='${Status}' bash",
    ]);
    assert!(
        out.contains("root") && out.contains("install ok installed"),
        "{out}"
    );
    // setuid bits survive the whole pipeline: su is setuid root in Debian.
    let mode = banger.ok(&[
        "vm",
        "exec",
        "deb",
        "--",
        "stat",
        "-c",
        "%a %U",
        "/usr/bin/su",
    ]);
    assert_eq!(mode.trim(), "4755 root");
    banger.ok(&["vm", "rm", "-f", "deb"]);
}

#[test]
fn a_kernel_published_as_an_oci_image_is_pulled_and_boots() {
    let Some((kernel_deb, agent)) = common::vm_assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let unpacked = tmp.path().join("deb");
    let status = std::process::Command::new("dpkg-deb")
        .arg("-x")
        .arg(&kernel_deb)
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(status.success());
    // /boot and just the virtio/vsock modules (and what they need), as a kernel image would ship them.
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_dir_all("boot", unpacked.join("boot"))
        .unwrap();
    let modules_root = std::fs::read_dir(unpacked.join("lib/modules"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let version = modules_root
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let kernel_dir = modules_root.join("kernel");
    for sub in [
        "drivers/virtio",
        "drivers/block",
        "drivers/char",
        "drivers/net",
        "net/vmw_vsock",
        "net/core",
    ] {
        let dir = kernel_dir.join(sub);
        if dir.is_dir() {
            builder
                .append_dir_all(format!("lib/modules/{version}/kernel/{sub}"), &dir)
                .unwrap();
        }
    }
    let layer = builder.into_inner().unwrap();

    let registry = Registry::start();
    let mut layout = Layout::new(&tmp.path().join("oci"));
    let image = layout.image(&[(Compression::Gzip, layer)], "amd64");
    layout.tag("t", &image);
    registry.push(&layout.dir, "t", "kernels/cloud:6.1", &[]);
    push_busybox(&registry, &tmp.path().join("bb"), "busybox:latest");

    let banger = start_banger(&agent);
    let out = banger.ok(&[
        "kernel",
        "pull",
        &registry.reference("kernels/cloud:6.1"),
        "--name",
        "pulled",
    ]);
    assert!(out.contains("pulled"), "{out}");
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["kernel", "inspect", "pulled"])).unwrap();
    assert_eq!(info[0]["version"], version);
    assert!(info[0]["modules_dir"].as_str().unwrap().ends_with(&version));
    assert_eq!(
        banger.ok(&["image", "ls", "--json"]).trim(),
        "[]",
        "the scratch image is gone"
    );

    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);
    banger.ok(&[
        "vm", "run", "k", "--image", "busybox", "--kernel", "pulled", "--memory", "256M",
    ]);
    assert_eq!(
        banger.ok(&["vm", "exec", "k", "--", "uname", "-r"]).trim(),
        version
    );
    banger.ok(&["vm", "rm", "-f", "k"]);
}

/// `vm cp` both ways: a tree with modes, a symlink and a nested directory
/// goes in and comes back the same; `-` streams tar; errors name the path.
fn copy_round_trip(banger: &common::Banger, tmp: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let tree = tmp.join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::write(tree.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(tree.join("run.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::write(tree.join("sub/deeper/data"), vec![7u8; 200_000]).unwrap();
    std::os::unix::fs::symlink("run.sh", tree.join("link")).unwrap();

    banger.ok(&["vm", "cp", tree.to_str().unwrap(), "web:/tmp/"]);
    assert_eq!(
        banger.ok(&["vm", "exec", "web", "--", "/tmp/tree/link"]),
        "ran\n"
    );
    assert_eq!(
        banger.ok(&[
            "vm",
            "exec",
            "web",
            "--",
            "stat",
            "-c",
            "%a %s",
            "/tmp/tree/run.sh",
            "/tmp/tree/sub/deeper/data"
        ]),
        "750 19\n644 200000\n"
    );

    let back = tmp.join("back");
    banger.ok(&["vm", "cp", "web:/tmp/tree", back.to_str().unwrap()]);
    let mode = std::fs::metadata(back.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750);
    assert_eq!(
        std::fs::read(back.join("sub/deeper/data")).unwrap(),
        vec![7u8; 200_000]
    );
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        std::path::Path::new("run.sh")
    );

    // Tar streams on stdin and stdout.
    let out = banger
        .cmd(&["vm", "cp", "web:/tmp/tree/sub", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let names: Vec<String> = tar::Archive::new(&out.stdout[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(names.iter().any(|n| n == "sub/deeper/data"), "{names:?}");
    let mut child = banger
        .cmd(&["vm", "cp", "-", "web:/tmp/"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &out.stdout).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert_eq!(
        banger.ok(&[
            "vm",
            "exec",
            "web",
            "--",
            "stat",
            "-c",
            "%s",
            "/tmp/sub/deeper/data"
        ]),
        "200000\n"
    );

    let missing = banger.run(&["vm", "cp", "web:/nope", tmp.join("x").to_str().unwrap()]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/nope"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // docker cp naming: one file to a new name, either way.
    banger.ok(&[
        "vm",
        "cp",
        tree.join("run.sh").to_str().unwrap(),
        "web:/tmp/new-name",
    ]);
    assert_eq!(
        banger.ok(&["vm", "exec", "web", "--", "cat", "/tmp/new-name"]),
        "#!/bin/sh\necho ran\n"
    );
    let renamed = tmp.join("renamed.sh");
    banger.ok(&["vm", "cp", "web:/tmp/new-name", renamed.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(&renamed).unwrap(),
        "#!/bin/sh\necho ran\n"
    );

    // A destination holding a symlink out where the copy lands: the link is
    // replaced, never followed.
    let outside = tmp.join("outside");
    let trap = tmp.join("trap");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&trap).unwrap();
    std::os::unix::fs::symlink(&outside, trap.join("tree")).unwrap();
    banger.ok(&["vm", "cp", "web:/tmp/tree", trap.to_str().unwrap()]);
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    assert!(std::fs::symlink_metadata(trap.join("tree"))
        .unwrap()
        .is_dir());
    assert_eq!(
        std::fs::read(trap.join("tree/sub/deeper/data"))
            .unwrap()
            .len(),
        200_000
    );

    // A large upload to a directory the guest lacks fails at once.
    let big = tmp.join("big.bin");
    std::fs::write(&big, vec![1u8; 8 << 20]).unwrap();
    let started = std::time::Instant::now();
    let out = banger.run(&["vm", "cp", big.to_str().unwrap(), "web:/no/such/dir/"]);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// Runs a shell pipeline with `banger` meaning this test's CLI and home;
/// its output, within `limit`.
fn pipeline(banger: &Banger, script: &str, limit: Duration) -> std::process::Output {
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new("sh")
        .args(["-c", script])
        .env("BANGER_HOME", banger.home.path())
        .env(
            "PATH",
            format!("{}:{}", exe_dir(), std::env::var("PATH").unwrap()),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("`{script}` still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn exe_dir() -> String {
    std::path::Path::new(common::exe())
        .parent()
        .unwrap()
        .display()
        .to_string()
}

/// stdin and output move at the pace of their readers, with bounded
/// memory, and one stalled reader holds up nothing else.
fn streams_keep_to_their_readers(banger: &Banger) {
    let base = common::daemon_peak_kib(banger);
    // A command that never reads stdin ends, and so does the CLI.
    let out = pipeline(
        banger,
        "head -c 4M /dev/zero | banger vm exec web -- true",
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{out:?}");
    // Much more stdin than memory should hold, for a command that ignores it.
    let out = pipeline(
        banger,
        "head -c 300M /dev/zero | banger vm exec web -- sleep 2",
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
    // stdin the command reads all of arrives whole.
    let out = pipeline(
        banger,
        "head -c 16M /dev/zero | banger vm exec web -- wc -c",
        Duration::from_secs(120),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "16777216");
    // A reader that stops reading a big output stalls only itself.
    let mut stalled = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("{} vm exec web -- cat /dev/zero | sleep 6", common::exe()),
        ])
        .env("BANGER_HOME", banger.home.path())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..3 {
        let out = pipeline(
            banger,
            "banger vm exec web -- echo still-here",
            Duration::from_secs(15),
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "still-here\n");
    }
    let grown = common::daemon_peak_kib(banger).saturating_sub(base);
    assert!(
        grown < 64 * 1024,
        "the daemon's memory grew by {grown} KiB while streams were held up"
    );
    // A port forward whose client stops reading stalls only itself.
    banger.ok(&[
        "vm",
        "exec",
        "web",
        "--",
        "sh",
        "-c",
        "printf '#!/bin/sh\\nexec cat /dev/zero\\n' > /tmp/zero.sh && chmod +x /tmp/zero.sh",
    ]);
    let mut server = banger
        .cmd(&[
            "vm",
            "exec",
            "web",
            "--",
            "nc",
            "-ll",
            "-p",
            "9000",
            "-e",
            "/tmp/zero.sh",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (mut forward, listening) = banger.port_forward("web", "0:9000");
    let idle_reader = std::net::TcpStream::connect(&listening).unwrap();
    // Long enough for every buffer between the guest and this idle reader
    // (socket buffers, russh's per-channel queue) to fill.
    std::thread::sleep(Duration::from_secs(12));
    for _ in 0..3 {
        let out = pipeline(
            banger,
            "banger vm exec web -- echo beside-a-stalled-forward",
            Duration::from_secs(15),
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "beside-a-stalled-forward\n"
        );
    }
    // The forward really carried the guest's stream (it was only unread).
    let mut first = [0u8; 4096];
    idle_reader
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let got = std::io::Read::read(&mut &idle_reader, &mut first).unwrap();
    assert!(got > 0, "the guest's stream never arrived");
    drop(idle_reader);
    let _ = forward.kill();
    let _ = forward.wait();
    let _ = server.kill();
    let _ = server.wait();
    let _ = stalled.wait();
    // Its reader gone, the CLI ends (SIGPIPE-like) and so does the command.
    wait_gone_from_web(banger, "cat /dev/zero", Duration::from_secs(15));
    // SIGTERM ends the CLI even while its stdin is jammed, and the command
    // is hung up with it.
    let mut jammed = std::process::Command::new(common::exe())
        .args(["vm", "exec", "web", "--", "sleep", "300"])
        .env("BANGER_HOME", banger.home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = jammed.stdin.take().unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        let zeros = vec![0u8; 64 * 1024];
        while stdin.write_all(&zeros).is_ok() {}
    });
    std::thread::sleep(Duration::from_secs(2));
    let asked = std::time::Instant::now();
    unsafe { libc::kill(jammed.id() as i32, libc::SIGTERM) };
    let status = jammed.wait().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    wait_gone_from_web(banger, "sleep 300", Duration::from_secs(10));
}

/// Waits until no process in VM `web` runs `command`, within `limit`.
fn wait_gone_from_web(banger: &Banger, command: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let ps = banger.ok(&["vm", "exec", "web", "--", "ps"]);
        if !ps.contains(command) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still running: {ps}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// With one guest frozen (its VMM SIGSTOPped) while a user-key change is
/// pushed to every VM: the other VMs still get the key, and `vm stop -t 3`
/// of the frozen one ends in about that time.
fn a_frozen_vm_holds_up_nothing(banger: &Banger) {
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "p1", "--json"])).unwrap();
    let pid = info[0]["pid"].as_u64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let key = banger.path("user-home/.ssh/id_frozen");
    common::must(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {}",
        key.display()
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let updated = |vm: &str| {
        banger
            .daemon_log()
            .lines()
            .any(|l| l.contains("user keys updated") && l.contains(&format!("vm={vm} ")))
    };
    while !(updated("p2") && updated("p3") && updated("p4")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the other VMs never got the key: {}",
            banger.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let asked = std::time::Instant::now();
    banger.ok(&["vm", "stop", "-t", "3", "p1"]);
    assert!(
        asked.elapsed() < Duration::from_secs(12),
        "vm stop -t 3 of a frozen VM took {:?}",
        asked.elapsed()
    );
    unsafe { libc::kill(pid, libc::SIGCONT) };
}
