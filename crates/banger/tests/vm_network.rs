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
use common::{must, sh, Banger};

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

/// Two namespaces joined by a veth pair, and what runs in them; all removed on drop.
struct Lab {
    host: String,
    inet: String,
    servers: Vec<Child>,
}

/// Who the daemon runs as: no passwd entry needed.
const DAEMON_UID: u32 = 4242;
const HOST_ADDR: &str = "198.51.100.1";
/// The cloud metadata address, served in the "internet" so only the rule stops it.
const METADATA: &str = "169.254.169.254";
const UPSTREAM_ANSWER: &str = "203.0.113.7";
const INET_ADDR: &str = "198.51.100.2";

impl Lab {
    /// `tag` tells apart the labs of tests running at once.
    fn new(tag: &str) -> Lab {
        let id = format!("{tag}{}", std::process::id() % 100_000);
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
             ip -n {i} addr add {METADATA}/32 dev vi{id}
             ip -n {h} route add default via {INET_ADDR}
             mkdir -p /etc/netns/{h}
             echo 'nameserver {INET_ADDR}' > /etc/netns/{h}/resolv.conf"
        ));
        lab
    }

    /// A DNS server in the "internet" answering every A query with
    /// [`UPSTREAM_ANSWER`]: what banger relays names it does not own to.
    fn upstream_dns(&mut self) {
        const SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
answer = bytes(int(x) for x in sys.argv[2].split("."))
while True:
    q, peer = s.recvfrom(512)
    i = 12
    while q[i]:
        i += q[i] + 1
    qtype = q[i + 1:i + 3]
    question = q[12:i + 5]
    if qtype == b"\x00\x01":
        body = b"\x00\x01\x00\x01\x00\x00\x00\x00" + question + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + answer
    else:
        body = b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
    s.sendto(q[:2] + b"\x81\x80" + body, peer)
"#;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.inet,
                "python3",
                "-c",
                SERVER,
                INET_ADDR,
                UPSTREAM_ANSWER,
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(child);
    }

    /// The root helper in the host namespace, serving [`DAEMON_UID`] with
    /// VMs under `home`; its socket is `dir/helper.sock`.
    fn helper(&mut self, dir: &Path, home: &Path) {
        self.helper_for(dir, &["--owner", &DAEMON_UID.to_string()], &[home]);
    }

    /// The root helper serving whom `who` names, with VMs under `homes`.
    fn helper_for(&mut self, dir: &Path, who: &[&str], homes: &[&Path]) {
        let socket = dir.join("helper.sock");
        let log = std::fs::File::create(dir.join("helper.log")).unwrap();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.host])
            .arg(common::helper_exe())
            .arg("--socket")
            .arg(&socket)
            .args(who);
        for home in homes {
            command.arg("--allow-dir").arg(home);
        }
        let child = command
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
             ip netns del {h} 2>/dev/null; ip netns del {i} 2>/dev/null; rm -rf /etc/netns/{h}",
            h = self.host,
            i = self.inet
        ));
    }
}

/// One DNS query over TCP (argv: server name port); prints the answer's address.
const TCP_QUERY: &str = r#"
import socket, struct, sys
name = sys.argv[2]
q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01"
s = socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=5)
s.sendall(struct.pack("!H", len(q)) + q)
n = struct.unpack("!H", s.recv(2))[0]
r = b""
while len(r) < n:
    r += s.recv(n - len(r))
print(".".join(str(x) for x in r[-4:]))
"#;

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
        .filter(|n| banger_host::net::tap_instance(n).is_some())
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
    // The daemon user's home, where its own SSH keys will appear.
    let user_home = tempfile::tempdir().unwrap();
    must(&format!(
        "mkdir -p {h}/.ssh && chown -R {DAEMON_UID}:{DAEMON_UID} {h}",
        h = user_home.path().display()
    ));
    banger.add_env("HOME", user_home.path());
    banger.run_as(DAEMON_UID, Some(&socket));
    banger.start_daemon();
    banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);
    // … then run the root helper, the daemon, and so the VMs, inside the lab.
    let mut lab = Lab::new("");
    lab.helper(helper_dir.path(), banger.home.path());
    banger.kill_daemon(libc::SIGTERM);
    banger.move_to_netns(&lab.host);
    banger.start_daemon();
    lab.upstream_dns();
    let doctor = must(&format!(
        "ip netns exec {} env BANGER_HOME={} {} doctor --json || true",
        lab.host,
        banger.home.path().display(),
        common::exe()
    ));
    let checks: serde_json::Value = serde_json::from_str(&doctor).unwrap();
    let find = |name: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    assert!(
        find("network")["message"]
            .as_str()
            .unwrap()
            .contains("taps on"),
        "networking through the helper: {doctor}"
    );
    assert_eq!(
        find("dns")["status"],
        "ok",
        "banger owns its DNS port: {doctor}"
    );

    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "from the internet\n").unwrap();
    let inet = lab.inet.clone();
    lab.serve(&inet, INET_ADDR, 8080, &www);
    lab.serve(&inet, METADATA, 80, &www);
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
    // Other names go to the host's resolvers (here, the "internet"'s). Only
    // A: busybox pairs replies to its concurrent A and AAAA queries loosely,
    // and relayed replies may come back in either order.
    let relayed = banger.ok(&[
        "vm",
        "exec",
        "a",
        "--",
        "nslookup",
        "-type=a",
        "example.test",
    ]);
    assert!(relayed.contains(UPSTREAM_ANSWER), "{relayed}");
    // The same answers over TCP.
    let tcp = must(&format!(
        "ip netns exec {host} python3 -c '{TCP_QUERY}' {gateway} b.vm 1053"
    ));
    assert_eq!(tcp.trim(), b, "DNS over TCP");
    // The metadata address is reachable from the host side, never from a guest.
    assert!(fetch(&host, &format!("http://{METADATA}/hello.txt"))
        .status
        .success());
    assert!(
        !guest_gets(
            &banger,
            "a",
            &format!("{METADATA}:80"),
            "/hello.txt",
            "internet"
        ),
        "a guest reached {METADATA}"
    );
    let missing = banger.run(&["vm", "exec", "a", "--", "nslookup", "nope.vm"]);
    assert!(
        !missing.status.success(),
        "an unknown VM name must not resolve"
    );

    ssh_interop(&banger, &host, &a, tmp.path(), user_home.path());

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

    // A fork of `a` is a machine of its own on the network: its address
    // (the guest re-addressed), reached from the host and by name, NAT out,
    // and plain ssh, whose known_hosts pins the fork's own host key. a's
    // web server, running when the snapshot was taken, serves there too.
    banger.ok(&["vm", "snapshot", "a", "sa"]);
    banger.ok(&["vm", "run", "c", "--from", "sa"]);
    let c = vm_ip(&banger, "c");
    assert!(c != a && c != b, "{c}");
    let page = fetch(&host, &format!("http://{c}:8000/index.html"));
    assert!(
        String::from_utf8_lossy(&page.stdout).contains("hello from a"),
        "the fork is not reachable at {c}: {}",
        String::from_utf8_lossy(&page.stderr)
    );
    assert!(
        guest_gets(
            &banger,
            "c",
            &format!("{INET_ADDR}:8080"),
            "/hello.txt",
            "from the internet"
        ),
        "the fork has no egress through NAT"
    );
    let looked_up = banger.ok(&["vm", "exec", "b", "--", "nslookup", "c.vm"]);
    assert!(looked_up.contains(&c), "{looked_up}");
    let include = banger.ok(&["ssh-config"]);
    let config = include.trim().strip_prefix("Include ").unwrap().to_string();
    let out = sh(&format!(
        "ip netns exec {host} ssh -F {config} -o BatchMode=yes -o ConnectTimeout=10 c.vm -- hostname"
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "c",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = fetch(&host, &format!("http://{a}:8000/index.html"));
    assert!(
        String::from_utf8_lossy(&page.stdout).contains("hello from a"),
        "a after its fork"
    );
    banger.ok(&["vm", "rm", "-f", "c"]);
    banger.ok(&["snapshot", "rm", "sa"]);

    banger.ok(&["vm", "rm", "-f", "a", "b"]);
    let routes = must(&format!("ip -n {host} route"));
    assert!(!routes.contains(&a) && !routes.contains(&b), "{routes}");
    let taps = taps_in(&host);
    assert!(taps.len() <= 2, "only the spare pool is left: {taps:?}");

    // A clean stop with no VMs left removes the instance from the host (a
    // state directory thrown away next leaves nothing behind).
    let id = instance_id(&banger);
    banger.ok(&["daemon", "stop"]);
    assert!(taps_in(&host).is_empty(), "{:?}", taps_in(&host));
    let links = must(&format!("ip -n {host} -o link show"));
    assert!(!links.contains(&format!("bg{id}gw")), "{links}");
    let tables = must(&format!("ip netns exec {host} nft list tables"));
    assert!(!tables.contains(&format!("banger_{id}")), "{tables}");
}

/// Plain OpenSSH, scp, sftp and `ssh -L` through banger's ssh config; the
/// user's own key reaching a running VM and leaving it again; and
/// `banger vm port-forward`.
fn ssh_interop(banger: &Banger, ns: &str, a: &str, tmp: &Path, user_home: &Path) {
    let include = banger.ok(&["ssh-config"]);
    let config = include.trim().strip_prefix("Include ").unwrap().to_string();
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("Host a a.vm") && text.contains(&format!("HostName {a}")),
        "{text}"
    );
    let ssh = |args: &str| {
        sh(&format!(
            "ip netns exec {ns} ssh -F {config} -o BatchMode=yes -o ConnectTimeout=10 {args}"
        ))
    };
    let out = ssh("a.vm -- hostname");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "a");

    // scp both ways (sftp underneath), and sftp itself.
    let up = tmp.join("up.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&up, &data).unwrap();
    must(&format!(
        "ip netns exec {ns} scp -F {config} -q {} a.vm:/tmp/up.bin",
        up.display()
    ));
    let down = tmp.join("down.bin");
    must(&format!(
        "ip netns exec {ns} scp -F {config} -q a.vm:/tmp/up.bin {}",
        down.display()
    ));
    assert_eq!(std::fs::read(&down).unwrap(), data, "scp round trip");
    // The round trip crossed the VM's tap both ways: `vm stats` counts it.
    let stats: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "stats", "a", "--json"])).unwrap();
    let net = &stats[0]["net"];
    for way in ["rx_bytes", "tx_bytes"] {
        assert!(net[way].as_u64() >= Some(300_000), "{way}: {stats}");
    }
    let listing = must(&format!(
        "printf 'mkdir /tmp/sd\\nput {} /tmp/sd/f\\nls -l /tmp/sd\\n' | ip netns exec {ns} sftp -F {config} -b - a.vm",
        up.display()
    ));
    assert!(listing.contains("300000"), "{listing}");

    // ssh -L: a host port to the guest's web server on its loopback side.
    let mut tunnel = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ssh",
            "-F",
            &config,
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
        ])
        .args(["-L", "127.0.0.1:18000:127.0.0.1:8000", "a.vm"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = fetch(ns, "http://127.0.0.1:18000/index.html");
        if String::from_utf8_lossy(&out.stdout).contains("hello from a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ssh -L did not forward: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = tunnel.kill();
    let _ = tunnel.wait();

    // The user's own key: authorized in the running VM once it exists,
    // refused again once it is gone.
    let key = user_home.join(".ssh/id_user");
    let known = config.replace("/config", "/known_hosts");
    let as_user = || {
        sh(&format!(
            "ip netns exec {ns} ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o BatchMode=yes \
             -o UserKnownHostsFile={known} -o HostKeyAlias=a.vm -o StrictHostKeyChecking=yes \
             -o ConnectTimeout=10 root@{a} -- hostname",
            key.display()
        ))
        .status
        .success()
    };
    must(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {}",
        key.display()
    ));
    assert!(
        wait_until(Duration::from_secs(20), as_user),
        "the user's key never reached the VM"
    );
    std::fs::remove_file(key.with_extension("pub")).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || !as_user()),
        "a removed key still works"
    );

    // banger vm port-forward: a free port picked, one in use refused.
    let (mut forward, listening) = banger.port_forward("a", "0:8000");
    let out = fetch(ns, &format!("http://{listening}/index.html"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from a"),
        "{listening}"
    );
    let port = listening.rsplit(':').next().unwrap();
    let busy = banger.run(&["vm", "port-forward", "a", &format!("{port}:8000")]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("already in use"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    let _ = forward.kill();
    let _ = forward.wait();
    assert!(
        wait_until(Duration::from_secs(5), || !fetch(
            ns,
            &format!("http://{listening}/")
        )
        .status
        .success()),
        "the forward outlived its command"
    );

    // A forward to a guest port nothing listens on says so for each
    // connection (red team round 3, item 24: it only hung up).
    let (mut empty, listening) = banger.port_forward("a", "0:9");
    let _ = fetch(ns, &format!("http://{listening}/"));
    let mut event = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(empty.stdout.as_mut().unwrap()),
        &mut event,
    )
    .unwrap();
    let _ = empty.kill();
    let _ = empty.wait();
    let event: serde_json::Value = serde_json::from_str(&event).unwrap_or_default();
    assert!(event["refused"].is_string(), "{event}");
    assert_eq!(event["guest_port"], 9);
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

/// Logs the source address of every ICMP packet reaching the "internet"
/// (argv: log file), one per line.
const ICMP_LOGGER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
with open(sys.argv[1], "a", buffering=1) as log:
    while True:
        packet, peer = s.recvfrom(65535)
        if packet[20] == 8:
            log.write(peer[0] + "\n")
"#;

/// Who runs each of the four instances in the two-instance test.
enum Runs {
    Root,
    User(u32),
}

/// Two root daemons and two users' daemons (through one root helper) on one
/// host, each with a VM: each gets its own subnet, taps and table; each VM
/// has NAT and its own DNS; none reaches another's; one daemon's restart
/// and removals leave the others' objects alone; and no guest gets a packet
/// out with a source address that is not its own.
#[test]
fn instances_side_by_side_keep_to_their_own_network_and_guests_cannot_spoof() {
    let Some((kernel, agent)) = assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");
    const GROUP: u32 = 4240;
    let who = [Runs::Root, Runs::Root, Runs::User(4242), Runs::User(4343)];
    let helper_dir = tempfile::tempdir().unwrap();
    must(&format!("chmod 0755 {}", helper_dir.path().display()));
    let socket = helper_dir.path().join("helper.sock");
    let mut instances: Vec<Banger> = Vec::new();
    for runs in &who {
        let mut banger = Banger::without_daemon();
        banger.add_env("BANGER_QEMU_ACCEL", Path::new("tcg"));
        banger.add_env("BANGER_AGENT_BIN", &agent);
        if let Runs::User(uid) = runs {
            banger.run_as_in_group(*uid, GROUP, Some(&socket));
        }
        banger.start_daemon();
        banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
        banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);
        banger.kill_daemon(libc::SIGTERM);
        instances.push(banger);
    }
    let mut lab = Lab::new("s");
    let homes: Vec<&Path> = instances.iter().map(|b| b.home.path()).collect();
    lab.helper_for(helper_dir.path(), &["--group", &GROUP.to_string()], &homes);
    let host = lab.host.clone();
    let inet = lab.inet.clone();
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "from the internet\n").unwrap();
    lab.serve(&inet, INET_ADDR, 8080, &www);
    let icmp_log = tmp.path().join("icmp.log");
    std::fs::write(&icmp_log, "").unwrap();
    let logger = Command::new("ip")
        .args(["netns", "exec", &inet, "python3", "-c", ICMP_LOGGER])
        .arg(&icmp_log)
        .spawn()
        .unwrap();
    lab.servers.push(logger);

    let names = ["r1", "r2", "u1", "u2"];
    let mut ips = Vec::new();
    for (banger, name) in instances.iter_mut().zip(names) {
        banger.move_to_netns(&host);
        banger.start_daemon();
        banger.ok(&["vm", "run", name, "--image", "busybox", "--memory", "192M"]);
        banger.ok(&[
            "vm", "exec", name, "--", "sh", "-c",
            &format!("mkdir -p /tmp/www && echo hello from {name} > /tmp/www/index.html && httpd -p 8000 -h /tmp/www"),
        ]);
        ips.push(vm_ip(banger, name));
    }
    let subnets: Vec<String> = ips
        .iter()
        .map(|ip| ip.rsplit_once('.').unwrap().0.to_string())
        .collect();
    for (i, s) in subnets.iter().enumerate() {
        assert!(
            !subnets[..i].contains(s),
            "instances share a subnet: {ips:?}"
        );
    }
    let tables = must(&format!("ip netns exec {host} nft list tables"));
    assert_eq!(
        tables.matches("table ip banger_").count(),
        4,
        "one table per instance: {tables}"
    );

    let check = |when: &str| {
        for (i, (banger, name)) in instances.iter().zip(names).enumerate() {
            let out = fetch(&host, &format!("http://{}:8000/index.html", ips[i]));
            assert!(
                String::from_utf8_lossy(&out.stdout).contains(&format!("hello from {name}")),
                "{when}: {name} not reachable from the host"
            );
            assert!(
                guest_gets(
                    banger,
                    name,
                    &format!("{INET_ADDR}:8080"),
                    "/hello.txt",
                    "internet"
                ),
                "{when}: {name} has no NAT"
            );
            let looked_up =
                banger.ok(&["vm", "exec", name, "--", "nslookup", &format!("{name}.vm")]);
            assert!(looked_up.contains(&ips[i]), "{when}: {looked_up}");
            let other = (i + 1) % names.len();
            assert!(
                !guest_gets(
                    banger,
                    name,
                    &format!("{}:8000", ips[other]),
                    "/index.html",
                    "hello"
                ),
                "{when}: {name} reached {}, another instance's VM",
                names[other]
            );
        }
    };
    check("four instances running");

    // Source addresses: an outside one, an unused one of its own subnet, and
    // another instance's VM's are all dropped; its own goes out (NAT-ed).
    let sent_from = |banger: &Banger, name: &str, source: &str| -> Vec<String> {
        let before = std::fs::read_to_string(&icmp_log).unwrap().lines().count();
        // The guest's own address is on eth0 already: add (and remove)
        // only the others.
        let script = format!(
            "if ip addr add {source}/32 dev eth0; then added=1; fi; \
             ping -c 2 -W 1 -I {source} {INET_ADDR} >/dev/null 2>&1; \
             [ -z \"$added\" ] || ip addr del {source}/32 dev eth0; true"
        );
        banger.ok(&["vm", "exec", name, "--", "sh", "-c", &script]);
        std::thread::sleep(Duration::from_millis(300));
        let log = std::fs::read_to_string(&icmp_log).unwrap();
        log.lines().skip(before).map(str::to_string).collect()
    };
    let own = sent_from(&instances[0], "r1", &ips[0]);
    assert!(
        own.iter().any(|s| s == HOST_ADDR),
        "the guest's own address goes out, NAT-ed: {own:?}"
    );
    for spoofed in [
        "8.8.4.4".to_string(),
        format!("{}.99", subnets[0]),
        ips[1].clone(),
    ] {
        let got = sent_from(&instances[0], "r1", &spoofed);
        assert!(got.is_empty(), "r1 got packets out as {spoofed}: {got:?}");
    }

    // One root daemon killed and restarted, one user's VM removed: the
    // others' taps, routes and rules stay, and they keep working.
    let taps_before = taps_in(&host);
    instances[1].kill_daemon(libc::SIGKILL);
    instances[1].start_daemon();
    instances[3].ok(&["vm", "rm", "-f", "u2"]);
    let taps_after = taps_in(&host);
    let u2 = instance_id(&instances[3]);
    for tap in taps_before.iter().filter(|t| !t.contains(&u2)) {
        assert!(
            taps_after.contains(tap),
            "{tap} went with another instance's restart or removal"
        );
    }
    let routes = must(&format!("ip -n {host} route"));
    for ip in &ips[..3] {
        assert!(routes.contains(ip.as_str()), "{ip}'s route went: {routes}");
    }
    assert!(!routes.contains(&format!("{} ", ips[3])), "{routes}");
    check_three(&instances, &names, &ips, &host);

    // State directories thrown away under killed daemons: what they left
    // on the host goes at the next daemon's setup, through the helper for
    // a user's daemon and in-process for root's, unless a VMM still holds
    // one of the taps; that VM keeps working until it stops.
    let ids: Vec<String> = instances.iter().map(instance_id).collect();
    let on_host = |id: &str| {
        must(&format!("ip -n {host} -o link show")).contains(&format!("bg{id}gw"))
            && must(&format!("ip netns exec {host} nft list tables"))
                .contains(&format!("banger_{id}"))
    };
    let off_host = |id: &str| {
        !must(&format!("ip -n {host} -o link show")).contains(&format!("bg{id}"))
            && !must(&format!("ip netns exec {host} nft list tables"))
                .contains(&format!("banger_{id}"))
    };
    for i in [0, 3] {
        instances[i].kill_daemon(libc::SIGKILL);
        std::fs::remove_dir_all(instances[i].path("state")).unwrap();
    }
    instances[2].kill_daemon(libc::SIGTERM);
    instances[2].start_daemon();
    assert!(instances[2].ok(&["vm", "ls", "-q"]).contains("u1"));
    assert!(off_host(&ids[3]), "u2's instance is gone");
    assert!(on_host(&ids[0]), "r1's VMM still holds its tap");
    let page = fetch(&host, &format!("http://{}:8000/index.html", ips[0]));
    assert!(String::from_utf8_lossy(&page.stdout).contains("hello from r1"));
    for pid in common::pids_naming(&[&instances[0].home.path().to_string_lossy()]) {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(wait_until(Duration::from_secs(10), || {
        common::pids_naming(&[&instances[0].home.path().to_string_lossy()]).is_empty()
    }));
    instances[1].kill_daemon(libc::SIGTERM);
    instances[1].start_daemon();
    assert!(instances[1].ok(&["vm", "ls", "-q"]).contains("r2"));
    assert!(off_host(&ids[0]), "r1's instance is gone once its VMM is");
    for i in [1, 2] {
        assert!(on_host(&ids[i]), "{}'s instance stays", names[i]);
        let page = fetch(&host, &format!("http://{}:8000/index.html", ips[i]));
        assert!(
            String::from_utf8_lossy(&page.stdout).contains(&format!("hello from {}", names[i])),
            "{} after the orphans went",
            names[i]
        );
    }
    for (banger, name) in instances.iter().zip(names).skip(1).take(2) {
        banger.ok(&["vm", "rm", "-f", name]);
    }
}

/// The network instance id a daemon reports (`doctor`'s network check).
fn instance_id(banger: &Banger) -> String {
    // doctor exits 1 when any check fails (no KVM here): only its JSON matters.
    let doctor = banger.run(&["doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let network = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "network")
        .unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    network
        .split("instance ")
        .nth(1)
        .and_then(|s| s.get(..6))
        .unwrap_or_else(|| panic!("no instance in {network}"))
        .to_string()
}

/// The first three VMs still reachable and with NAT after the fourth went.
fn check_three(instances: &[Banger], names: &[&str], ips: &[String], host: &str) {
    for i in 0..3 {
        let out = fetch(host, &format!("http://{}:8000/index.html", ips[i]));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("hello from {}", names[i])),
            "{} not reachable after another instance's changes",
            names[i]
        );
        assert!(guest_gets(
            &instances[i],
            names[i],
            &format!("{INET_ADDR}:8080"),
            "/hello.txt",
            "internet"
        ));
    }
}

#[test]
fn without_root_or_helper_vms_get_user_mode_networking() {
    let Some((kernel, agent)) = assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    // An unprivileged daemon and no root helper anywhere: taps are out of reach.
    let mut banger = Banger::without_daemon();
    banger.add_env("BANGER_AGENT_BIN", &agent);
    if let Some(fc) = std::env::var_os("FAKE_FIRECRACKER_BIN") {
        banger.add_env("BANGER_FIRECRACKER_BIN", Path::new(&fc));
    }
    let user_home = tempfile::tempdir().unwrap();
    must(&format!(
        "mkdir -p {h}/.ssh && chown -R {DAEMON_UID}:{DAEMON_UID} {h}",
        h = user_home.path().display()
    ));
    banger.add_env("HOME", user_home.path());
    banger.run_as(DAEMON_UID, None);
    banger.start_daemon();
    common::add_busybox_and_kernel(&banger, &registry, tmp.path(), &kernel);

    let mut lab = Lab::new("u");
    lab.upstream_dns();
    let site = tmp.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("note.txt"), "served on the host's loopback\n").unwrap();
    let (host, inet) = (lab.host.clone(), lab.inet.clone());
    lab.serve(&host, "127.0.0.1", 8089, &site);
    let internet = tmp.path().join("internet");
    std::fs::create_dir_all(&internet).unwrap();
    std::fs::write(internet.join("note.txt"), "from the internet\n").unwrap();
    lab.serve(&inet, INET_ADDR, 8090, &internet);
    must(&format!("chmod -R a+rX {}", tmp.path().display()));

    banger.kill_daemon(libc::SIGTERM);
    banger.move_to_netns(&host);
    banger.add_env("BANGER_NETWORK", Path::new("auto"));
    banger.start_daemon();
    let doctor = must(&format!(
        "ip netns exec {host} env BANGER_HOME={} {} doctor --json || true",
        banger.home.path().display(),
        common::exe()
    ));
    assert!(doctor.contains("user-mode"), "{doctor}");

    banger.ok(&["vm", "run", "u1", "--image", "bb"]);
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "u1", "--json"])).unwrap();
    assert_eq!(info[0]["network"]["mode"], "user", "{info}");
    assert!(
        info[0]["network"]["lacks"].to_string().contains("VM-to-VM"),
        "{info}"
    );
    assert!(
        info[0]["ip"].is_null() && info[0]["tap"].is_null(),
        "{info}"
    );
    assert!(taps_in(&host).is_empty(), "user mode makes no taps");

    // Out through QEMU's NAT: the host's loopback services at 10.0.2.2,
    // anything the host reaches, and names through the host's resolver.
    assert!(guest_gets(
        &banger,
        "u1",
        "10.0.2.2:8089",
        "/note.txt",
        "host's loopback"
    ));
    assert!(guest_gets(
        &banger,
        "u1",
        &format!("{INET_ADDR}:8090"),
        "/note.txt",
        "from the internet"
    ));
    let relayed = banger.ok(&[
        "vm",
        "exec",
        "u1",
        "--",
        "nslookup",
        "-type=a",
        "example.test",
    ]);
    assert!(relayed.contains(UPSTREAM_ANSWER), "{relayed}");

    // Port forwarding rides the agent's channel, not the network.
    banger.ok(&[
        "vm",
        "exec",
        "u1",
        "--",
        "sh",
        "-c",
        "mkdir -p /tmp/www && echo hello from u1 > /tmp/www/index.html && httpd -p 8000 -h /tmp/www",
    ]);
    let (mut forward, listening) = banger.port_forward("u1", "0:8000");
    let page = fetch(&host, &format!("http://{listening}/index.html"));
    assert!(
        String::from_utf8_lossy(&page.stdout).contains("hello from u1"),
        "{listening}: {}",
        String::from_utf8_lossy(&page.stderr)
    );
    let _ = forward.kill();
    let _ = forward.wait();

    // Firecracker has no user-mode NAT: refused before anything is made.
    if std::env::var_os("FAKE_FIRECRACKER_BIN").is_some() {
        let out = banger.run(&["vm", "run", "f1", "--image", "bb", "--vmm", "firecracker"]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && said.contains("no user-mode networking"),
            "{said}"
        );
        assert!(!banger.path("state/vms/f1").exists());
        // One made without starting says so at its start.
        banger.ok(&[
            "vm",
            "create",
            "f2",
            "--image",
            "bb",
            "--vmm",
            "firecracker",
        ]);
        let out = banger.run(&["vm", "start", "f2"]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && said.contains("no user-mode networking"),
            "{said}"
        );
        banger.ok(&["vm", "rm", "f2"]);
    }
    banger.ok(&["vm", "rm", "-f", "u1"]);
}
