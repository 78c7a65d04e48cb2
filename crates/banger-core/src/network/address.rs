//! Choosing banger's subnet so it never shadows a route the host already
//! has, handing each VM a stable address, and deriving its MAC from it.

use std::net::Ipv4Addr;

use banger_host::net::{GATEWAY_DEV, TAP_PREFIX};
use banger_host::Subnet;

/// Tried in order when the config names no subnet.
const CANDIDATES: &[&str] = &[
    "10.213.0.0/16",
    "10.214.0.0/16",
    "172.30.0.0/16",
    "192.168.213.0/24",
];

/// A route the host has: the device and the network it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub device: String,
    pub subnet: Subnet,
}

/// Routes from `/proc/net/route` (addresses are little-endian hex), skipping
/// default routes, which overlap everything by design.
pub fn parse_proc_routes(text: &str) -> Vec<HostRoute> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?.swap_bytes();
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?.swap_bytes();
            let prefix = mask.leading_ones() as u8;
            (prefix > 0).then(|| HostRoute {
                device: f[0].to_string(),
                subnet: Subnet {
                    addr: Ipv4Addr::from(dest),
                    prefix,
                },
            })
        })
        .collect()
}

fn banger_device(dev: &str) -> bool {
    dev == GATEWAY_DEV || dev.starts_with(TAP_PREFIX)
}

/// The configured subnet, refused when it overlaps a route that is not
/// banger's own; otherwise the first candidate clear of every host route.
pub fn choose_subnet(configured: Option<&str>, routes: &[HostRoute]) -> Result<Subnet, String> {
    let foreign = |s: &Subnet| {
        routes
            .iter()
            .find(|r| !banger_device(&r.device) && r.subnet.overlaps(s))
    };
    if let Some(text) = configured {
        let subnet = Subnet::parse(text)?;
        return match foreign(&subnet) {
            Some(r) => Err(format!(
                "network.subnet {subnet} overlaps the host's route {} on {}; pick another \
                 subnet in the config file",
                r.subnet, r.device
            )),
            None => Ok(subnet),
        };
    }
    CANDIDATES
        .iter()
        .map(|c| Subnet::parse(c).expect("valid candidate"))
        .find(|s| foreign(s).is_none())
        .ok_or_else(|| {
            format!(
                "every default subnet ({}) overlaps a host route; set network.subnet in the config file",
                CANDIDATES.join(", ")
            )
        })
}

/// The lowest guest address not in `used`.
pub fn allocate(subnet: &Subnet, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    subnet
        .guest_hosts()
        .map(|n| subnet.host(n))
        .find(|ip| !used.contains(ip))
}

/// A locally administered unicast MAC that embeds the guest address, so it
/// is unique whenever the address is.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str =
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
docker0\t0000D50A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
banger0\t0000D60A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";

    #[test]
    fn host_routes_are_read_and_defaults_skipped() {
        let routes = parse_proc_routes(ROUTES);
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[0].subnet, Subnet::parse("192.0.2.0/24").unwrap());
        assert_eq!(routes[1].device, "docker0");
        assert_eq!(routes[1].subnet, Subnet::parse("10.213.0.0/16").unwrap());
    }

    #[test]
    fn subnet_avoids_foreign_routes_but_not_its_own() {
        let routes = parse_proc_routes(ROUTES);
        // 10.213/16 is docker's; 10.214/16 is on banger0, so it is ours to reuse.
        assert_eq!(
            choose_subnet(None, &routes).unwrap(),
            Subnet::parse("10.214.0.0/16").unwrap()
        );
        let err = choose_subnet(Some("10.213.4.0/24"), &routes).unwrap_err();
        assert!(
            err.contains("docker0") && err.contains("network.subnet"),
            "{err}"
        );
        assert_eq!(
            choose_subnet(Some("10.99.0.0/24"), &routes).unwrap(),
            Subnet::parse("10.99.0.0/24").unwrap()
        );
    }

    #[test]
    fn addresses_are_allocated_lowest_first_and_run_out() {
        let subnet = Subnet::parse("10.9.0.0/29").unwrap();
        let mut used = vec![];
        while let Some(ip) = allocate(&subnet, &used) {
            used.push(ip);
        }
        assert_eq!(used.first(), Some(&Ipv4Addr::new(10, 9, 0, 2)));
        assert_eq!(used.last(), Some(&Ipv4Addr::new(10, 9, 0, 6)));
        used.remove(1);
        assert_eq!(allocate(&subnet, &used), Some(Ipv4Addr::new(10, 9, 0, 3)));
        assert_eq!(mac_for(Ipv4Addr::new(10, 213, 0, 7)), "06:00:0a:d5:00:07");
    }
}
