//! The real host network code, run for real inside a network namespace this
//! test creates (never the host's own network). Needs root, `ip` and `nft`.

use std::net::Ipv4Addr;
use std::sync::Arc;

use banger_host::{
    CommandSpec, HostError, HostNetwork, NetSetup, Output, ProcessRunner, RealHostNetwork,
    RealRunner, Subnet,
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

#[test]
fn setup_taps_routes_and_teardown_in_a_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || which("nft").is_none() {
        eprintln!("skipped: needs root and nft");
        return;
    }
    let name = format!("bgtest-{}", std::process::id());
    RealRunner
        .run(&CommandSpec::new("ip").args(["netns", "add", &name]))
        .unwrap();
    let ns = Netns(name);
    let net = RealHostNetwork {
        runner: Arc::new(InNetns(ns.0.clone())),
    };
    let setup = NetSetup {
        subnet: Subnet::parse("10.213.0.0/16").unwrap(),
        dns_port: 1053,
        domain: "vm".into(),
    };
    let guest = Ipv4Addr::new(10, 213, 0, 7);
    // Twice: every call is idempotent.
    for _ in 0..2 {
        net.setup(&setup).unwrap();
        net.create_tap("bgtap0", 1000).unwrap();
        net.create_tap("bgtap1", 1000).unwrap();
        net.route("bgtap0", guest, &setup).unwrap();
    }
    assert_eq!(net.taps().unwrap(), vec!["bgtap0", "bgtap1"]);
    let addrs = sh(&ns.0, "ip -o -4 addr show dev banger0");
    assert!(addrs.contains("10.213.0.1/16"), "{addrs}");
    let route = sh(&ns.0, "ip route get 10.213.0.7");
    assert!(
        route.contains("dev bgtap0") && route.contains("src 10.213.0.1"),
        "{route}"
    );
    let tap = sh(
        &ns.0,
        "cat /sys/class/net/bgtap0/owner /proc/sys/net/ipv4/ip_forward",
    );
    assert_eq!(tap, "1000\n1\n");
    let rules = sh(&ns.0, "nft list table ip banger");
    assert!(
        rules.contains("masquerade") && rules.contains("dnat to 10.213.0.1:1053"),
        "{rules}"
    );

    net.unroute(guest).unwrap();
    net.unroute(guest).unwrap();
    assert!(!sh(&ns.0, "ip route").contains("10.213.0.7"));
    net.delete_tap("bgtap1").unwrap();
    net.delete_tap("bgtap1").unwrap();
    assert_eq!(net.taps().unwrap(), vec!["bgtap0"]);
    net.teardown().unwrap();
    net.teardown().unwrap();
    assert!(net.taps().unwrap().is_empty());
    assert_eq!(sh(&ns.0, "nft list tables"), "");
    assert!(!sh(&ns.0, "ip -o link").contains("banger0"));
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.exists())
}
