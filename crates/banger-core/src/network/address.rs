//! Choosing banger's subnet so it never shadows a route the host already
//! has, handing each VM a stable address, and deriving its MAC from it.

use std::net::Ipv4Addr;

use banger_host::net::foreign_overlap;
use banger_host::{HostRoute, Instance, Subnet};

/// Tried in order when the config names no subnet: ten /16s in 10/8, two in
/// 172.16/12 and four /24s in 192.168/16, enough for several banger
/// instances beside the host's own networks.
fn candidates() -> Vec<Subnet> {
    let v = |a, b, c, prefix| Subnet {
        addr: Ipv4Addr::new(a, b, c, 0),
        prefix,
    };
    (213..=222)
        .map(|b| v(10, b, 0, 16))
        .chain([v(172, 30, 0, 16), v(172, 31, 0, 16)])
        .chain((213..=216).map(|c| v(192, 168, c, 24)))
        .collect()
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

/// The configured subnet, refused when it overlaps a route that is not this
/// instance's own; otherwise the first candidate clear of every host route
/// (other banger instances' included).
pub fn choose_subnet(
    configured: Option<&str>,
    routes: &[HostRoute],
    instance: &Instance,
) -> Result<Subnet, super::NetError> {
    let foreign = |s: &Subnet| foreign_overlap(s, instance, routes);
    if let Some(text) = configured {
        let subnet = Subnet::parse(text)?;
        return match foreign(&subnet) {
            Some(r) => Err(format!(
                "network.subnet {subnet} overlaps the host's route {} on {}; pick another \
                 subnet in the config file",
                r.subnet, r.device
            )
            .into()),
            None => Ok(subnet),
        };
    }
    candidates()
        .into_iter()
        .find(|s| foreign(s).is_none())
        .ok_or_else(|| {
            "every default subnet (10.213-222.0.0/16, 172.30-31.0.0/16, 192.168.213-216.0/24) \
             overlaps a host route; set network.subnet in the config file"
                .to_string()
        })
        .map_err(Into::into)
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
bg0a1b2cgw\t0000D60A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
bgffffffgw\t00001EAC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";

    #[test]
    fn host_routes_are_read_and_defaults_skipped() {
        let routes = parse_proc_routes(ROUTES);
        assert_eq!(routes.len(), 4);
        assert_eq!(routes[0].subnet, Subnet::parse("192.0.2.0/24").unwrap());
        assert_eq!(routes[1].device, "docker0");
        assert_eq!(routes[1].subnet, Subnet::parse("10.213.0.0/16").unwrap());
    }

    #[test]
    fn subnet_avoids_foreign_routes_but_not_its_own() {
        let routes = parse_proc_routes(ROUTES);
        let me = Instance::parse("0a1b2c").unwrap();
        // 10.213/16 is docker's; 10.214/16 is on our gateway, so it is ours
        // to reuse; 172.30/16 is another banger instance's.
        assert_eq!(
            choose_subnet(None, &routes, &me).unwrap(),
            Subnet::parse("10.214.0.0/16").unwrap()
        );
        let other = Instance::parse("123456").unwrap();
        let everything_taken: Vec<HostRoute> = candidates()
            .into_iter()
            .filter(|s| s.addr != Ipv4Addr::new(10, 220, 0, 0))
            .map(|subnet| HostRoute {
                device: "bgffffffgw".into(),
                subnet,
            })
            .collect();
        assert_eq!(
            choose_subnet(None, &everything_taken, &other).unwrap(),
            Subnet::parse("10.220.0.0/16").unwrap(),
            "the one candidate no other instance has"
        );
        let err = choose_subnet(Some("10.213.4.0/24"), &routes, &me).unwrap_err();
        assert!(
            err.contains("docker0") && err.contains("network.subnet"),
            "{err}"
        );
        assert_eq!(
            choose_subnet(Some("10.99.0.0/24"), &routes, &me).unwrap(),
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
