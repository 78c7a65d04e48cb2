//! VM networking on the host: a device holding the gateway address, one tap
//! per running VM with a /32 route to the guest, and an nftables table for
//! NAT, isolation and source-address checks. Privileged: in production these
//! go through the root helper; a root daemon runs them in-process.
//!
//! Every object belongs to one [`Instance`] (one banger state directory) and
//! carries its id in its name, so two daemons on one host (two homes, two
//! users) never see, reuse or remove each other's. Every call is idempotent,
//! so a retry after a crash is safe.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::net_orphans::{check_owner, orphans, owner_wants, parse_links, OWNER_ALIAS};
use crate::process::{CommandSpec, HostError, ProcessRunner};

/// Link-local metadata endpoint clouds serve; guests never reach it.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The id every host object of one banger instance is named by: six
/// lowercase hex digits, so a tap name (`bg<id>t<N>`) fits the kernel's
/// 15-byte interface names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Instance(String);

impl Instance {
    pub const LEN: usize = 6;
    /// Tap numbers have at most this many digits.
    const TAP_DIGITS: usize = 5;

    pub fn parse(id: &str) -> Result<Instance, String> {
        if id.len() == Self::LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Instance(id.to_string()))
        } else {
            Err(format!(
                "`{id}` is not a banger network instance ({} lowercase hex digits)",
                Self::LEN
            ))
        }
    }

    /// A fresh id whose gateway device does not exist on this host.
    pub fn fresh(mut random: impl FnMut() -> u32) -> Instance {
        loop {
            let id = Instance(format!("{:06x}", random() & 0xff_ffff));
            if !std::path::Path::new("/sys/class/net")
                .join(id.gateway_dev())
                .exists()
            {
                return id;
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.0
    }

    /// The device that carries the gateway address (and, for
    /// systemd-resolved, banger's DNS routing domain).
    pub fn gateway_dev(&self) -> String {
        format!("bg{}gw", self.0)
    }

    fn tap_prefix(&self) -> String {
        format!("bg{}t", self.0)
    }

    /// Tap number `n`: `bg<id>t<n>`.
    pub fn tap(&self, n: u32) -> String {
        format!("{}{n}", self.tap_prefix())
    }

    /// Whether `name` is one of this instance's taps.
    pub fn owns_tap(&self, name: &str) -> bool {
        tap_instance(name).as_ref() == Some(self)
    }

    /// Whether `dev` is this instance's gateway device or one of its taps.
    pub fn owns_device(&self, dev: &str) -> bool {
        dev == self.gateway_dev() || self.owns_tap(dev)
    }

    /// The nftables table (family `ip`) this instance owns.
    pub fn nft_table(&self) -> String {
        format!("banger_{}", self.0)
    }

    /// An nft interface-name pattern matching this instance's taps only.
    fn tap_glob(&self) -> String {
        format!("\"{}*\"", self.tap_prefix())
    }
}

impl std::fmt::Display for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The instance a tap name (`bg<id>t<digits>`) belongs to, if it is one.
pub fn tap_instance(name: &str) -> Option<Instance> {
    let rest = name.strip_prefix("bg")?;
    let (id, n) = rest.split_at_checked(Instance::LEN)?;
    let n = n.strip_prefix('t')?;
    let digits =
        !n.is_empty() && n.len() <= Instance::TAP_DIGITS && n.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| Instance::parse(id).ok()).flatten()
}

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

/// What the host side of one banger instance's network looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSetup {
    pub instance: Instance,
    pub subnet: Subnet,
    /// Port banger's DNS server listens on at the gateway address; guests'
    /// queries to port 53 are redirected there.
    pub dns_port: u16,
    /// The VMs' DNS domain (`vm`), routed to banger's server by
    /// systemd-resolved where it runs.
    pub domain: String,
    /// The file in the instance's state directory that holds its id: when
    /// it is gone the instance is an orphan (see [`crate::net_orphans`]).
    /// `None`: kept until removed by hand.
    pub owner: Option<std::path::PathBuf>,
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
    let dev = setup.instance.gateway_dev();
    vec![
        CommandSpec::new("resolvectl").args(["dns", &dev, &server]),
        CommandSpec::new("resolvectl").args(["domain", &dev, &format!("~{}", setup.domain)]),
    ]
}

/// Whether systemd-resolved runs here (its varlink socket exists).
pub fn resolved_running() -> bool {
    std::path::Path::new("/run/systemd/resolve/io.systemd.Resolve").exists()
}

/// Refuses any interface but a banger instance's taps.
pub fn check_tap(name: &str) -> Result<Instance, HostError> {
    tap_instance(name).ok_or_else(|| {
        HostError::Refused(format!(
            "`{name}` is not one of banger's taps (bg<instance>t<N>)"
        ))
    })
}

/// Refuses a tap that is not `instance`'s.
pub fn check_own_tap(name: &str, instance: &Instance) -> Result<(), HostError> {
    if check_tap(name)? != *instance {
        return Err(HostError::Refused(format!(
            "`{name}` belongs to another banger instance, not to {instance}"
        )));
    }
    Ok(())
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

/// A network the host already uses: a route or an interface address, and
/// the device it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub device: String,
    pub subnet: Subnet,
}

/// The first of `used` that overlaps `subnet` and is not on one of
/// `instance`'s own devices.
pub fn foreign_overlap<'a>(
    subnet: &Subnet,
    instance: &Instance,
    used: &'a [HostRoute],
) -> Option<&'a HostRoute> {
    used.iter()
        .find(|r| !instance.owns_device(&r.device) && r.subnet.overlaps(subnet))
}

pub trait HostNetwork: Send + Sync {
    /// Gateway device, IP forwarding and the instance's nftables table.
    /// Refuses a subnet that overlaps a route or address of anything but
    /// the instance's own devices. Idempotent; re-applying replaces the
    /// table atomically.
    fn setup(&self, setup: &NetSetup) -> Result<(), HostError>;
    /// Removes the instance's table, gateway device and taps; nothing else.
    fn teardown(&self, instance: &Instance) -> Result<(), HostError>;
    /// A persistent tap the VMM (running as `owner`) can open.
    fn create_tap(&self, tap: &str, owner: u32) -> Result<(), HostError>;
    fn delete_tap(&self, tap: &str) -> Result<(), HostError>;
    /// Routes `guest` (a /32) through `tap`, answering from the gateway.
    fn route(&self, tap: &str, guest: Ipv4Addr, setup: &NetSetup) -> Result<(), HostError>;
    /// Removes the route to `guest` if it goes through one of `instance`'s
    /// taps; a route elsewhere is someone else's and stays.
    fn unroute(&self, instance: &Instance, guest: Ipv4Addr) -> Result<(), HostError>;
    /// The instance's taps that exist now.
    fn taps(&self, instance: &Instance) -> Result<Vec<String>, HostError>;
    /// Whether a process holds the tap open (it has carrier): a VMM the
    /// daemon does not know about may still use it.
    fn tap_busy(&self, tap: &str) -> bool {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/carrier"))
            .is_ok_and(|c| c.trim() == "1")
    }
    /// Removes the instances whose state directory is gone and whose taps
    /// nobody holds (every setup does this first); returns them.
    fn prune_orphans(&self) -> Result<Vec<Instance>, HostError> {
        Ok(Vec::new())
    }
    /// The owner file the instance's gateway device names (its alias), if
    /// the device is there and names one. Anyone may read it: this reads
    /// the caller's own network namespace's sysfs.
    fn gateway_owner(&self, instance: &Instance) -> Result<Option<PathBuf>, HostError> {
        let alias =
            std::fs::read_to_string(format!("/sys/class/net/{}/ifalias", instance.gateway_dev()))
                .unwrap_or_default();
        Ok(owner_of_alias(alias.trim()))
    }
}

/// The owner file an alias names (`banger-owner:PATH`).
pub fn owner_of_alias(alias: &str) -> Option<PathBuf> {
    alias
        .strip_prefix(OWNER_ALIAS)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The instance's whole table, replaced in one transaction.
pub fn nft_ruleset(setup: &NetSetup) -> String {
    let subnet = Subnet {
        addr: setup.subnet.network(),
        prefix: setup.subnet.prefix,
    };
    let gw = setup.subnet.gateway();
    let dns = setup.dns_port;
    let taps = setup.instance.tap_glob();
    let table = setup.instance.nft_table();
    // `fib saddr . iif oif missing` is a strict reverse-path check: a packet
    // from a tap must carry the one source address routed back through that
    // tap (its VM's), so a guest cannot spoof another VM, the gateway or an
    // outside address.
    format!(
        "table ip {table} {{}}
delete table ip {table}
table ip {table} {{
  chain antispoof {{
    type filter hook prerouting priority raw; policy accept;
    iifname {taps} fib saddr . iif oif missing drop
  }}
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
    fn ip<const N: usize>(&self, args: [&str; N]) -> Result<String, HostError> {
        let out = self.runner.run(&CommandSpec::new("ip").args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs an `ip` command whose failure only means "already so".
    fn ip_quiet<const N: usize>(&self, args: [&str; N], already: &[&str]) -> Result<(), HostError> {
        match self.ip(args) {
            Err(HostError::Failed { stderr, .. }) if already.iter().any(|a| stderr.contains(a)) => {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    /// Every route (all tables) and interface address on the host, as seen
    /// by the commands this network runs (so inside a test's namespace).
    pub fn host_networks(&self) -> Result<Vec<HostRoute>, HostError> {
        let mut used = parse_ip_routes(&self.ip(["-o", "-4", "route", "show", "table", "all"])?);
        used.extend(parse_ip_addrs(&self.ip(["-o", "-4", "addr", "show"])?));
        Ok(used)
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
        let owner = match &setup.owner {
            Some(path) => Some(check_owner(path).map_err(HostError::Refused)?),
            None => None,
        };
        // An orphan may hold the very subnet wanted here.
        if let Err(e) = self.prune_orphans() {
            tracing::warn!(error = %e, "could not look for orphaned banger networks");
        }
        let used = self.host_networks()?;
        if let Some(r) = foreign_overlap(&setup.subnet, &setup.instance, &used) {
            return Err(HostError::Refused(format!(
                "subnet {} overlaps {} on {}, which is not this banger instance's; pick \
                 another network.subnet in the config file",
                setup.subnet, r.subnet, r.device
            )));
        }
        let dev = setup.instance.gateway_dev();
        // A dummy device has carrier, which systemd-resolved wants before it
        // uses a link's DNS; kernels without the dummy driver get a bridge
        // with no ports (it never forwards, since nothing joins it).
        if let Err(e) = self.ip_quiet(["link", "add", &dev, "type", "dummy"], EXISTS) {
            tracing::debug!(error = %e, "no dummy devices here; using a bridge");
            self.ip_quiet(["link", "add", &dev, "type", "bridge"], EXISTS)?;
        }
        if let Some(owner) = owner {
            self.ip([
                "link",
                "set",
                "dev",
                &dev,
                "alias",
                &format!("{OWNER_ALIAS}{owner}"),
            ])?;
        }
        let gw = format!("{}/{}", setup.subnet.gateway(), setup.subnet.prefix);
        self.ip(["addr", "replace", &gw, "dev", &dev])?;
        // Only this subnet's address: a changed subnet replaces the old one.
        let shown = self.ip(["-o", "-4", "addr", "show", "dev", &dev])?;
        for old in shown.lines().filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "inet")?;
            words.get(at + 1).map(|a| a.to_string())
        }) {
            if old != gw {
                self.ip_quiet(["addr", "del", &old, "dev", &dev], GONE)?;
            }
        }
        self.ip(["link", "set", &dev, "up"])?;
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

    fn teardown(&self, instance: &Instance) -> Result<(), HostError> {
        let _ = self.runner.run(&CommandSpec::new("nft").args([
            "delete",
            "table",
            "ip",
            &instance.nft_table(),
        ]));
        for tap in self.taps(instance)? {
            self.delete_tap(&tap)?;
        }
        self.ip_quiet(["link", "del", &instance.gateway_dev()], GONE)
    }

    fn create_tap(&self, tap: &str, owner: u32) -> Result<(), HostError> {
        check_tap(tap)?;
        let owner = owner.to_string();
        self.ip_quiet(
            ["tuntap", "add", "dev", tap, "mode", "tap", "user", &owner],
            EXISTS,
        )?;
        self.ip(["link", "set", tap, "up"]).map(drop)
    }

    fn delete_tap(&self, tap: &str) -> Result<(), HostError> {
        check_tap(tap)?;
        self.ip_quiet(["link", "del", tap], GONE)
    }

    fn route(&self, tap: &str, guest: Ipv4Addr, setup: &NetSetup) -> Result<(), HostError> {
        check_own_tap(tap, &setup.instance)?;
        check_guest(guest, setup)?;
        let dst = format!("{guest}/32");
        let src = setup.subnet.gateway().to_string();
        self.ip(["route", "replace", &dst, "dev", tap, "src", &src])
            .map(drop)
    }

    fn unroute(&self, instance: &Instance, guest: Ipv4Addr) -> Result<(), HostError> {
        let dst = format!("{guest}/32");
        let routes = parse_ip_routes(&self.ip(["-o", "-4", "route", "show", &dst])?);
        for route in routes {
            if instance.owns_tap(&route.device) {
                self.ip_quiet(["route", "del", &dst, "dev", &route.device], GONE)?;
            }
        }
        Ok(())
    }

    fn taps(&self, instance: &Instance) -> Result<Vec<String>, HostError> {
        let out = self.ip(["-o", "link", "show"])?;
        Ok(parse_links(&out)
            .into_iter()
            .map(|l| l.name)
            .filter(|n| instance.owns_tap(n))
            .collect())
    }

    fn gateway_owner(&self, instance: &Instance) -> Result<Option<PathBuf>, HostError> {
        let gateway = instance.gateway_dev();
        // No such device: `ip` says so and fails.
        let Ok(out) = self.ip(["-o", "link", "show", "dev", gateway.as_str()]) else {
            return Ok(None);
        };
        Ok(parse_links(&out)
            .into_iter()
            .find(|l| l.name == gateway)
            .and_then(|l| l.alias)
            .and_then(|a| owner_of_alias(&a)))
    }

    fn prune_orphans(&self) -> Result<Vec<Instance>, HostError> {
        let links = parse_links(&self.ip(["-o", "link", "show"])?);
        let mut removed = Vec::new();
        for (instance, owner) in orphans(&links, owner_wants) {
            match self.teardown(&instance) {
                Ok(()) => {
                    tracing::info!(%instance, owner = %owner.display(), "removed an orphaned banger network: its state directory is gone");
                    removed.push(instance);
                }
                Err(e) => {
                    tracing::warn!(%instance, error = %e, "could not remove an orphaned banger network")
                }
            }
        }
        Ok(removed)
    }
}

/// Route types `ip route` may print before the destination.
const ROUTE_TYPES: &[&str] = &[
    "unicast",
    "local",
    "broadcast",
    "multicast",
    "anycast",
    "unreachable",
    "blackhole",
    "prohibit",
    "throw",
    "nat",
];

/// Routes from `ip -o -4 route show [table all]` ("10.0.0.0/8 dev eth0 …",
/// "local 10.0.0.1 dev eth0 table local …"), skipping default routes, which
/// overlap everything by design, and routes without a device.
pub fn parse_ip_routes(text: &str) -> Vec<HostRoute> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().peekable();
            if words.peek().is_some_and(|w| ROUTE_TYPES.contains(w)) {
                words.next();
            }
            let dest = words.next()?;
            if dest == "default" {
                return None;
            }
            let subnet = parse_network(dest)?;
            let words: Vec<&str> = words.collect();
            let device = words
                .windows(2)
                .find(|w| w[0] == "dev")
                .map(|w| w[1].to_string())?;
            Some(HostRoute { device, subnet })
        })
        .collect()
}

/// Interface addresses from `ip -o -4 addr show` ("2: eth0    inet 10.0.0.5/24 …").
pub fn parse_ip_addrs(text: &str) -> Vec<HostRoute> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let device = words.get(1)?.split('@').next()?.to_string();
            let at = words.iter().position(|w| *w == "inet")?;
            let subnet = parse_network(words.get(at + 1)?)?;
            Some(HostRoute { device, subnet })
        })
        .collect()
}

/// `A.B.C.D[/N]` as the network it covers (host bits cleared).
fn parse_network(text: &str) -> Option<Subnet> {
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?),
        None => (text.parse().ok()?, 32),
    };
    if prefix == 0 || prefix > 32 {
        return None;
    }
    let mask = u32::MAX << (32 - prefix as u32);
    Some(Subnet {
        addr: Ipv4Addr::from(u32::from(addr) & mask),
        prefix,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    Setup(NetSetup),
    Teardown(Instance),
    CreateTap(String, u32),
    DeleteTap(String),
    Route(String, Ipv4Addr),
    Unroute(Ipv4Addr),
    PruneOrphans,
}

/// Records calls and keeps the set of taps, so reconciliation can be tested.
#[derive(Default, Clone)]
pub struct FakeHostNetwork {
    calls: Arc<Mutex<Vec<NetCall>>>,
    taps: Arc<Mutex<Vec<String>>>,
    routes: Arc<Mutex<Vec<(String, Ipv4Addr)>>>,
    busy: Arc<Mutex<Vec<String>>>,
    orphans: Arc<Mutex<Vec<Instance>>>,
    owners: Arc<Mutex<Vec<(Instance, PathBuf)>>>,
}

impl FakeHostNetwork {
    /// Makes `instance`'s gateway name `owner` as its owner file, as a
    /// daemon of another state directory would have set it up.
    pub fn owned_by(&self, instance: &Instance, owner: &Path) {
        self.owners
            .lock()
            .unwrap()
            .push((instance.clone(), owner.to_path_buf()));
    }

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

    /// Makes `tap` look held open by some process.
    pub fn set_busy(&self, tap: &str, busy: bool) {
        let mut set = self.busy.lock().unwrap();
        set.retain(|t| t != tap);
        if busy {
            set.push(tap.into());
        }
    }

    /// Makes `instance` look orphaned: the next prune removes it.
    pub fn set_orphan(&self, instance: &Instance) {
        self.orphans.lock().unwrap().push(instance.clone());
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

    fn teardown(&self, instance: &Instance) -> Result<(), HostError> {
        self.record(NetCall::Teardown(instance.clone()));
        self.taps.lock().unwrap().retain(|t| !instance.owns_tap(t));
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

    fn route(&self, tap: &str, guest: Ipv4Addr, setup: &NetSetup) -> Result<(), HostError> {
        check_own_tap(tap, &setup.instance)?;
        self.record(NetCall::Route(tap.into(), guest));
        let mut routes = self.routes.lock().unwrap();
        routes.retain(|(_, ip)| *ip != guest);
        routes.push((tap.into(), guest));
        Ok(())
    }

    fn unroute(&self, instance: &Instance, guest: Ipv4Addr) -> Result<(), HostError> {
        self.record(NetCall::Unroute(guest));
        self.routes
            .lock()
            .unwrap()
            .retain(|(tap, ip)| *ip != guest || !instance.owns_tap(tap));
        Ok(())
    }

    fn taps(&self, instance: &Instance) -> Result<Vec<String>, HostError> {
        let taps = self.taps.lock().unwrap();
        Ok(taps
            .iter()
            .filter(|t| instance.owns_tap(t))
            .cloned()
            .collect())
    }

    fn tap_busy(&self, tap: &str) -> bool {
        self.busy.lock().unwrap().iter().any(|t| t == tap)
    }

    fn gateway_owner(&self, instance: &Instance) -> Result<Option<PathBuf>, HostError> {
        Ok(self
            .owners
            .lock()
            .unwrap()
            .iter()
            .find(|(i, _)| i == instance)
            .map(|(_, p)| p.clone()))
    }

    fn prune_orphans(&self) -> Result<Vec<Instance>, HostError> {
        self.record(NetCall::PruneOrphans);
        let orphans = std::mem::take(&mut *self.orphans.lock().unwrap());
        for instance in &orphans {
            self.teardown(instance)?;
        }
        Ok(orphans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> NetSetup {
        NetSetup {
            instance: Instance::parse("0a1b2c").unwrap(),
            subnet: Subnet::parse("10.213.0.0/16").unwrap(),
            dns_port: 1053,
            domain: "vm".into(),
            owner: None,
        }
    }

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
        let lines: Vec<String> = resolved_commands(&setup())
            .iter()
            .map(|c| c.display())
            .collect();
        assert_eq!(
            lines,
            [
                "resolvectl dns bg0a1b2cgw 10.213.0.1:1053",
                "resolvectl domain bg0a1b2cgw ~vm"
            ]
        );
        assert!(is_domain("vm") && is_domain("banger-test"));
        for bad in ["", "a.b", "-x", "VM", "x y", "~vm"] {
            assert!(!is_domain(bad), "{bad}");
        }
    }

    #[test]
    fn instances_name_their_objects_and_only_theirs() {
        let a = Instance::parse("0a1b2c").unwrap();
        let b = Instance::parse("ffffff").unwrap();
        assert_eq!(a.tap(0), "bg0a1b2ct0");
        assert!(
            a.tap(99999).len() <= 15,
            "the kernel's interface name limit"
        );
        assert_eq!(a.gateway_dev(), "bg0a1b2cgw");
        assert_eq!(a.nft_table(), "banger_0a1b2c");
        assert!(a.owns_tap("bg0a1b2ct12") && !b.owns_tap("bg0a1b2ct12"));
        assert!(a.owns_device("bg0a1b2cgw") && !a.owns_device("bgffffffgw"));
        assert_eq!(tap_instance("bgfffffft3"), Some(b.clone()));
        for bad in [
            "eth0",
            "bgtap0",
            "bg0a1b2ct",
            "bg0a1b2ct-1",
            "bg0a1b2ct123456",
            "bg0A1B2Ct1",
            "bg0a1b2cgw",
            "bg0a1b2ct1/../x",
        ] {
            assert!(tap_instance(bad).is_none(), "{bad}");
            assert!(check_tap(bad).is_err(), "{bad}");
        }
        for bad in ["", "0a1b2", "0a1b2c3", "0a1b2g", "../../"] {
            assert!(Instance::parse(bad).is_err(), "{bad}");
        }
        let fresh = Instance::fresh(|| 0x12345678);
        assert_eq!(fresh.id(), "345678");
        let err = check_own_tap("bgfffffft1", &a).unwrap_err();
        assert!(err.to_string().contains("another banger instance"), "{err}");
    }

    #[test]
    fn foreign_taps_and_addresses_are_refused() {
        let net = RealHostNetwork {
            runner: Arc::new(crate::FakeRunner::default()),
        };
        let err = net.delete_tap("eth0").unwrap_err();
        assert!(
            err.to_string().contains("not one of banger's taps"),
            "{err}"
        );
        let setup = setup();
        let outside = net.route("bg0a1b2ct0", Ipv4Addr::new(192, 168, 1, 1), &setup);
        assert!(outside.is_err());
        assert!(net
            .route("bg0a1b2ct0", setup.subnet.gateway(), &setup)
            .is_err());
        let other = net.route("bgfffffft0", Ipv4Addr::new(10, 213, 0, 2), &setup);
        assert!(other.is_err(), "another instance's tap");
    }

    #[test]
    fn ruleset_isolates_guests_checks_sources_and_redirects_dns() {
        let rules = nft_ruleset(&setup());
        assert!(rules.contains("ip saddr 10.213.0.0/16 ip daddr != 10.213.0.0/16 masquerade"));
        assert!(rules.contains("oifname \"bg0a1b2ct*\" drop"));
        assert!(rules.contains("iifname \"bg0a1b2ct*\" fib saddr . iif oif missing drop"));
        assert!(rules.contains("ip daddr 169.254.169.254 drop"));
        assert!(rules.contains("udp dport 53 dnat to 10.213.0.1:1053"));
        assert!(rules.starts_with("table ip banger_0a1b2c {}\ndelete table ip banger_0a1b2c\n"));
    }

    #[test]
    fn link_names_routes_and_addresses_come_from_ip_output() {
        let text = "1: lo: <LOOPBACK,UP> mtu 65536\n5: bgtap3: <NO-CARRIER> mtu 1500\n7: veth0@if6: <UP> mtu 1500\n";
        let names: Vec<String> = parse_links(text).into_iter().map(|l| l.name).collect();
        assert_eq!(names, vec!["lo", "bgtap3", "veth0"]);
        let routes = parse_ip_routes(
            "default via 192.0.2.1 dev eth0\n\
             192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.5\n\
             10.213.0.0/16 dev bg0a1b2cgw proto kernel scope link src 10.213.0.1 linkdown\n\
             10.213.0.2 dev bg0a1b2ct0 scope link src 10.213.0.1\n\
             local 192.0.2.5 dev eth0 table local proto kernel scope host src 192.0.2.5\n\
             unreachable 172.16.0.0/12\n",
        );
        let shown: Vec<String> = routes
            .iter()
            .map(|r| format!("{} {}", r.device, r.subnet))
            .collect();
        assert_eq!(
            shown,
            [
                "eth0 192.0.2.0/24",
                "bg0a1b2cgw 10.213.0.0/16",
                "bg0a1b2ct0 10.213.0.2/32",
                "eth0 192.0.2.5/32"
            ]
        );
        let addrs = parse_ip_addrs(
            "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
             3: wlan0    inet 192.168.1.20/24 brd 192.168.1.255 scope global wlan0\n",
        );
        assert_eq!(addrs[1].device, "wlan0");
        assert_eq!(addrs[1].subnet, Subnet::parse("192.168.1.0/24").unwrap());
        let mut used = routes;
        used.extend(addrs);
        let a = Instance::parse("0a1b2c").unwrap();
        let mine = Subnet::parse("10.213.0.0/16").unwrap();
        assert!(foreign_overlap(&mine, &a, &used).is_none());
        let b = Instance::parse("ffffff").unwrap();
        assert_eq!(
            foreign_overlap(&mine, &b, &used).unwrap().device,
            "bg0a1b2cgw",
            "another instance's subnet is foreign"
        );
        let lan = Subnet::parse("192.168.0.0/16").unwrap();
        assert_eq!(foreign_overlap(&lan, &a, &used).unwrap().device, "wlan0");
    }
}
