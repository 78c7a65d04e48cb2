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
