//! The node's main routing table read once, for longest-prefix lookups of many addresses
//! without one `ip route get` (one process) per address.

use std::net::Ipv4Addr;

use super::routing::{self, RoutingError};

/// Unicast IPv4 routes of the main table that leave through a device.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteTable {
    routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    /// Masked network.
    network: u32,
    prefix: u8,
    device: String,
    /// Through a next hop rather than directly connected.
    via_gateway: bool,
}

impl RouteTable {
    /// `ip -json -4 route show table main`.
    pub fn read() -> Result<RouteTable, RoutingError> {
        let args = ["-json", "-4", "route", "show", "table", "main"];
        let out = routing::ip(&args)?;
        RouteTable::parse(&out).map_err(|reason| RoutingError::Output {
            args: args.join(" "),
            reason,
        })
    }

    /// A table from `ip -json route show` output.
    pub(super) fn parse(json: &str) -> Result<RouteTable, String> {
        let entries: Vec<serde_json::Value> =
            serde_json::from_str(json).map_err(|e| e.to_string())?;
        let mut routes = Vec::new();
        for entry in &entries {
            let unicast = entry
                .get("type")
                .and_then(|t| t.as_str())
                .is_none_or(|t| t == "unicast");
            let (Some(dst), Some(dev)) = (
                entry.get("dst").and_then(|d| d.as_str()),
                entry.get("dev").and_then(|d| d.as_str()),
            ) else {
                continue;
            };
            if !unicast {
                continue;
            }
            let (network, prefix) = parse_destination(dst)?;
            routes.push(Route {
                network,
                prefix,
                device: dev.to_string(),
                via_gateway: entry.get("gateway").is_some(),
            });
        }
        Ok(RouteTable { routes })
    }

    /// The most specific route for `ip`, unless it leaves through `lo`.
    fn route_for(&self, ip: Ipv4Addr) -> Option<&Route> {
        let ip = u32::from(ip);
        self.routes
            .iter()
            .filter(|route| ip & mask(route.prefix) == route.network)
            .max_by_key(|route| route.prefix)
            .filter(|route| route.device != "lo")
    }

    /// The device the most specific route for `ip` leaves through; never `lo`.
    pub fn device_for(&self, ip: Ipv4Addr) -> Option<&str> {
        self.route_for(ip).map(|route| route.device.as_str())
    }

    /// The device `ip` is directly connected through (no next hop; never `lo`): a pod's veth,
    /// as a routed CNI installs `<podIP>/32 dev <veth> scope link`.
    pub fn link_for(&self, ip: Ipv4Addr) -> Option<&str> {
        self.route_for(ip)
            .filter(|route| !route.via_gateway)
            .map(|route| route.device.as_str())
    }
}

fn mask(len: u8) -> u32 {
    match len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

/// `default`, `a.b.c.d` (a host route) or `a.b.c.d/n`, as (masked network, length).
fn parse_destination(dst: &str) -> Result<(u32, u8), String> {
    if dst == "default" {
        return Ok((0, 0));
    }
    let (address, len) = match dst.split_once('/') {
        Some((address, len)) => {
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= 32)
                .ok_or_else(|| format!("bad prefix length in route destination {dst:?}"))?;
            (address, len)
        }
        None => (dst, 32),
    };
    let address: Ipv4Addr = address
        .parse()
        .map_err(|_| format!("bad route destination {dst:?}"))?;
    Ok((u32::from(address) & mask(len), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = r#"[
        {"dst":"default","gateway":"192.168.7.254","dev":"eth1","flags":[]},
        {"dst":"10.7.0.0/16","gateway":"192.168.7.9","dev":"eth2","flags":[]},
        {"dst":"10.7.2.0/24","gateway":"192.168.7.2","dev":"eth0","flags":[]},
        {"dst":"10.7.1.10","dev":"veth1a2b3c4d","scope":"link","flags":[]},
        {"type":"blackhole","dst":"10.7.3.0/24","flags":[]},
        {"type":"unreachable","dst":"10.7.4.0/24","dev":"lo","flags":[]},
        {"dst":"192.168.7.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"192.168.7.1","flags":[]}
    ]"#;

    #[test]
    fn most_specific_route_wins() {
        let table = RouteTable::parse(NODE).expect("parses");
        let dev = |ip: [u8; 4]| table.device_for(Ipv4Addr::from(ip));
        assert_eq!(dev([10, 7, 2, 10]), Some("eth0"));
        assert_eq!(dev([10, 7, 1, 10]), Some("veth1a2b3c4d"));
        assert_eq!(dev([10, 7, 1, 11]), Some("eth2"));
        assert_eq!(
            dev([10, 7, 3, 10]),
            Some("eth2"),
            "blackhole routes are skipped"
        );
        assert_eq!(dev([192, 168, 7, 2]), Some("eth0"));
        assert_eq!(dev([8, 8, 8, 8]), Some("eth1"));
    }

    #[test]
    fn a_link_is_a_route_without_a_next_hop() {
        let table = RouteTable::parse(NODE).expect("parses");
        let link = |ip: [u8; 4]| table.link_for(Ipv4Addr::from(ip));
        assert_eq!(link([10, 7, 1, 10]), Some("veth1a2b3c4d"));
        assert_eq!(link([192, 168, 7, 2]), Some("eth0"));
        assert_eq!(link([10, 7, 1, 11]), None, "through a gateway");
        assert_eq!(link([8, 8, 8, 8]), None, "the default route");
        assert_eq!(link([10, 7, 4, 1]), None, "unreachable");
    }

    #[test]
    fn no_route_or_loopback_is_none() {
        let table = RouteTable::parse(
            r#"[{"dst":"10.7.2.0/24","dev":"eth0","flags":[]},{"dst":"10.7.9.0/24","dev":"lo","flags":[]}]"#,
        )
        .expect("parses");
        assert_eq!(table.device_for(Ipv4Addr::new(10, 8, 0, 1)), None);
        assert_eq!(table.device_for(Ipv4Addr::new(10, 7, 9, 1)), None);
    }

    #[test]
    fn bad_output_is_an_error() {
        assert!(RouteTable::parse("not json").is_err());
        assert!(RouteTable::parse(r#"[{"dst":"10.7.0.0/40","dev":"eth0"}]"#).is_err());
        assert!(RouteTable::parse(r#"[{"dst":"ten","dev":"eth0"}]"#).is_err());
    }

    #[test]
    fn masks() {
        assert_eq!(mask(0), 0);
        assert_eq!(mask(24), 0xffff_ff00);
        assert_eq!(mask(32), u32::MAX);
    }
}
