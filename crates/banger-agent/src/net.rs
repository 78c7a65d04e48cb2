//! The guest side of banger's network: loopback up, `eth0` with the VM's
//! /32 address, an on-link route to the gateway and a default route through
//! it, then the resolver. Plain ioctls: the agent carries no netlink stack.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use banger_proto::agent::GuestNetwork;

const DEVICE: &str = "eth0";

/// An AF_INET datagram socket, the handle the interface ioctls need.
struct Sock(libc::c_int);

impl Drop for Sock {
    fn drop(&mut self) {
        // SAFETY: closing the descriptor this struct owns.
        unsafe { libc::close(self.0) };
    }
}

fn sock() -> Result<Sock, String> {
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    Ok(Sock(fd))
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // it back as sockaddr_in because of sin_family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(s: &Sock, request: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    // SAFETY: `arg` is the structure this request expects.
    if unsafe { libc::ioctl(s.0, request as _, arg as *mut T) } < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn up(s: &Sock, name: &str) -> Result<(), String> {
    let mut req = ifreq(name);
    ioctl(s, libc::SIOCGIFFLAGS, &mut req, &format!("{name} flags"))?;
    // SAFETY: the flags member is the one SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(
        s,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("bringing {name} up"),
    )
}

fn add_route(
    s: &Sock,
    dst: Ipv4Addr,
    mask: Ipv4Addr,
    gateway: Option<Ipv4Addr>,
) -> Result<(), String> {
    // SAFETY: rtentry is plain data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(dst);
    rt.rt_genmask = sockaddr(mask);
    rt.rt_flags = libc::RTF_UP;
    match gateway {
        Some(gw) => {
            rt.rt_gateway = sockaddr(gw);
            rt.rt_flags |= libc::RTF_GATEWAY;
        }
        None => rt.rt_flags |= libc::RTF_HOST,
    }
    // Outlives the call, which is when the kernel reads it.
    let dev = std::ffi::CString::new(DEVICE).expect("no NUL");
    rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
    match ioctl(s, libc::SIOCADDRT, &mut rt, &format!("route to {dst}")) {
        Err(e) if e.contains("File exists") => Ok(()),
        other => other,
    }
}

/// Brings up `lo` alone (a VM without networking).
pub fn loopback_up() -> Result<(), String> {
    up(&sock()?, "lo")
}

/// Configures the interfaces. Runs before the root switch.
pub fn configure(net: &GuestNetwork) -> Result<(), String> {
    let s = sock()?;
    up(&s, "lo")?;
    // virtio_net may still be probing right after the module loads.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::path::Path::new("/sys/class/net").join(DEVICE).exists() {
        if Instant::now() > deadline {
            return Err(format!("no {DEVICE}: the VM has no network device"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut req = ifreq(DEVICE);
    req.ifr_ifru.ifru_addr = sockaddr(net.address);
    ioctl(&s, libc::SIOCSIFADDR, &mut req, "setting the address")?;
    let mut req = ifreq(DEVICE);
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::BROADCAST);
    ioctl(&s, libc::SIOCSIFNETMASK, &mut req, "setting the netmask")?;
    up(&s, DEVICE)?;
    add_route(&s, net.gateway, Ipv4Addr::BROADCAST, None)?;
    add_route(
        &s,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Some(net.gateway),
    )
}

/// A restored VM's new address (and MAC): `eth0` goes down, which drops its
/// routes and its neighbours (the old gateway's tap among them), takes the
/// new MAC, and comes back up configured as at boot.
pub fn readdress(net: &GuestNetwork, mac: Option<&str>) -> Result<(), String> {
    let s = sock()?;
    let wanted_mac = mac
        .map(|m| parse_mac(m).ok_or_else(|| format!("bad MAC address {m}")))
        .transpose()?;
    // The source VM resuming after its own snapshot keeps its address: its
    // connections are not bounced for nothing.
    if current(&s)? == (Some(net.address), wanted_mac.or(current_mac(&s))) {
        return Ok(());
    }
    let mut req = ifreq(DEVICE);
    ioctl(&s, libc::SIOCGIFFLAGS, &mut req, "eth0 flags")?;
    // SAFETY: the flags member is the one SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short) };
    ioctl(&s, libc::SIOCSIFFLAGS, &mut req, "taking eth0 down")?;
    if let Some(octets) = wanted_mac {
        let mut req = ifreq(DEVICE);
        // SAFETY: a hardware address in the union member SIOCSIFHWADDR reads.
        unsafe {
            req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(octets) {
                *dst = src as libc::c_char;
            }
        }
        ioctl(&s, libc::SIOCSIFHWADDR, &mut req, "setting the MAC address")?;
    }
    configure(net)
}

/// `eth0`'s address and MAC now.
fn current(s: &Sock) -> Result<(Option<Ipv4Addr>, Option<[u8; 6]>), String> {
    let mut req = ifreq(DEVICE);
    let address = match ioctl(s, libc::SIOCGIFADDR, &mut req, "eth0 address") {
        // SAFETY: SIOCGIFADDR filled in an AF_INET address.
        Ok(()) => Some(unsafe {
            let sin: libc::sockaddr_in = std::mem::transmute(req.ifr_ifru.ifru_addr);
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
        }),
        Err(_) => None,
    };
    Ok((address, current_mac(s)))
}

fn current_mac(s: &Sock) -> Option<[u8; 6]> {
    let mut req = ifreq(DEVICE);
    ioctl(s, libc::SIOCGIFHWADDR, &mut req, "eth0 MAC").ok()?;
    let mut out = [0u8; 6];
    // SAFETY: SIOCGIFHWADDR filled in the hardware address.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    for (dst, src) in out.iter_mut().zip(data) {
        *dst = src as u8;
    }
    Some(out)
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut out {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Writes `/etc/resolv.conf` on the root disk (after the switch). A symlink
/// (to a resolver stub the image will not run) is replaced by a file.
pub fn write_resolv_conf(net: &GuestNetwork) -> Result<(), String> {
    let mut text = format!("nameserver {}\n", net.nameserver);
    if let Some(search) = &net.search {
        text.push_str(&format!("search {search}\n"));
    }
    let path = std::path::Path::new("/etc/resolv.conf");
    if path.is_symlink() {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::create_dir_all("/etc");
    std::fs::write(path, text).map_err(|e| format!("writing /etc/resolv.conf: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_or_refuse() {
        assert_eq!(parse_mac("06:00:0a:d5:00:07"), Some([6, 0, 10, 0xd5, 0, 7]));
        assert_eq!(parse_mac("06:00:0a:d5:00"), None);
        assert_eq!(parse_mac("06:00:0a:d5:00:07:08"), None);
        assert_eq!(parse_mac("zz:00:0a:d5:00:07"), None);
    }
}
