//! Real VM networking inside network namespaces this test creates (the
//! host's own network is never touched): the daemon runs in namespace H, an
//! "internet" HTTP server in namespace I behind a veth pair. VMs are reached
//! by address from H, reach I only through NAT, and cannot reach each other
//! or the host.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_testkit::images::push_busybox;
use banger_testkit::registry::Registry;
use common::Banger;

fn assets() -> Option<(PathBuf, PathBuf)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let msg = "network tests need root";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("skipping: {msg}");
        return None;
    }
    common::vm_assets()
}

fn sh(script: &str) -> std::process::Output {
    Command::new("sh").args(["-c", script]).output().unwrap()
}

fn must(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces joined by a veth pair, and what runs in them; all removed on drop.
struct Lab {
    host: String,
    inet: String,
    servers: Vec<Child>,
}

/// Who the daemon runs as: no passwd entry needed.
const DAEMON_UID: u32 = 4242;
const HOST_ADDR: &str = "198.51.100.1";
const INET_ADDR: &str = "198.51.100.2";

impl Lab {
    fn new() -> Lab {
        let id = std::process::id() % 100_000;
        let lab = Lab {
            host: format!("bgh{id}"),
            inet: format!("bgi{id}"),
            servers: Vec::new(),
        };
        let (h, i) = (&lab.host, &lab.inet);
        must(&format!(
            "set -e; ip netns add {h}; ip netns add {i}
             ip link add vh{id} netns {h} type veth peer name vi{id} netns {i}
             ip -n {h} link set lo up; ip -n {i} link set lo up
             ip -n {h} addr add {HOST_ADDR}/24 dev vh{id}; ip -n {h} link set vh{id} up
             ip -n {i} addr add {INET_ADDR}/24 dev vi{id}; ip -n {i} link set vi{id} up
             ip -n {h} route add default via {INET_ADDR}"
        ));
        lab
    }

    /// The root helper in the host namespace, serving [`DAEMON_UID`] with
    /// VMs under `home`; its socket is `dir/helper.sock`.
    fn helper(&mut self, dir: &Path, home: &Path) {
        let socket = dir.join("helper.sock");
        let log = std::fs::File::create(dir.join("helper.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.host, common::exe(), "root-helper"])
            .arg("--socket")
            .arg(&socket)
            .args(["--owner", &DAEMON_UID.to_string(), "--allow-dir"])
            .arg(home)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.servers.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the root helper did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A python HTTP server in `ns` serving `dir` on `addr:port`.
    fn serve(&mut self, ns: &str, addr: &str, port: u16, dir: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-m", "http.server"])
            .args([&port.to_string(), "--bind", addr, "--directory"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fetch(ns, &format!("http://{addr}:{port}/"))
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "server on {addr}:{port} did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        // Whatever still runs in the lab (VMs a failed test left) goes with it.
        let _ = sh(&format!(
            "for ns in {h} {i}; do ip netns pids $ns | xargs -r kill -9; done
             ip netns del {h} 2>/dev/null; ip netns del {i} 2>/dev/null",
            h = self.host,
            i = self.inet
        ));
    }
}

/// An HTTP GET from namespace `ns`, with a short timeout.
fn fetch(ns: &str, url: &str) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c"])
        .arg("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())")
        .arg(url)
        .output()
        .unwrap()
}

fn vm_ip(banger: &Banger, name: &str) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", name, "--json"])).unwrap();
    info[0]["ip"]
        .as_str()
        .expect("the VM has an address")
        .to_string()
}

/// An HTTP GET from inside the guest (busybox's static wget crashes in
/// images without NSS files, so plain `nc`); true when it got `want`.
fn guest_gets(banger: &Banger, name: &str, addr: &str, path: &str, want: &str) -> bool {
    let (host, port) = addr.split_once(':').unwrap();
    let script = format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}");
    let out = banger.run(&["vm", "exec", name, "--", "sh", "-c", &script]);
    let ok = out.status.success() && String::from_utf8_lossy(&out.stdout).contains(want);
    if !ok {
        eprintln!(
            "{name} could not get {addr}{path}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ok
}

fn taps_in(ns: &str) -> Vec<String> {
    must(&format!("ip -n {ns} -o link show"))
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|n| n.starts_with("bgtap"))
        .map(|n| n.to_string())
        .collect()
}

#[test]
fn vms_get_addresses_nat_and_isolation_and_survive_a_daemon_kill() {
    let Some((kernel, agent)) = assets() else {
        return;
    };
    // Pull in the host namespace (the registry is on its loopback) …
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");
    // The daemon runs as an unprivileged user, as in a system install.
    let mut banger = Banger::without_daemon();
    banger.add_env("BANGER_QEMU_ACCEL", Path::new("tcg"));
    banger.add_env("BANGER_AGENT_BIN", &agent);
    let helper_dir = tempfile::tempdir().unwrap();
    must(&format!("chmod 0755 {}", helper_dir.path().display()));
    let socket = helper_dir.path().join("helper.sock");
    banger.run_as(DAEMON_UID, Some(&socket));
    banger.start_daemon();
    banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);
    // … then run the root helper, the daemon, and so the VMs, inside the lab.
    let mut lab = Lab::new();
    lab.helper(helper_dir.path(), banger.home.path());
    banger.kill_daemon(libc::SIGTERM);
    banger.move_to_netns(&lab.host);
    banger.start_daemon();
    let status = banger.ok(&["doctor", "--json"]);
    assert!(
        status.contains("taps on"),
        "networking through the helper: {status}"
    );

    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "from the internet\n").unwrap();
    let inet = lab.inet.clone();
    lab.serve(&inet, INET_ADDR, 8080, &www);
    let host = lab.host.clone();
    lab.serve(&host, "0.0.0.0", 8081, &www);

    for name in ["a", "b"] {
        banger.ok(&["vm", "run", name, "--image", "busybox", "--memory", "256M"]);
        banger.ok(&[
            "vm", "exec", name, "--", "sh", "-c",
            &format!("mkdir -p /tmp/www && echo hello from {name} > /tmp/www/index.html && httpd -p 8000 -h /tmp/www"),
        ]);
    }
    let (a, b) = (vm_ip(&banger, "a"), vm_ip(&banger, "b"));
    assert_ne!(a, b);
    let gateway = {
        let mut o: Vec<u32> = a.split('.').map(|x| x.parse().unwrap()).collect();
        o[3] = 1;
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])
    };
    let resolv = banger.ok(&["vm", "exec", "a", "--", "cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains(&format!("nameserver {gateway}")),
        "{resolv}"
    );
    assert_eq!(
        banger.ok(&["vm", "exec", "a", "--", "hostname"]).trim(),
        "a"
    );

    // Names: guests ask the gateway (port 53, redirected to banger's server).
    let looked_up = banger.ok(&["vm", "exec", "a", "--", "nslookup", "b.vm"]);
    assert!(looked_up.contains(&b), "{looked_up}");
    let looked_up = banger.ok(&["vm", "exec", "b", "--", "nslookup", "host.vm"]);
    assert!(looked_up.contains(&gateway), "{looked_up}");
    let missing = banger.run(&["vm", "exec", "a", "--", "nslookup", "nope.vm"]);
    assert!(
        !missing.status.success(),
        "an unknown VM name must not resolve"
    );

    // Plain OpenSSH over the VM network, the VM's pinned host key checked.
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "a", "--json"])).unwrap();
    let dir = info[0]["dir"].as_str().unwrap();
    let known = tmp.path().join("known_hosts");
    let host_pub = must(&format!("ssh-keygen -y -f {dir}/host_key"));
    std::fs::write(&known, format!("{a} {host_pub}")).unwrap();
    let key = banger.path("state/ssh/id_ed25519");
    let out = must(&format!(
        "ip netns exec {host} ssh -F /dev/null -i {} -o UserKnownHostsFile={} \
         -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10 root@{a} -- hostname",
        key.display(),
        known.display()
    ));
    assert_eq!(out.trim(), "a");

    let check = |banger: &Banger, when: &str| {
        for (name, ip) in [("a", &a), ("b", &b)] {
            let out = fetch(&host, &format!("http://{ip}:8000/index.html"));
            assert!(
                String::from_utf8_lossy(&out.stdout).contains(&format!("hello from {name}")),
                "{when}: {name} not reachable from the host side: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            guest_gets(
                banger,
                "a",
                &format!("{INET_ADDR}:8080"),
                "/hello.txt",
                "from the internet"
            ),
            "{when}: no egress through NAT"
        );
        let looked_up = banger.ok(&["vm", "exec", "a", "--", "nslookup", "b.vm"]);
        assert!(looked_up.contains(b.as_str()), "{when}: {looked_up}");
        assert!(
            !guest_gets(banger, "a", &format!("{b}:8000"), "/index.html", "hello"),
            "{when}: VM a reached VM b"
        );
        assert!(
            !guest_gets(
                banger,
                "b",
                &format!("{gateway}:8081"),
                "/hello.txt",
                "internet"
            ),
            "{when}: VM b reached a host service at the gateway"
        );
        assert!(
            !guest_gets(
                banger,
                "b",
                &format!("{HOST_ADDR}:8081"),
                "/hello.txt",
                "internet"
            ),
            "{when}: VM b reached a host service"
        );
    };
    check(&banger, "after start");

    // SIGKILL, restart: the VMs keep their addresses and stay reachable.
    banger.kill_daemon(libc::SIGKILL);
    banger.start_daemon();
    assert_eq!(vm_ip(&banger, "a"), a);
    check(&banger, "after a daemon SIGKILL");
    let taps = taps_in(&host);
    assert!(
        taps.len() <= 4,
        "two in use plus at most two spare: {taps:?}"
    );

    banger.ok(&["vm", "rm", "-f", "a", "b"]);
    let routes = must(&format!("ip -n {host} route"));
    assert!(!routes.contains(&a) && !routes.contains(&b), "{routes}");
    let taps = taps_in(&host);
    assert!(taps.len() <= 2, "only the spare pool is left: {taps:?}");
}
