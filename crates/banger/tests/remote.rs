//! `--host ssh://…` against a real OpenSSH server this test starts on
//! loopback (its own host key, one authorized key): the CLI runs `ssh HOST
//! banger daemon dial-stdio`, which starts the "remote" daemon (a home of
//! its own) and joins the CLI to it. Commands of every kind go through it;
//! the local home never gets a daemon.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::images::push_busybox;
use banger_testkit::registry::Registry;
use common::must;

struct Sshd {
    child: Child,
    dir: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// sshd on 127.0.0.1 (root may log in with the test's key only), and an
/// ssh client config naming it `banger-remote`.
fn start_sshd(dir: &Path) -> Sshd {
    let port = free_port();
    for key in ["host_key", "client_key"] {
        must(&format!(
            "ssh-keygen -q -t ed25519 -N '' -f {}",
            dir.join(key).display()
        ));
    }
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
    std::fs::write(
        dir.join("known_hosts"),
        format!("[127.0.0.1]:{port} {host_pub}"),
    )
    .unwrap();
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
             AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile {d}/sshd.pid\nSubsystem sftp internal-sftp\n",
            d = dir.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("ssh_config"),
        format!(
            "Host banger-remote\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  \
             IdentityFile {d}/client_key\n  IdentitiesOnly yes\n  \
             UserKnownHostsFile {d}/known_hosts\n  StrictHostKeyChecking yes\n  \
             BatchMode yes\n  ConnectTimeout 10\n",
            d = dir.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Sshd {
        child,
        dir: dir.to_path_buf(),
    }
}

/// The CLI on "this machine", driving the remote daemon.
struct Cli {
    local_home: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Cli {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(common::exe());
        c.args(args)
            .env("BANGER_HOME", self.local_home.path())
            .env_remove("BANGER_AGENT_BIN")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "banger {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        common::with_stdin(&mut self.cmd(args), input)
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "the remote test needs root (sshd)"
        );
        eprintln!("skipping: the remote test needs root (sshd)");
    }
    root
}

#[test]
fn every_kind_of_command_drives_a_daemon_over_ssh() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");
    let sshd = start_sshd(&tmp.path().join("ssh").tap_mkdir());
    let remote_home = tmp.path().join("remote-home");
    let remote_user_home = tmp.path().join("remote-user");
    std::fs::create_dir_all(remote_user_home.join(".ssh")).unwrap();
    // Whoever may log in there may log into the VMs there.
    std::fs::copy(
        sshd.dir.join("client_key.pub"),
        remote_user_home.join(".ssh/authorized_keys"),
    )
    .unwrap();
    // What the login shell on the remote runs: its own banger, home and settings.
    let remote_banger = format!(
        "env BANGER_HOME={} HOME={} BANGER_NETWORK=none BANGER_QEMU_ACCEL=tcg BANGER_AGENT_BIN={} {}",
        remote_home.display(),
        remote_user_home.display(),
        agent.display(),
        common::exe()
    );
    let cli = Cli {
        local_home: tempfile::tempdir().unwrap(),
        env: vec![
            ("BANGER_HOST".into(), "ssh://banger-remote".into()),
            (
                "BANGER_SSH_COMMAND".into(),
                format!("ssh -F {}", sshd.dir.join("ssh_config").display()),
            ),
            ("BANGER_REMOTE_COMMAND".into(), remote_banger),
            // Control sockets of this test only.
            (
                "XDG_RUNTIME_DIR".into(),
                tmp.path().join("run").tap_mkdir().display().to_string(),
            ),
        ],
    };

    // Commands about the machine run there whole; no daemon yet.
    let status = cli.run(&["daemon", "status"]);
    assert_eq!(status.status.code(), Some(3), "{status:?}");
    // A path argument names a file there, and must be whole.
    let relative = cli.run(&["kernel", "import", "kernel.deb"]);
    assert!(
        String::from_utf8_lossy(&relative.stderr).contains("give it whole"),
        "{relative:?}"
    );
    cli.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    cli.ok(&[
        "image",
        "pull",
        &registry.reference("busybox:latest"),
        "--name",
        "bb",
    ]);
    assert!(
        remote_home.join("run/banger.sock").exists(),
        "started there"
    );
    cli.ok(&["vm", "run", "r1", "--image", "bb"]);
    let listed: serde_json::Value = serde_json::from_str(&cli.ok(&["vm", "ls", "--json"])).unwrap();
    assert_eq!(listed[0]["name"], "r1", "{listed}");

    // exec with stdin, exit status and a terminal.
    let out = cli.with_stdin(
        &[
            "vm",
            "exec",
            "r1",
            "--",
            "sh",
            "-c",
            "cat; echo done; exit 7",
        ],
        b"piped in\n",
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped in\ndone\n");
    let tty = cli.ok(&["vm", "exec", "-t", "r1", "--", "tty"]);
    assert!(tty.contains("/dev/pts/"), "{tty}");

    // cp both ways, with this machine's files.
    let up = tmp.path().join("up.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(&up, &data).unwrap();
    cli.ok(&["vm", "cp", up.to_str().unwrap(), "r1:/tmp/"]);
    let down = tmp.path().join("down");
    std::fs::create_dir_all(&down).unwrap();
    cli.ok(&["vm", "cp", "r1:/tmp/up.bin", down.to_str().unwrap()]);
    assert_eq!(std::fs::read(down.join("up.bin")).unwrap(), data);

    // Logs, and following them.
    cli.ok(&[
        "vm",
        "exec",
        "r1",
        "--",
        "sh",
        "-c",
        "echo marker-one > /dev/console",
    ]);
    assert!(cli.ok(&["vm", "logs", "r1"]).contains("marker-one"));
    let mut follow = cli
        .cmd(&["vm", "logs", "-f", "r1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cli.ok(&[
        "vm",
        "exec",
        "r1",
        "--",
        "sh",
        "-c",
        "echo marker-two > /dev/console",
    ]);
    let seen = read_until(
        follow.stdout.take().unwrap(),
        "marker-two",
        Duration::from_secs(20),
    );
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen.contains("marker-two"), "{seen}");

    // Plain OpenSSH from here to the VM there: ssh-config's entries go
    // through `banger --host … vm dial r1 22`, host key pinned.
    let written: serde_json::Value =
        serde_json::from_str(&cli.ok(&["ssh-config", "--json"])).unwrap();
    assert_eq!(written["hosts"][0], "r1.banger-remote", "{written}");
    let mut ssh = Command::new("ssh");
    ssh.arg("-F")
        .arg(written["config"].as_str().unwrap())
        .arg("-i")
        .arg(sshd.dir.join("client_key"))
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .args(["r1.banger-remote", "--", "hostname"])
        .env("BANGER_HOME", cli.local_home.path())
        .envs(cli.env.iter().map(|(k, v)| (k, v)));
    let out = ssh.output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "r1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A port forward opens here and reaches the VM there.
    cli.ok(&[
        "vm",
        "exec",
        "r1",
        "--",
        "sh",
        "-c",
        "mkdir -p /tmp/www && echo hello from r1 > /tmp/www/index.html && httpd -p 8000 -h /tmp/www",
    ]);
    let mut forward = cli
        .cmd(&["vm", "port-forward", "r1", "0:8000", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let event = read_until(
        forward.stdout.take().unwrap(),
        "\n",
        Duration::from_secs(30),
    );
    let event: serde_json::Value = serde_json::from_str(event.trim()).expect("a listening event");
    let local = event["listening"].as_str().unwrap().to_string();
    assert!(local.starts_with("127.0.0.1:"), "{local}");
    for _ in 0..2 {
        let page = http_get(&local);
        assert!(page.contains("hello from r1"), "{page}");
    }
    let _ = forward.kill();
    let _ = forward.wait();
    assert!(
        std::net::TcpStream::connect(&local).is_err(),
        "the local port outlived the forward"
    );

    // An archive on this machine's stdin is imported there.
    let archive = tmp.path().join("bb.tar");
    must(&format!(
        "skopeo copy --quiet --src-tls-verify=false docker://{} docker-archive:{}:bb:v2",
        registry.reference("busybox:latest"),
        archive.display()
    ));
    let imported = cli.with_stdin(
        &["image", "import", "-", "--name", "bb2"],
        &std::fs::read(&archive).unwrap(),
    );
    assert!(imported.status.success(), "{imported:?}");
    assert!(cli.ok(&["image", "ls", "-q"]).contains("bb2"));

    // doctor describes the remote machine.
    let doctor = cli.run(&["doctor"]);
    assert!(
        String::from_utf8_lossy(&doctor.stdout).contains("reachable"),
        "{doctor:?}"
    );

    cli.ok(&["vm", "rm", "-f", "r1"]);
    cli.ok(&["daemon", "stop"]);
    assert!(
        !cli.local_home.path().join("run/banger.sock").exists(),
        "no daemon ever ran here"
    );

    // A host that cannot be reached says so.
    let mut unreachable = cli.cmd(&["vm", "ls"]);
    unreachable.env("BANGER_HOST", "ssh://root@127.0.0.1:1");
    let out = unreachable.output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("ssh://root@127.0.0.1:1"),
        "{said}"
    );
    // Said as what it is: ssh did not get through, no daemon crashed.
    assert!(
        said.contains("ssh could not connect or log in") && !said.contains("did it crash"),
        "{said}"
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// Reads `from` until `want` appears or `limit` passes; the reader thread
/// owns the pipe, so a silent stream cannot hang the test (it ends when the
/// child is killed).
fn read_until(mut from: impl Read + Send + 'static, want: &str, limit: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && !seen.contains(want) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(bytes) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    seen
}

fn http_get(addr: &str) -> String {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    let _ = conn.read_to_string(&mut page);
    page
}
