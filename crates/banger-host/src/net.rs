//! VM networking on the host: a port-less bridge holding the gateway address,
//! one tap per running VM with a /32 route to the guest, and an nftables
//! table for NAT and isolation. Privileged: in production these go through
//! the root helper; a root daemon runs them in-process.
//!
//! Every device this module touches is named by [`GATEWAY_DEV`] or
//! [`TAP_PREFIX`] + digits, and every call is idempotent, so a retry after a
//! crash is safe.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use crate::process::{CommandSpec, HostError, ProcessRunner};

/// The device that carries the gateway address (and, for
/// systemd-resolved, banger's DNS routing domain).
pub const GATEWAY_DEV: &str = "banger0";
/// Taps are `bgtap0`, `bgtap1`, …
pub const TAP_PREFIX: &str = "bgtap";
/// The nftables table (family `ip`) banger owns.
pub const NFT_TABLE: &str = "banger";
/// Link-local metadata endpoint clouds serve; guests never reach it.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// An IPv4 network: address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn parse(text: &str) -> Result<Subnet, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not a subnet like 10.213.0.0/16"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=29).contains(p))
            .ok_or_else(|| format!("prefix `/{prefix}` must be between /8 and /29"))?;
        let subnet = Subnet { addr, prefix };
        if subnet.network() != addr {
            return Err(format!(
                "`{text}` has host bits set; did you mean {}/{prefix}?",
                subnet.network()
            ));
        }
        Ok(subnet)
    }

    pub fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix as u32)
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let prefix = self.prefix.min(other.prefix);
        let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
        u32::from(self.addr) & mask == u32::from(other.addr) & mask
    }

    /// The first host address: the gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.host(1)
    }

    /// Host number `n` in the network (0 is the network address).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) + n)
    }

    /// Usable host numbers after the gateway, excluding broadcast.
    pub fn guest_hosts(&self) -> std::ops::Range<u32> {
        2..(1u32 << (32 - self.prefix as u32)) - 1
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What the host side of banger's network looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSetup {
    pub subnet: Subnet,
    /// Port banger's DNS server listens on at the gateway address; guests'
    /// queries to port 53 are redirected there.
    pub dns_port: u16,
    /// The VMs' DNS domain (`vm`), routed to banger's server by
    /// systemd-resolved where it runs.
    pub domain: String,
}

/// A DNS label banger may route (`vm`, `banger-test`): no dots, nothing odd.
pub fn is_domain(domain: &str) -> bool {
    banger_proto::is_dns_label(domain)
}

/// What makes systemd-resolved send `*.domain` queries to banger's server
/// (link DNS with a port, a routing-only domain), so `NAME.vm` resolves on
/// the host.
pub fn resolved_commands(setup: &NetSetup) -> Vec<CommandSpec> {
    let server = format!("{}:{}", setup.subnet.gateway(), setup.dns_port);
    vec![
        CommandSpec::new("resolvectl").args(["dns", GATEWAY_DEV, &server]),
        CommandSpec::new("resolvectl").args(["domain", GATEWAY_DEV, &format!("~{}", setup.domain)]),
    ]
}

/// Whether systemd-resolved runs here (its varlink socket exists).
pub fn resolved_running() -> bool {
    std::path::Path::new("/run/systemd/resolve/io.systemd.Resolve").exists()
}

/// `bgtap<digits>`, nothing else.
pub fn is_tap_name(name: &str) -> bool {
    name.strip_prefix(TAP_PREFIX)
        .is_some_and(|n| !n.is_empty() && n.len() <= 5 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Refuses any interface but banger's taps.
pub fn check_tap(name: &str) -> Result<(), HostError> {
    if is_tap_name(name) {
        Ok(())
    } else {
        Err(HostError::Refused(format!(
            "`{name}` is not one of banger's taps ({TAP_PREFIX}N)"
        )))
    }
}

/// Refuses addresses that are not a guest's in `setup`'s subnet (outside
/// it, or the gateway).
pub fn check_guest(guest: Ipv4Addr, setup: &NetSetup) -> Result<(), HostError> {
    if !setup.subnet.contains(guest) || guest == setup.subnet.gateway() {
        return Err(HostError::Refused(format!(
            "{guest} is not a guest address in {}",
            setup.subnet
        )));
    }
    Ok(())
}

pub trait HostNetwork: Send + Sync {
    /// Gateway device, IP forwarding and the nftables table. Idempotent;
    /// re-applying replaces the table atomically.
    fn setup(&self, setup: &NetSetup) -> Result<(), HostError>;
    /// Removes the table, the gateway device and every tap.
    fn teardown(&self) -> Result<(), HostError>;
    /// A persistent tap the VMM (running as `owner`) can open.
    fn create_tap(&self, tap: &str, owner: u32) -> Result<(), HostError>;
    fn delete_tap(&self, tap: &str) -> Result<(), HostError>;
    /// Routes `guest` (a /32) through `tap`, answering from the gateway.
    fn route(&self, tap: &str, guest: Ipv4Addr, setup: &NetSetup) -> Result<(), HostError>;
    fn unroute(&self, guest: Ipv4Addr) -> Result<(), HostError>;
    /// banger's taps that exist now.
    fn taps(&self) -> Result<Vec<String>, HostError>;
}

/// The whole `banger` table, replaced in one transaction.
pub fn nft_ruleset(setup: &NetSetup) -> String {
    let subnet = Subnet {
        addr: setup.subnet.network(),
        prefix: setup.subnet.prefix,
    };
    let gw = setup.subnet.gateway();
    let dns = setup.dns_port;
    let taps = format!("\"{TAP_PREFIX}*\"");
    format!(
        "table ip {NFT_TABLE} {{}}
delete table ip {NFT_TABLE}
table ip {NFT_TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname {taps} ip daddr {gw} udp dport 53 dnat to {gw}:{dns}
    iifname {taps} ip daddr {gw} tcp dport 53 dnat to {gw}:{dns}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} ip daddr != {subnet} masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {taps} ip daddr {METADATA_ADDR} drop
    iifname {taps} oifname {taps} drop
    oifname {taps} ct state established,related accept
    oifname {taps} drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {taps} ct state established,related accept
    iifname {taps} ip daddr {gw} udp dport {{ 53, {dns} }} accept
    iifname {taps} ip daddr {gw} tcp dport {{ 53, {dns} }} accept
    iifname {taps} drop
  }}
}}
"
    )
}

pub struct RealHostNetwork {
    pub runner: Arc<dyn ProcessRunner>,
}

impl RealHostNetwork {
    fn ip<const N: usize>(&self, args: [&str; N]) -> Result<(), HostError> {
        self.runner.run(&CommandSpec::new("ip").args(args))?;
        Ok(())
    }

    /// Runs an `ip` command whose failure only means "already so".
    fn ip_quiet<const N: usize>(&self, args: [&str; N], already: &[&str]) -> Result<(), HostError> {
        match self.ip(args) {
            Err(HostError::Failed { stderr, .. }) if already.iter().any(|a| stderr.contains(a)) => {
                Ok(())
            }
            other => other,
        }
    }
}

const EXISTS: &[&str] = &["File exists", "Device or resource busy"];
const GONE: &[&str] = &["Cannot find device", "No such process", "does not exist"];

impl HostNetwork for RealHostNetwork {
    fn setup(&self, setup: &NetSetup) -> Result<(), HostError> {
        if !is_domain(&setup.domain) {
            return Err(HostError::Refused(format!(
                "`{}` is not a DNS label banger can route",
                setup.domain
            )));
        }
        // A dummy device has carrier, which systemd-resolved wants before it
        // uses a link's DNS; kernels without the dummy driver get a bridge
        // with no ports (it never forwards, since nothing joins it).
        if let Err(e) = self.ip_quiet(["link", "add", GATEWAY_DEV, "type", "dummy"], EXISTS) {
            tracing::debug!(error = %e, "no dummy devices here; using a bridge");
            self.ip_quiet(["link", "add", GATEWAY_DEV, "type", "bridge"], EXISTS)?;
        }
        let gw = format!("{}/{}", setup.subnet.gateway(), setup.subnet.prefix);
        self.ip(["addr", "replace", &gw, "dev", GATEWAY_DEV])?;
        self.ip(["link", "set", GATEWAY_DEV, "up"])?;
        self.runner
            .run(&CommandSpec::new("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
        self.runner.run(
            &CommandSpec::new("nft")
                .args(["-f", "-"])
                .stdin(nft_ruleset(setup)),
        )?;
        if resolved_running() {
            for command in resolved_commands(setup) {
                // The VMs work without it; only host-side names are lost.
                if let Err(e) = self.runner.run(&command) {
                    tracing::warn!(error = %e, "systemd-resolved did not take banger's domain");
                }
            }
        }
        Ok(())
    }

    fn teardown(&self) -> Result<(), HostError> {
        let _ = self
            .runner
            .run(&CommandSpec::new("nft").args(["delete", "table", "ip", NFT_TABLE]));
        for tap in self.taps()? {
            self.delete_tap(&tap)?;
        }
        self.ip_quiet(["link", "del", GATEWAY_DEV], GONE)
    }

    fn create_tap(&self, tap: &str, owner: u32) -> Result<(), HostError> {
        check_tap(tap)?;
        let owner = owner.to_string();
        self.ip_quiet(
            ["tuntap", "add", "dev", tap, "mode", "tap", "user", &owner],
            EXISTS,
        )?;
        self.ip(["link", "set", tap, "up"])
    }

    fn delete_tap(&self, tap: &str) -> Result<(), HostError> {
        check_tap(tap)?;
        self.ip_quiet(["link", "del", tap], GONE)
    }

    fn route(&self, tap: &str, guest: Ipv4Addr, setup: &NetSetup) -> Result<(), HostError> {
        check_tap(tap)?;
        check_guest(guest, setup)?;
        let dst = format!("{guest}/32");
        let src = setup.subnet.gateway().to_string();
        self.ip(["route", "replace", &dst, "dev", tap, "src", &src])
    }

    fn unroute(&self, guest: Ipv4Addr) -> Result<(), HostError> {
        let dst = format!("{guest}/32");
        self.ip_quiet(["route", "del", &dst], GONE)
    }

    fn taps(&self) -> Result<Vec<String>, HostError> {
        let out = self
            .runner
            .run(&CommandSpec::new("ip").args(["-o", "link", "show"]))?;
        Ok(parse_link_names(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .filter(|n| is_tap_name(n))
            .collect())
    }
}

/// Interface names from `ip -o link show` ("2: eth0@if5: <…> …").
fn parse_link_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let name = line.split(": ").nth(1)?;
            Some(name.split('@').next()?.trim().to_string())
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    Setup(NetSetup),
    Teardown,
    CreateTap(String, u32),
    DeleteTap(String),
    Route(String, Ipv4Addr),
    Unroute(Ipv4Addr),
}

/// Records calls and keeps the set of taps, so reconciliation can be tested.
#[derive(Default, Clone)]
pub struct FakeHostNetwork {
    calls: Arc<Mutex<Vec<NetCall>>>,
    taps: Arc<Mutex<Vec<String>>>,
    routes: Arc<Mutex<Vec<(String, Ipv4Addr)>>>,
}

impl FakeHostNetwork {
    pub fn calls(&self) -> Vec<NetCall> {
        self.calls.lock().unwrap().clone()
    }

    /// Routes in place now: (tap, guest).
    pub fn routes(&self) -> Vec<(String, Ipv4Addr)> {
        self.routes.lock().unwrap().clone()
    }

    pub fn taps_now(&self) -> Vec<String> {
        self.taps.lock().unwrap().clone()
    }

    fn record(&self, call: NetCall) {
        self.calls.lock().unwrap().push(call);
    }
}

impl HostNetwork for FakeHostNetwork {
    fn setup(&self, setup: &NetSetup) -> Result<(), HostError> {
        self.record(NetCall::Setup(setup.clone()));
        Ok(())
    }

    fn teardown(&self) -> Result<(), HostError> {
        self.record(NetCall::Teardown);
        self.taps.lock().unwrap().clear();
        Ok(())
    }

    fn create_tap(&self, tap: &str, owner: u32) -> Result<(), HostError> {
        check_tap(tap)?;
        self.record(NetCall::CreateTap(tap.into(), owner));
        let mut taps = self.taps.lock().unwrap();
        if !taps.iter().any(|t| t == tap) {
            taps.push(tap.into());
        }
        Ok(())
    }

    fn delete_tap(&self, tap: &str) -> Result<(), HostError> {
        check_tap(tap)?;
        self.record(NetCall::DeleteTap(tap.into()));
        self.taps.lock().unwrap().retain(|t| t != tap);
        Ok(())
    }

    fn route(&self, tap: &str, guest: Ipv4Addr, _: &NetSetup) -> Result<(), HostError> {
        check_tap(tap)?;
        self.record(NetCall::Route(tap.into(), guest));
        let mut routes = self.routes.lock().unwrap();
        routes.retain(|(_, ip)| *ip != guest);
        routes.push((tap.into(), guest));
        Ok(())
    }

    fn unroute(&self, guest: Ipv4Addr) -> Result<(), HostError> {
        self.record(NetCall::Unroute(guest));
        self.routes.lock().unwrap().retain(|(_, ip)| *ip != guest);
        Ok(())
    }

    fn taps(&self) -> Result<Vec<String>, HostError> {
        Ok(self.taps.lock().unwrap().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_contain_and_overlap() {
        let s = Subnet::parse("10.213.0.0/16").unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(s.host(2), Ipv4Addr::new(10, 213, 0, 2));
        assert!(s.contains(Ipv4Addr::new(10, 213, 255, 254)));
        assert!(!s.contains(Ipv4Addr::new(10, 214, 0, 1)));
        assert!(s.overlaps(&Subnet::parse("10.0.0.0/8").unwrap()));
        assert!(s.overlaps(&Subnet::parse("10.213.7.0/24").unwrap()));
        assert!(!s.overlaps(&Subnet::parse("10.214.0.0/16").unwrap()));
        assert_eq!(Subnet::parse("10.0.0.0/24").unwrap().guest_hosts(), 2..255);
        for bad in [
            "10.213.0.1/16",
            "10.213.0.0",
            "10.213.0.0/31",
            "x/16",
            "10.0.0.0/4",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolved_routes_the_domain_to_banger_dns() {
        let setup = NetSetup {
            subnet: Subnet::parse("10.213.0.0/16").unwrap(),
            dns_port: 1053,
            domain: "vm".into(),
        };
        let lines: Vec<String> = resolved_commands(&setup)
            .iter()
            .map(|c| c.display())
            .collect();
        assert_eq!(
            lines,
            [
                "resolvectl dns banger0 10.213.0.1:1053",
                "resolvectl domain banger0 ~vm"
            ]
        );
        assert!(is_domain("vm") && is_domain("banger-test"));
        for bad in ["", "a.b", "-x", "VM", "x y", "~vm"] {
            assert!(!is_domain(bad), "{bad}");
        }
    }

    #[test]
    fn only_banger_taps_are_touched() {
        assert!(is_tap_name("bgtap0") && is_tap_name("bgtap12"));
        for bad in [
            "eth0",
            "bgtap",
            "bgtap-1",
            "bgtap1/../x",
            "bgtap123456",
            "banger0",
        ] {
            assert!(!is_tap_name(bad), "{bad}");
        }
        let net = RealHostNetwork {
            runner: Arc::new(crate::FakeRunner::default()),
        };
        let err = net.delete_tap("eth0").unwrap_err();
        assert!(
            err.to_string().contains("not one of banger's taps"),
            "{err}"
        );
        let setup = NetSetup {
            subnet: Subnet::parse("10.213.0.0/16").unwrap(),
            dns_port: 1053,
            domain: "vm".into(),
        };
        let outside = net.route("bgtap0", Ipv4Addr::new(192, 168, 1, 1), &setup);
        assert!(outside.is_err());
        assert!(net.route("bgtap0", setup.subnet.gateway(), &setup).is_err());
    }

    #[test]
    fn ruleset_isolates_guests_and_redirects_dns() {
        let rules = nft_ruleset(&NetSetup {
            subnet: Subnet::parse("10.213.0.0/16").unwrap(),
            dns_port: 1053,
            domain: "vm".into(),
        });
        assert!(rules.contains("ip saddr 10.213.0.0/16 ip daddr != 10.213.0.0/16 masquerade"));
        assert!(rules.contains("oifname \"bgtap*\" drop"));
        assert!(rules.contains("ip daddr 169.254.169.254 drop"));
        assert!(rules.contains("udp dport 53 dnat to 10.213.0.1:1053"));
        assert!(rules.starts_with("table ip banger {}\ndelete table ip banger\n"));
    }

    #[test]
    fn link_names_come_from_ip_output() {
        let text = "1: lo: <LOOPBACK,UP> mtu 65536\n5: bgtap3: <NO-CARRIER> mtu 1500\n7: veth0@if6: <UP> mtu 1500\n";
        assert_eq!(parse_link_names(text), vec!["lo", "bgtap3", "veth0"]);
    }
}
