//! Keeps the capture in step with the state: enrolled pods of this node are captured, others not.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use tracing::{info, warn};

use super::{
    Capture,
    route_table::RouteTable,
    routing::{self, RoutingError},
};
use crate::state::Snapshot;

/// Pods that should be captured but are not yet, with the reason (usually: veth not there yet).
pub type Pending = BTreeMap<Ipv4Addr, String>;

/// Applies `snapshot` to `capture`. Cheap when nothing changed: captured pods are only checked
/// for a changed interface index; pods not captured yet are looked up in `routes` (the node's
/// main table, read once per pass; if it could not be read, they stay pending with that reason).
pub fn reconcile(
    capture: &mut Capture,
    snapshot: &Snapshot,
    node: &str,
    pending: &mut Pending,
    routes: Result<&RouteTable, &RoutingError>,
) {
    let desired: BTreeSet<Ipv4Addr> = snapshot
        .workloads_on_node(node)
        .filter(|w| w.is_enrolled())
        .map(|w| w.ip)
        .collect();
    let current: Vec<(Ipv4Addr, String, u32)> = capture
        .enrolled()
        .map(|(ip, link)| (*ip, link.ifname.clone(), link.ifindex))
        .collect();
    let mut lookups_failed = false;
    for (ip, ifname, ifindex) in current {
        let moved = match routing::ifindex(&ifname) {
            Ok(now) => now != Some(ifindex),
            // Could not ask (out of file descriptors, say): the pod's capture stays as it is.
            // Removing it would let its traffic pass in plaintext; only the state, or a device
            // that is really gone, may take a pod's capture away.
            Err(e) => {
                lookups_failed = true;
                if capture.lookup_failed(e.to_string()) {
                    warn!(pod_ip = %ip, error = %e, "cannot check the pod's device; its capture stays; will retry");
                }
                false
            }
        };
        if (!desired.contains(&ip) || moved)
            && let Err(e) = capture.release(ip)
        {
            warn!(pod_ip = %ip, error = %e, "releasing pod from capture failed");
        }
    }
    if !lookups_failed && capture.lookups_work() {
        info!("device lookups work again");
    }
    pending.retain(|ip, _| desired.contains(ip));
    let captured: BTreeSet<Ipv4Addr> = capture.enrolled().map(|(ip, _)| *ip).collect();
    for ip in desired.difference(&captured) {
        let result = routes
            .map_err(|e| e.to_string())
            .and_then(|table| routing::pod_link(table, *ip).map_err(|e| e.to_string()))
            .and_then(|link| capture.enroll(*ip, link).map_err(|e| e.to_string()));
        match result {
            Ok(()) => {
                if pending.remove(ip).is_some() {
                    info!(pod_ip = %ip, "pending pod is now captured");
                }
            }
            Err(reason) => {
                if pending.get(ip) != Some(&reason) {
                    warn!(pod_ip = %ip, %reason, "cannot capture pod yet; will retry");
                }
                pending.insert(*ip, reason);
            }
        }
    }
}

/// The node's uplinks: the devices its routes to other nodes' pods go through (one pod per
/// other node, looked up in one read of the routing table). Pod veths of this node are never
/// among them. An error when a device could not be looked up: the caller keeps the uplinks it
/// has rather than detaching one it merely failed to ask about.
pub fn uplinks(
    table: &RouteTable,
    snapshot: &Snapshot,
    node: &str,
) -> Result<BTreeMap<String, u32>, RoutingError> {
    let mut failed = None;
    let found = uplinks_in(table, snapshot, node, |dev| match routing::ifindex(dev) {
        Ok(index) => index,
        Err(e) => {
            failed = Some(e);
            None
        }
    });
    match failed {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

fn uplinks_in(
    table: &RouteTable,
    snapshot: &Snapshot,
    node: &str,
    mut ifindex: impl FnMut(&str) -> Option<u32>,
) -> BTreeMap<String, u32> {
    let mut seen_nodes = BTreeSet::new();
    let mut uplinks = BTreeMap::new();
    for w in snapshot
        .workloads
        .iter()
        .filter(|w| w.node != node && w.owns_ip())
    {
        if !seen_nodes.insert(w.node.as_str()) {
            continue;
        }
        match table
            .device_for(w.ip)
            .and_then(|dev| Some((dev, ifindex(dev)?)))
        {
            Some((dev, index)) => {
                uplinks.insert(dev.to_string(), index);
            }
            None => tracing::debug!(node = %w.node, pod_ip = %w.ip, "no route to the node's pods"),
        }
    }
    uplinks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, ip: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: {node}}}\nstatus: {{podIP: \"{ip}\", phase: Running}}\n"
        )
    }

    #[test]
    fn uplinks_are_the_devices_towards_other_nodes() {
        let text = [
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n".to_string(),
            pod("a1", "node-a", "10.7.1.10"),
            pod("a2", "node-a", "10.7.1.11"),
            pod("b1", "node-b", "10.7.2.10"),
            pod("b2", "node-b", "10.7.2.11"),
            pod("c1", "node-c", "10.7.3.10"),
            pod("d1", "node-d", "10.7.4.10"),
        ]
        .concat();
        let snapshot = crate::source::local::testing::load_text(&text).expect("state loads");
        let table = RouteTable::parse(
            r#"[
                {"dst":"10.7.2.0/24","gateway":"192.168.7.2","dev":"eth0","flags":[]},
                {"dst":"10.7.3.0/24","gateway":"192.168.8.3","dev":"eth1","flags":[]},
                {"dst":"10.7.1.10","dev":"veth0a","scope":"link","flags":[]},
                {"dst":"10.7.1.11","dev":"veth0b","scope":"link","flags":[]}
            ]"#,
        )
        .expect("test routes parse");
        let index = |dev: &str| match dev {
            "eth0" => Some(2),
            "eth1" => Some(3),
            _ => None,
        };
        let uplinks = uplinks_in(&table, &snapshot, "node-a", index);
        // node-d has no route: no uplink for it; this node's own veths are never uplinks.
        assert_eq!(
            uplinks,
            BTreeMap::from([("eth0".to_string(), 2), ("eth1".to_string(), 3)])
        );
    }
}
