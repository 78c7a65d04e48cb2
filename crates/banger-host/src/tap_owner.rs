//! Who may open a persistent tap. A jailed Firecracker opens its VM's tap
//! as the jail's own uid, so the tap is lent to that uid for the jail's
//! life and given back to the user (whose VMs share the tap pool) after.
//! Root only: attaching to a tap one does not own needs CAP_NET_ADMIN.

use std::os::fd::AsRawFd;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Makes `uid` the owner of the existing persistent tap `tap`; it stays
/// persistent (nothing here closes it for good).
pub fn set_owner(tap: &str, uid: u32) -> std::io::Result<()> {
    if tap.is_empty() || tap.len() >= libc::IFNAMSIZ || tap.contains('/') {
        return Err(std::io::Error::other(format!("`{tap}` is not a tap name")));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..tap.len()].copy_from_slice(tap.as_bytes());
    // A tap that is not there would be made by TUNSETIFF: refuse instead.
    if !std::path::Path::new("/sys/class/net").join(tap).exists() {
        return Err(std::io::Error::other(format!("there is no tap `{tap}`")));
    }
    // SAFETY: the tun ioctls on an open /dev/net/tun, with an ifreq of the
    // kernel's size and an integer argument.
    unsafe {
        if libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::ioctl(tun.as_raw_fd(), TUNSETOWNER, uid as libc::c_ulong) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The owner the kernel reports for a tap (`None`: none, or no such tap).
pub fn owner(tap: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{tap}/owner")).ok()?;
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .map(|n| n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A persistent tap changes hands and stays (root only: taps need
    /// CAP_NET_ADMIN); a tap that is not there is never made.
    #[test]
    fn a_tap_is_lent_and_given_back() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let tap = format!("bgto{}", std::process::id() % 100_000);
        let ip = |args: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("ip {args}"))
                .status()
                .unwrap()
                .success()
        };
        assert!(ip(&format!("tuntap add dev {tap} mode tap user 4251")));
        let lent = set_owner(&tap, 1_500_000_123).map(|()| owner(&tap));
        let back = set_owner(&tap, 4251).map(|()| owner(&tap));
        let persists = std::path::Path::new("/sys/class/net").join(&tap).exists();
        ip(&format!("tuntap del dev {tap} mode tap"));
        assert_eq!(lent.unwrap(), Some(1_500_000_123));
        assert_eq!(back.unwrap(), Some(4251));
        assert!(persists, "still there after its descriptor closed");
        assert!(set_owner("bgnosuchtap0", 1).is_err());
        assert!(!std::path::Path::new("/sys/class/net/bgnosuchtap0").exists());
    }
}
