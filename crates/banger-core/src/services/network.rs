//! The network service: the subnet, each VM's address, the tap pool, and
//! reconciling the host's taps and routes with the VMs that really run.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use banger_host::{HostNetwork, Instance, NetSetup, Subnet};
use banger_proto::agent::GuestNetwork;
use banger_proto::domain::NetworkMode;

use crate::config::Config;
use crate::error::{OpError, OpResult};
use crate::network::{address, dns};
use crate::store::Store;
use crate::vm::vmm::{Nic, NicBackend};
#[cfg(test)]
use banger_host::NetCall;

const SUBNET_KEY: &str = "network.subnet";
/// This state directory's network instance: the id in the name of every
/// host object it makes.
const INSTANCE_KEY: &str = "network.instance";
const DEFAULT_DOMAIN: &str = "vm";
const DEFAULT_DNS_PORT: u16 = 1053;
const DEFAULT_POOL: usize = 2;
/// Taps are opened through it; a kernel without it has no taps.
const TUN_DEVICE: &str = "/dev/net/tun";
/// Every user-mode guest's address: each has a NAT of its own.
const USER_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

enum State {
    Disabled,
    /// Networking is wanted but cannot work; every start says why.
    Broken(String),
    /// Bridged: taps on banger's subnet.
    Ready(NetSetup),
    /// The VMM's user-mode NAT: no host objects at all.
    User,
}

/// What a user-mode VM cannot do, for `vm inspect` and `doctor`.
pub const USER_MODE_LACKS: [&str; 3] = [
    "no NAME.vm from the host (reach it with `banger vm port-forward` or `banger ssh`)",
    "no VM-to-VM traffic",
    "no Firecracker VMs (bridged networking needs the root helper: `sudo banger system install`)",
];

pub struct NetworkService {
    host: Arc<dyn HostNetwork>,
    /// Names this daemon's host objects; another daemon's are never touched.
    instance: Instance,
    store: Arc<Store>,
    state: State,
    domain: String,
    pool: usize,
    /// Taps are handed to VMMs running as this user.
    owner: u32,
    /// `network.subnet` from the config, if one was set.
    configured_subnet: Option<String>,
    /// Serialises tap assignment.
    taps: Mutex<Taps>,
}

#[derive(Default)]
struct Taps {
    /// The host side is set up.
    ready: bool,
    /// Handed out by this daemon; a VM's runtime row names its tap only once
    /// its VMM runs, and two starts must not take the same spare.
    claimed: Vec<String>,
}

impl NetworkService {
    pub fn new(
        config: &Config,
        host: Arc<dyn HostNetwork>,
        privileged: bool,
        store: Arc<Store>,
    ) -> NetworkService {
        let net = &config.network;
        // `tap` is what bridged was called before user mode existed.
        let mode = match net.mode.as_deref().unwrap_or("auto") {
            "tap" => Ok(NetworkMode::Bridged),
            word => word.parse::<NetworkMode>(),
        };
        // SAFETY: geteuid has no preconditions.
        let owner = unsafe { libc::geteuid() };
        let instance = match Self::instance(&store) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "no network instance id; using a one-off one");
                Instance::fresh(random_u32)
            }
        };
        let state = match mode {
            Ok(NetworkMode::None) => State::Disabled,
            Ok(NetworkMode::User) => State::User,
            // Neither root nor a root helper, or no tun driver: taps cannot
            // be made, and `auto` means the VMM's own NAT instead.
            Ok(NetworkMode::Auto) if !privileged || !std::path::Path::new(TUN_DEVICE).exists() => {
                State::User
            }
            Ok(NetworkMode::Auto | NetworkMode::Bridged) => {
                match Self::subnet(config.network.subnet.as_deref(), &store, &instance) {
                    Ok(subnet) => State::Ready(NetSetup {
                        instance: instance.clone(),
                        subnet,
                        dns_port: net.dns_port.unwrap_or(DEFAULT_DNS_PORT),
                        domain: net.domain.clone().unwrap_or_else(|| DEFAULT_DOMAIN.into()),
                        owner: None,
                    }),
                    Err(e) => State::Broken(e),
                }
            }
            Err(_) => State::Broken(format!(
                "network.mode `{}` is not one of auto, bridged, user, none",
                net.mode.as_deref().unwrap_or_default()
            )),
        };
        NetworkService {
            host,
            instance,
            store,
            state,
            domain: net.domain.clone().unwrap_or_else(|| DEFAULT_DOMAIN.into()),
            pool: net.tap_pool.unwrap_or(DEFAULT_POOL).min(64),
            owner,
            configured_subnet: net.subnet.clone(),
            taps: Mutex::default(),
        }
    }

    /// Another live state directory already has this one's instance id: a
    /// home copied whole (`cp -a`, a restored backup) carries its
    /// original's id, and two daemons on one id take each other's gateway
    /// and NAT. The gateway's alias names its owner file; if that is not
    /// this directory's and still holds the id, the id is the other's.
    fn claimed_elsewhere(&self, ours: &std::path::Path) -> Option<std::path::PathBuf> {
        let theirs = self.host.gateway_owner(&self.instance).ok().flatten()?;
        let same = match (theirs.canonicalize(), ours.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => theirs == ours,
        };
        let wanted = banger_host::net_orphans::owner_wants(&theirs, &self.instance);
        (!same && wanted == Some(true)).then_some(theirs)
    }

    /// This state directory takes a fresh instance id and subnet, leaving
    /// the objects of the id it had to the directory that owns them.
    fn take_fresh_instance(&mut self) -> Result<(), String> {
        let fresh = Instance::fresh(random_u32);
        self.store
            .set_setting(INSTANCE_KEY, fresh.id())
            .map_err(|e| e.to_string())?;
        self.store
            .set_setting(SUBNET_KEY, "")
            .map_err(|e| e.to_string())?;
        let State::Ready(setup) = &self.state else {
            return Ok(());
        };
        let mut setup = setup.clone();
        setup.subnet = Self::subnet(self.configured_subnet.as_deref(), &self.store, &fresh)?;
        setup.instance = fresh.clone();
        self.instance = fresh;
        self.state = State::Ready(setup);
        Ok(())
    }

    /// Writes the instance's id into `path` (in the state directory) and
    /// names it as the instance's owner on the host: once the state
    /// directory is thrown away, the next banger to set up a network
    /// removes what this one left (`banger_host::net_orphans`).
    pub fn with_owner_file(mut self, path: std::path::PathBuf) -> NetworkService {
        if !matches!(self.state, State::Ready(_)) {
            return self;
        }
        if let Err(e) = banger_host::net_orphans::check_owner(&path) {
            tracing::warn!(error = %e, "this network's host objects will not be removed automatically if its state directory goes");
            return self;
        }
        if let Some(theirs) = self.claimed_elsewhere(&path) {
            let old = self.instance.clone();
            match self.take_fresh_instance() {
                Ok(()) => tracing::warn!(
                    old = %old,
                    new = %self.instance,
                    owner = %theirs.display(),
                    "this state directory is a copy of another that is in use: it takes a network instance of its own"
                ),
                Err(e) => {
                    self.state = State::Broken(format!(
                        "this state directory shares network instance {old} with {} (a copy?), and a fresh one could not be taken: {e}",
                        theirs.display()
                    ));
                    return self;
                }
            }
        }
        let id = format!("{}\n", self.instance.id());
        if std::fs::read_to_string(&path).ok().as_deref() != Some(id.as_str()) {
            let tmp = path.with_extension("tmp");
            let written = std::fs::write(&tmp, &id).and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!(error = %e, path = %path.display(), "cannot write the network's owner file; its host objects will not be removed if this state directory goes");
                return self;
            }
        }
        if let State::Ready(setup) = &mut self.state {
            setup.owner = Some(path);
        }
        self
    }

    /// The instance id chosen when this state directory first ran.
    fn instance(store: &Store) -> Result<Instance, String> {
        if let Some(id) = store.setting(INSTANCE_KEY).map_err(|e| e.to_string())? {
            return Instance::parse(&id);
        }
        let instance = Instance::fresh(random_u32);
        store
            .set_setting(INSTANCE_KEY, instance.id())
            .map_err(|e| e.to_string())?;
        Ok(instance)
    }

    /// The configured subnet, else the one chosen before, else a fresh choice.
    fn subnet(
        configured: Option<&str>,
        store: &Store,
        instance: &Instance,
    ) -> Result<Subnet, String> {
        let routes = address::parse_proc_routes(
            &std::fs::read_to_string("/proc/net/route").unwrap_or_default(),
        );
        let remembered = store
            .setting(SUBNET_KEY)
            .map_err(|e| e.to_string())?
            .filter(|s| !s.is_empty());
        let wanted = configured.map(str::to_string).or(remembered);
        let subnet = address::choose_subnet(wanted.as_deref(), &routes, instance)?;
        store
            .set_setting(SUBNET_KEY, &subnet.to_string())
            .map_err(|e| e.to_string())?;
        Ok(subnet)
    }

    fn ready(&self) -> OpResult<Option<&NetSetup>> {
        match &self.state {
            State::Disabled | State::User => Ok(None),
            State::Broken(e) => Err(OpError::invalid(format!("VM networking: {e}"))),
            State::Ready(setup) => Ok(Some(setup)),
        }
    }

    /// Where banger's DNS server listens, when networking is on.
    pub fn dns_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.state {
            State::Ready(s) => Some(std::net::SocketAddr::new(
                s.subnet.gateway().into(),
                s.dns_port,
            )),
            _ => None,
        }
    }

    /// The device holding the gateway address (where systemd-resolved
    /// routes the domain).
    pub fn gateway_dev(&self) -> String {
        self.instance.gateway_dev()
    }

    /// The domain VM names live under (`vm`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The mode new VM starts get; `None` when networking is off.
    pub fn mode(&self) -> Option<NetworkMode> {
        match &self.state {
            State::Disabled | State::Broken(_) => None,
            State::Ready(_) => Some(NetworkMode::Bridged),
            State::User => Some(NetworkMode::User),
        }
    }

    /// Refuses a start this network cannot serve, before anything is made.
    pub fn check_vmm(&self, vmm: banger_proto::domain::VmmKind) -> OpResult<()> {
        if matches!(self.state, State::User) && vmm == banger_proto::domain::VmmKind::Firecracker {
            return Err(OpError::invalid(
                "Firecracker has no user-mode networking, and this daemon has no root helper \
                 for bridged networking: run `sudo banger system install` (then restart the \
                 daemon), use --vmm qemu, or set network.mode = \"none\" for VMs without a network",
            ));
        }
        Ok(())
    }

    /// What `doctor` and `daemon status` show.
    pub fn describe(&self) -> Result<String, crate::network::NetError> {
        match &self.state {
            State::Disabled => Ok("off (network.mode none, or no /dev/net/tun for taps)".into()),
            State::User => Ok(format!(
                "user-mode (QEMU's NAT, no root needed): guests reach out, and the host's \
                 loopback services at {}; {}",
                crate::vm::vmm::USER_NET.1,
                USER_MODE_LACKS.join("; ")
            )),
            State::Broken(e) => Err(e.clone().into()),
            State::Ready(s) => Ok(format!(
                "taps on {} (gateway {} on {}, domain .{}, instance {})",
                s.subnet,
                s.subnet.gateway(),
                s.instance.gateway_dev(),
                self.domain,
                s.instance
            )),
        }
    }

    /// An address for a new VM; none when networking is off.
    pub fn allocate(&self) -> OpResult<Option<String>> {
        let Some(setup) = self.ready()? else {
            return Ok(None);
        };
        let used: Vec<Ipv4Addr> = self
            .store
            .list_vms()?
            .iter()
            .filter_map(|v| v.ip.as_deref()?.parse().ok())
            .collect();
        address::allocate(&setup.subnet, &used)
            .map(|ip| Some(ip.to_string()))
            .ok_or_else(|| {
                OpError::conflict(format!(
                    "subnet {} has no free address; remove a VM (`banger vm rm`) or set a \
                     larger network.subnet",
                    setup.subnet
                ))
            })
    }

    /// What the agent configures inside the VM.
    pub fn guest(&self, ip: Option<&str>) -> OpResult<Option<GuestNetwork>> {
        if matches!(self.state, State::User) {
            let (_, host, dns) = crate::vm::vmm::USER_NET;
            return Ok(Some(GuestNetwork {
                address: USER_GUEST,
                gateway: parse_ip(host)?,
                nameserver: parse_ip(dns)?,
                search: Some(self.domain.clone()),
            }));
        }
        let (Some(setup), Some(ip)) = (self.ready()?, ip) else {
            return Ok(None);
        };
        Ok(Some(GuestNetwork {
            address: parse_ip(ip)?,
            gateway: setup.subnet.gateway(),
            nameserver: setup.subnet.gateway(),
            search: Some(self.domain.clone()),
        }))
    }

    fn ensure_host(&self, setup: &NetSetup, taps: &mut Taps) -> OpResult<()> {
        if !taps.ready {
            self.host
                .setup(setup)
                .map_err(|e| OpError::internal(format!("setting up VM networking: {e}")))?;
            taps.ready = true;
        }
        Ok(())
    }

    fn taps_in_use(&self, taps: &Taps) -> OpResult<Vec<String>> {
        let mut used: Vec<String> = self
            .store
            .list_runtimes()?
            .into_iter()
            .filter_map(|r| r.tap)
            .collect();
        used.extend(taps.claimed.iter().cloned());
        Ok(used)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Taps> {
        self.taps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spare taps: this instance's, not in use by a VM of ours, and not held
    /// open by any process (a VMM we lost track of may still have one).
    fn spares(&self, taps: &Taps) -> OpResult<Vec<String>> {
        let used = self.taps_in_use(taps)?;
        Ok(self
            .host
            .taps(&self.instance)
            .map_err(host_err)?
            .into_iter()
            .filter(|t| !used.contains(t) && !self.host.tap_busy(t))
            .collect())
    }

    /// A new tap, named clear of every tap this instance has.
    fn new_tap(&self) -> OpResult<String> {
        let existing = self.host.taps(&self.instance).map_err(host_err)?;
        let tap = next_tap(&self.instance, &existing);
        self.host.create_tap(&tap, self.owner).map_err(host_err)?;
        Ok(tap)
    }

    /// A tap for the VM at `ip`, from the pool when one is spare, routed to
    /// the guest.
    pub fn attach(&self, ip: Option<&str>) -> OpResult<Option<Nic>> {
        if matches!(self.state, State::User) {
            return Ok(Some(Nic {
                backend: NicBackend::User,
                mac: address::mac_for(USER_GUEST),
            }));
        }
        let (Some(setup), Some(ip)) = (self.ready()?, ip) else {
            return Ok(None);
        };
        let guest = parse_ip(ip)?;
        let mut taps = self.lock();
        self.ensure_host(setup, &mut taps)?;
        let tap = match self.spares(&taps)?.into_iter().next() {
            Some(spare) => spare,
            None => self.new_tap()?,
        };
        self.host.route(&tap, guest, setup).map_err(host_err)?;
        taps.claimed.push(tap.clone());
        Ok(Some(Nic {
            backend: NicBackend::Tap(tap),
            mac: address::mac_for(guest),
        }))
    }

    /// Undoes [`attach`](Self::attach): the route goes, the tap returns to
    /// the pool (or is deleted when the pool is full). Idempotent.
    pub fn detach(&self, tap: Option<&str>, ip: Option<&str>) {
        if let Some(ip) = ip.and_then(|ip| ip.parse().ok()) {
            if let Err(e) = self.host.unroute(&self.instance, ip) {
                tracing::warn!(%ip, error = %e, "could not remove the VM's route");
            }
        }
        let Some(tap) = tap else { return };
        let mut taps = self.lock();
        taps.claimed.retain(|t| t != tap);
        let spare = self
            .spares(&taps)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t != tap)
            .count();
        if spare >= self.pool {
            if let Err(e) = self.host.delete_tap(tap) {
                tracing::warn!(tap, error = %e, "could not delete a tap");
            }
        }
    }

    /// Tops the pool of spare taps up. Off the boot path.
    pub fn refill(&self) {
        let Ok(Some(setup)) = self.ready() else {
            return;
        };
        let mut taps = self.lock();
        if self.ensure_host(setup, &mut taps).is_err() {
            return;
        }
        let mut spare = self.spares(&taps).map(|s| s.len()).unwrap_or(self.pool);
        while spare < self.pool {
            if let Err(e) = self.new_tap() {
                tracing::warn!(error = %e, "could not add a tap to the pool");
                return;
            }
            spare += 1;
        }
    }

    /// After a daemon restart: the host side is re-applied, running VMs keep
    /// their tap and route, dead VMs' routes go, and spare taps beyond the
    /// pool are deleted. Only this instance's objects are looked at.
    pub fn reconcile(&self) -> OpResult<()> {
        let Some(setup) = self.ready()? else {
            return Ok(());
        };
        {
            let mut taps = self.lock();
            taps.ready = false;
            self.ensure_host(setup, &mut taps)?;
            let runtimes = self.store.list_runtimes()?;
            for vm in self.store.list_vms()? {
                let Some(ip) = vm.ip.as_deref().and_then(|ip| ip.parse().ok()) else {
                    continue;
                };
                match runtimes
                    .iter()
                    .find(|r| r.name == vm.name)
                    .and_then(|r| r.tap.clone())
                {
                    Some(tap) => self.host.route(&tap, ip, setup).map_err(host_err)?,
                    None => self.host.unroute(&self.instance, ip).map_err(host_err)?,
                }
            }
            for tap in self.spares(&taps)?.iter().skip(self.pool) {
                self.host.delete_tap(tap).map_err(host_err)?;
            }
        }
        self.refill();
        Ok(())
    }

    /// At a clean daemon exit with no VMs left: the instance's host objects
    /// (gateway device, spare taps, nft table) go, so a state directory
    /// thrown away afterwards leaves nothing on the host. With VMs the
    /// objects stay: running ones keep their network, and the next daemon
    /// takes them back. The next start sets the instance up again.
    pub fn release_if_idle(&self) {
        let State::Ready(setup) = &self.state else {
            return;
        };
        match self.store.list_vms() {
            Ok(vms) if vms.is_empty() => {}
            _ => return,
        }
        let mut taps = self.lock();
        match self.host.teardown(&setup.instance) {
            Ok(()) => {
                taps.ready = false;
                tracing::info!(instance = %setup.instance, "no VMs left: removed this instance's host network");
            }
            Err(e) => tracing::warn!(error = %e, "could not remove the host network at exit"),
        }
    }

    /// Starts the DNS server at the gateway, on the current tokio runtime.
    pub fn start_dns(&self) -> OpResult<()> {
        let Some(setup) = self.ready()? else {
            return Ok(());
        };
        let gateway = setup.subnet.gateway();
        let addr = std::net::SocketAddr::new(gateway.into(), setup.dns_port);
        let socket = std::net::UdpSocket::bind(addr)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|e| OpError::internal(format!("DNS server on {addr}: {e}")))?;
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| OpError::internal(format!("DNS server: {e}")))?;
        let _enter = handle.enter();
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        let store = self.store.clone();
        let lookup: dns::Lookup = Arc::new(move |label| {
            if label == "host" {
                return Some(gateway);
            }
            let vm = store.get_vm(label).ok()??;
            store.get_runtime(label).ok()??;
            vm.ip?.parse().ok()
        });
        let upstreams = dns::upstreams(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            gateway,
        );
        let tcp = std::net::TcpListener::bind(addr)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .map_err(|e| OpError::internal(format!("DNS server on {addr} (TCP): {e}")))?;
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        tracing::info!(%addr, domain = %self.domain, "DNS server listening (UDP and TCP)");
        handle.spawn(dns::serve_tcp(
            tcp,
            self.domain.clone(),
            lookup.clone(),
            upstreams.clone(),
        ));
        handle.spawn(dns::serve(socket, self.domain.clone(), lookup, upstreams));
        Ok(())
    }
}

fn parse_ip(ip: &str) -> OpResult<Ipv4Addr> {
    ip.parse()
        .map_err(|_| OpError::internal(format!("stored address `{ip}` is not IPv4")))
}

fn host_err(e: banger_host::HostError) -> OpError {
    OpError::internal(format!("VM networking: {e}"))
}

/// The lowest-numbered tap name of `instance` not taken.
fn next_tap(instance: &Instance, existing: &[String]) -> String {
    (0..)
        .map(|n| instance.tap(n))
        .find(|t| !existing.contains(t))
        .expect("unbounded")
}

fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    getrandom::fill(&mut buf).expect("the OS provides randomness");
    u32::from_le_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_host::FakeHostNetwork;

    fn service(net: &FakeHostNetwork, subnet: &str) -> NetworkService {
        let config: Config = toml::from_str(&format!(
            "[network]\nmode = \"tap\"\nsubnet = \"{subnet}\"\ntap_pool = 1\n"
        ))
        .unwrap();
        let store = Arc::new(Store::open_in_memory().unwrap());
        NetworkService::new(&config, Arc::new(net.clone()), true, store)
    }

    fn service_in(mode: &str, privileged: bool) -> (NetworkService, FakeHostNetwork) {
        let host = FakeHostNetwork::default();
        let config: Config = toml::from_str(&format!(
            "[network]\nmode = \"{mode}\"\nsubnet = \"10.250.9.0/24\"\n"
        ))
        .unwrap();
        let store = Arc::new(Store::open_in_memory().unwrap());
        let svc = NetworkService::new(&config, Arc::new(host.clone()), privileged, store);
        (svc, host)
    }

    #[test]
    fn auto_is_user_mode_without_privilege_and_user_mode_touches_no_host_object() {
        let (svc, host) = service_in("auto", false);
        assert_eq!(svc.mode(), Some(NetworkMode::User));
        assert_eq!(svc.allocate().unwrap(), None, "no subnet address");
        let nic = svc.attach(None).unwrap().unwrap();
        assert_eq!(nic.backend, NicBackend::User);
        let guest = svc.guest(None).unwrap().unwrap();
        assert_eq!(
            (guest.address, guest.gateway, guest.nameserver),
            (
                USER_GUEST,
                Ipv4Addr::new(10, 0, 2, 2),
                Ipv4Addr::new(10, 0, 2, 3)
            )
        );
        svc.reconcile().unwrap();
        svc.refill();
        svc.detach(None, None);
        assert!(host.calls().is_empty(), "{:?}", host.calls());
        assert_eq!(svc.dns_addr(), None);
        assert!(svc.describe().unwrap().contains("no VM-to-VM"));
        let refused = svc
            .check_vmm(banger_proto::domain::VmmKind::Firecracker)
            .unwrap_err();
        assert!(
            refused.message.contains("sudo banger system install"),
            "{}",
            refused.message
        );
        svc.check_vmm(banger_proto::domain::VmmKind::Qemu).unwrap();
    }

    #[test]
    fn modes_by_name_and_the_old_word_tap() {
        for (word, privileged, want) in [
            ("auto", true, Some(NetworkMode::Bridged)),
            ("bridged", true, Some(NetworkMode::Bridged)),
            ("tap", true, Some(NetworkMode::Bridged)),
            ("user", true, Some(NetworkMode::User)),
            ("none", true, None),
        ] {
            // `auto` also needs /dev/net/tun for taps.
            if word == "auto" && !std::path::Path::new(TUN_DEVICE).exists() {
                continue;
            }
            assert_eq!(service_in(word, privileged).0.mode(), want, "{word}");
        }
        let (broken, _) = service_in("slirp", true);
        assert!(broken
            .describe()
            .unwrap_err()
            .to_string()
            .contains("auto, bridged, user, none"));
    }

    #[test]
    fn an_idle_instance_is_removed_at_exit_and_one_with_vms_is_kept() {
        let host = FakeHostNetwork::default();
        let svc = service(&host, "10.250.4.0/24");
        svc.reconcile().unwrap();
        assert!(!host.taps(&svc.instance).unwrap().is_empty(), "the pool");
        svc.store
            .insert_vm(&crate::store::VmRecord {
                name: "keep".into(),
                image: "bb".into(),
                kernel: "k".into(),
                vmm: banger_proto::domain::VmmKind::Qemu,
                vcpus: 1,
                memory_mib: 256,
                disk_bytes: 1 << 30,
                root_mode: banger_proto::domain::RootMode::Overlay,
                dir: "/nonexistent/keep".into(),
                host_key_pub: String::new(),
                created_at: "2026-12-01T00:00:00Z".into(),
                ip: Some("10.250.4.2".into()),
                origin: None,
                restore_from: None,
                cpu_quota: None,
            })
            .unwrap();
        svc.release_if_idle();
        assert!(!host
            .calls()
            .iter()
            .any(|c| matches!(c, NetCall::Teardown(_))));
        svc.store.delete_vm("keep").unwrap();
        svc.release_if_idle();
        assert!(host
            .calls()
            .contains(&NetCall::Teardown(svc.instance.clone())));
        assert!(host.taps(&svc.instance).unwrap().is_empty());
        // User mode and no network have nothing on the host to remove.
        let (user, host) = service_in("user", false);
        user.release_if_idle();
        assert!(host.calls().is_empty());
    }

    #[test]
    fn two_instances_on_one_host_keep_to_their_own_taps() {
        let host = FakeHostNetwork::default();
        let a = service(&host, "10.250.1.0/24");
        let b = service(&host, "10.250.2.0/24");
        assert_ne!(a.instance, b.instance);
        a.reconcile().unwrap();
        let nic = a.attach(Some("10.250.1.2")).unwrap().unwrap();
        let tap = nic.tap().unwrap().to_string();
        assert!(a.instance.owns_tap(&tap), "{tap}");
        let a_taps = host.taps(&a.instance).unwrap();
        // B starting up, filling its pool and trimming spares leaves A's
        // in-use and spare taps alone, and hands out none of them.
        b.reconcile().unwrap();
        let other = b.attach(Some("10.250.2.2")).unwrap().unwrap();
        let other = other.tap().unwrap();
        assert!(b.instance.owns_tap(other), "{other}");
        b.detach(Some(other), Some("10.250.2.2"));
        b.reconcile().unwrap();
        assert_eq!(host.taps(&a.instance).unwrap(), a_taps);
        assert!(host
            .routes()
            .contains(&(tap.clone(), "10.250.1.2".parse().unwrap())));
        // B deleted none of A's taps along the way.
        let calls = host.calls();
        assert!(!calls
            .iter()
            .any(|c| matches!(c, NetCall::DeleteTap(t) if a.instance.owns_tap(t))));
    }

    #[test]
    fn a_spare_tap_held_open_by_an_unknown_process_is_never_handed_out() {
        let host = FakeHostNetwork::default();
        let a = service(&host, "10.250.3.0/24");
        a.reconcile().unwrap();
        let spare = host.taps(&a.instance).unwrap();
        assert_eq!(spare.len(), 1, "the pool");
        host.set_busy(&spare[0], true);
        let nic = a.attach(Some("10.250.3.2")).unwrap().unwrap();
        assert_ne!(nic.tap().unwrap(), spare[0]);
        // Nor is it trimmed as a spare: whoever holds it keeps it.
        a.reconcile().unwrap();
        assert!(host.taps(&a.instance).unwrap().contains(&spare[0]));
    }

    /// The owner file holds the instance id and is named in the setup; a
    /// path no interface alias can hold, or user mode, names none and
    /// fails nothing.
    #[test]
    fn the_owner_file_names_the_instance_on_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("network.instance");
        let net = FakeHostNetwork::default();
        let svc = service(&net, "10.250.8.0/24").with_owner_file(file.clone());
        svc.reconcile().unwrap();
        let owners: Vec<_> = net
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                NetCall::Setup(s) => Some((s.instance.to_string(), s.owner)),
                _ => None,
            })
            .collect();
        let id = std::fs::read_to_string(&file).unwrap();
        assert_eq!(owners, [(id.trim().to_string(), Some(file))]);

        let long = dir.path().join("x".repeat(250));
        let net = FakeHostNetwork::default();
        let svc = service(&net, "10.250.8.0/24").with_owner_file(long.clone());
        svc.reconcile().unwrap();
        assert!(matches!(&net.calls()[0], NetCall::Setup(s) if s.owner.is_none()));
        assert!(!long.exists());
        let (user, _) = service_in("user", false);
        let quiet = dir.path().join("user-mode");
        drop(user.with_owner_file(quiet.clone()));
        assert!(!quiet.exists(), "no host objects, nothing to own");
    }

    /// A state directory copied from one in use carries its instance id:
    /// it takes a fresh one (and a subnet of its own) at start, and leaves
    /// the other's objects alone (red team round 3, item 15). Its own
    /// directory, or a gone one, keeps the id.
    #[test]
    fn a_copied_state_directory_takes_a_fresh_instance() {
        let dir = tempfile::tempdir().unwrap();
        let (original, copy) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&original).unwrap();
        std::fs::create_dir_all(&copy).unwrap();
        let net = FakeHostNetwork::default();
        let store = Arc::new(Store::open_in_memory().unwrap());
        let config: Config = toml::from_str("[network]\nmode = \"tap\"\ntap_pool = 1\n").unwrap();
        let first = NetworkService::new(&config, Arc::new(net.clone()), true, store.clone())
            .with_owner_file(original.join("network.instance"));
        let id = first.instance.clone();
        net.owned_by(&id, &original.join("network.instance"));
        // The same directory again: the same id.
        let again = NetworkService::new(&config, Arc::new(net.clone()), true, store.clone())
            .with_owner_file(original.join("network.instance"));
        assert_eq!(again.instance, id);
        // A copy: the same store's id, the original's owner file live.
        std::fs::copy(
            original.join("network.instance"),
            copy.join("network.instance"),
        )
        .unwrap();
        let copied = NetworkService::new(&config, Arc::new(net.clone()), true, store.clone())
            .with_owner_file(copy.join("network.instance"));
        assert_ne!(copied.instance, id);
        assert_eq!(
            std::fs::read_to_string(copy.join("network.instance"))
                .unwrap()
                .trim(),
            copied.instance.id()
        );
        assert_eq!(
            store.setting(INSTANCE_KEY).unwrap().as_deref(),
            Some(copied.instance.id())
        );
        assert!(matches!(&copied.state, State::Ready(s) if s.instance == copied.instance));
        assert!(net.calls().is_empty(), "nothing of the original's touched");
        // The original's owner file gone: its id is an orphan's, kept.
        let net2 = FakeHostNetwork::default();
        let store2 = Arc::new(Store::open_in_memory().unwrap());
        let lone = NetworkService::new(&config, Arc::new(net2.clone()), true, store2);
        let lone_id = lone.instance.clone();
        net2.owned_by(&lone_id, &dir.path().join("gone/network.instance"));
        let lone = lone.with_owner_file(copy.join("network.instance"));
        assert_eq!(lone.instance, lone_id);
    }
}
