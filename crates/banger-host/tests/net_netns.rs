//! The real host network code, run for real inside a network namespace this
//! test creates (never the host's own network). Needs root, `ip` and `nft`.

use std::net::Ipv4Addr;
use std::sync::Arc;

use banger_host::{
    CommandSpec, HostError, HostNetwork, Instance, NetSetup, Output, ProcessRunner,
    RealHostNetwork, RealRunner, Subnet,
};

/// Runs every command inside the namespace.
struct InNetns(String);

impl ProcessRunner for InNetns {
    fn run(&self, spec: &CommandSpec) -> Result<Output, HostError> {
        let mut inner = CommandSpec::new("ip")
            .args(["netns", "exec", &self.0])
            .arg(&spec.program)
            .args(spec.args.clone());
        inner.stdin = spec.stdin.clone();
        RealRunner.run(&inner)
    }
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = RealRunner.run(&CommandSpec::new("ip").args(["netns", "del", &self.0]));
    }
}

fn sh(ns: &str, script: &str) -> String {
    let out = RealRunner
        .run(&CommandSpec::new("ip").args(["netns", "exec", ns, "sh", "-c", script]))
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh namespace and the real network code running in it; `None`
/// (skipped, said) without root or one of `needs`.
fn lab(prefix: &str, needs: &[&str]) -> Option<(Netns, RealHostNetwork)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || needs.iter().any(|n| which(n).is_none()) {
        eprintln!("skipped: needs root and {needs:?}");
        return None;
    }
    let name = format!("{prefix}-{}", std::process::id());
    RealRunner
        .run(&CommandSpec::new("ip").args(["netns", "add", &name]))
        .unwrap();
    let ns = Netns(name);
    let net = RealHostNetwork {
        runner: Arc::new(InNetns(ns.0.clone())),
    };
    Some((ns, net))
}

#[test]
fn setup_taps_routes_and_teardown_in_a_namespace() {
    let Some((ns, net)) = lab("bgtest", &["nft"]) else {
        return;
    };
    // A LAN the host is on: no banger instance may take its addresses.
    sh(
        &ns.0,
        "ip link add lan0 type bridge && ip addr add 192.168.50.7/24 dev lan0",
    );
    let a = Instance::parse("aaaaaa").unwrap();
    let b = Instance::parse("bbbbbb").unwrap();
    let setup = NetSetup {
        instance: a.clone(),
        subnet: Subnet::parse("10.213.0.0/16").unwrap(),
        dns_port: 1053,
        domain: "vm".into(),
        owner: None,
    };
    let guest = Ipv4Addr::new(10, 213, 0, 7);
    // Twice: every call is idempotent.
    for _ in 0..2 {
        net.setup(&setup).unwrap();
        net.create_tap(&a.tap(0), 1000).unwrap();
        net.create_tap(&a.tap(1), 1000).unwrap();
        net.route(&a.tap(0), guest, &setup).unwrap();
    }
    assert_eq!(net.taps(&a).unwrap(), vec!["bgaaaaaat0", "bgaaaaaat1"]);
    let addrs = sh(&ns.0, "ip -o -4 addr show dev bgaaaaaagw");
    assert!(addrs.contains("10.213.0.1/16"), "{addrs}");
    let route = sh(&ns.0, "ip route get 10.213.0.7");
    assert!(
        route.contains("dev bgaaaaaat0") && route.contains("src 10.213.0.1"),
        "{route}"
    );
    let tap = sh(
        &ns.0,
        "cat /sys/class/net/bgaaaaaat0/owner /proc/sys/net/ipv4/ip_forward",
    );
    assert_eq!(tap, "1000\n1\n");
    let rules = sh(&ns.0, "nft list table ip banger_aaaaaa");
    assert!(
        rules.contains("masquerade")
            && rules.contains("dnat to 10.213.0.1:1053")
            && rules.contains("fib saddr . iif oif missing drop"),
        "{rules}"
    );
    assert!(!net.tap_busy(&a.tap(0)), "nobody holds the tap open");

    // A second instance: A's subnet, or the LAN's, is refused and changes
    // nothing; a clear one works beside A, and touches none of A's objects.
    let mut other = NetSetup {
        instance: b.clone(),
        ..setup.clone()
    };
    let before = sh(&ns.0, "ip -o link; ip -o addr; ip route; nft list ruleset");
    for taken in ["10.213.128.0/24", "192.168.50.0/24", "192.168.0.0/16"] {
        other.subnet = Subnet::parse(taken).unwrap();
        let err = net.setup(&other).unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{taken}: {err}");
    }
    assert_eq!(
        sh(&ns.0, "ip -o link; ip -o addr; ip route; nft list ruleset"),
        before
    );
    other.subnet = Subnet::parse("10.214.0.0/16").unwrap();
    net.setup(&other).unwrap();
    net.create_tap(&b.tap(0), 1001).unwrap();
    assert_eq!(net.taps(&b).unwrap(), vec!["bgbbbbbbt0"]);
    assert_eq!(net.taps(&a).unwrap(), vec!["bgaaaaaat0", "bgaaaaaat1"]);
    assert!(net
        .route(&a.tap(0), Ipv4Addr::new(10, 214, 0, 2), &other)
        .is_err());
    // B cannot unroute A's guest: the route is not through B's taps.
    net.unroute(&b, guest).unwrap();
    assert!(sh(&ns.0, "ip route").contains("10.213.0.7 dev bgaaaaaat0"));

    net.unroute(&a, guest).unwrap();
    net.unroute(&a, guest).unwrap();
    assert!(!sh(&ns.0, "ip route").contains("10.213.0.7"));
    net.delete_tap(&a.tap(1)).unwrap();
    net.delete_tap(&a.tap(1)).unwrap();
    assert_eq!(net.taps(&a).unwrap(), vec!["bgaaaaaat0"]);
    net.teardown(&a).unwrap();
    net.teardown(&a).unwrap();
    assert!(net.taps(&a).unwrap().is_empty());
    assert_eq!(sh(&ns.0, "nft list tables"), "table ip banger_bbbbbb\n");
    let links = sh(&ns.0, "ip -o link");
    assert!(!links.contains("bgaaaaaa"), "{links}");
    assert!(
        links.contains("bgbbbbbbgw") && links.contains("bgbbbbbbt0"),
        "B's objects survive A's teardown: {links}"
    );
    net.teardown(&b).unwrap();
    assert_eq!(sh(&ns.0, "nft list tables"), "");
}

/// Holds a tap open inside the namespace, as a VMM does, until dropped.
struct Holder(std::process::Child);

impl Holder {
    fn hold(ns: &str, tap: &str) -> Holder {
        const HOLD: &str = "import fcntl, struct, sys, time\n\
t = open('/dev/net/tun', 'r+b', buffering=0)\n\
fcntl.ioctl(t, 0x400454ca, struct.pack('16sH', sys.argv[1].encode(), 0x0002 | 0x1000))\n\
print('held', flush=True)\n\
time.sleep(600)\n";
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", HOLD, tap])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held");
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A state directory thrown away leaves its instance on the host until the
/// next setup of any instance, which removes it, unless a process still
/// holds one of its taps. An instance without an owner is never touched.
#[test]
fn an_orphaned_instance_goes_at_the_next_setup() {
    let Some((ns, net)) = lab("bgorph", &["nft", "python3"]) else {
        return;
    };
    let homes = tempfile::tempdir().unwrap();
    let owned = |id: &str, subnet: &str| -> NetSetup {
        let file = homes.path().join(id).join("network.instance");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, format!("{id}\n")).unwrap();
        NetSetup {
            instance: Instance::parse(id).unwrap(),
            subnet: Subnet::parse(subnet).unwrap(),
            dns_port: 1053,
            domain: "vm".into(),
            owner: Some(file),
        }
    };
    let (a, b) = (
        owned("aaaaaa", "10.213.0.0/16"),
        owned("bbbbbb", "10.214.0.0/16"),
    );
    let legacy = NetSetup {
        instance: Instance::parse("cccccc").unwrap(),
        subnet: Subnet::parse("10.215.0.0/16").unwrap(),
        dns_port: 1053,
        domain: "vm".into(),
        owner: None,
    };
    net.setup(&a).unwrap();
    net.create_tap(&a.instance.tap(0), 1000).unwrap();
    net.create_tap(&a.instance.tap(1), 1000).unwrap();
    net.setup(&legacy).unwrap();
    let alias = sh(&ns.0, "cat /sys/class/net/bgaaaaaagw/ifalias");
    assert_eq!(
        alias.trim(),
        format!(
            "banger-owner:{}",
            homes.path().join("aaaaaa/network.instance").display()
        )
    );
    // What a copied state directory reads to learn the id is another's.
    assert_eq!(
        net.gateway_owner(&a.instance).unwrap(),
        a.owner.clone(),
        "the gateway names its owner file"
    );
    assert_eq!(net.gateway_owner(&legacy.instance).unwrap(), None);
    assert_eq!(
        net.gateway_owner(&Instance::parse("dddddd").unwrap())
            .unwrap(),
        None
    );
    net.setup(&b).unwrap();
    let present = |id: &str| sh(&ns.0, "ip -o link; nft list tables").contains(id);
    assert!(present("aaaaaa"), "its owner file is there");

    // Thrown away while a VMM still holds a tap: kept.
    std::fs::remove_dir_all(homes.path().join("aaaaaa")).unwrap();
    let holder = Holder::hold(&ns.0, &a.instance.tap(0));
    assert_eq!(net.prune_orphans().unwrap(), Vec::<Instance>::new());
    net.setup(&b).unwrap();
    assert!(present("aaaaaa"), "a VMM holds its tap");

    // Once nothing holds it, the next setup removes all of it: a new
    // instance may even take its subnet.
    drop(holder);
    let c = owned("dddddd", "10.213.0.0/16");
    net.setup(&c).unwrap();
    assert!(
        !present("aaaaaa"),
        "{}",
        sh(&ns.0, "ip -o link; nft list tables")
    );
    assert!(present("bbbbbb") && present("dddddd") && present("cccccc"));
    // An owner file naming another instance is not this one's.
    std::fs::write(b.owner.as_ref().unwrap(), "eeeeee\n").unwrap();
    assert_eq!(net.prune_orphans().unwrap(), vec![b.instance.clone()]);
    assert!(!present("bbbbbb") && present("cccccc") && present("dddddd"));
    for i in [&legacy.instance, &c.instance] {
        net.teardown(i).unwrap();
    }
    assert_eq!(sh(&ns.0, "nft list tables"), "");
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.exists())
}
