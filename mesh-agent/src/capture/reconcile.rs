//! Keeps the capture in step with the state: enrolled pods of this node are captured, others not.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use tracing::{info, warn};

use super::{Capture, routing};
use crate::state::Snapshot;

/// Pods that should be captured but are not yet, with the reason (usually: veth not there yet).
pub type Pending = BTreeMap<Ipv4Addr, String>;

/// Applies `snapshot` to `capture`. Cheap when nothing changed: captured pods are only checked
/// for a changed interface index; route lookups happen for pods not captured yet.
pub fn reconcile(capture: &mut Capture, snapshot: &Snapshot, node: &str, pending: &mut Pending) {
    let desired: BTreeSet<Ipv4Addr> = snapshot
        .workloads_on_node(node)
        .filter(|w| w.is_enrolled())
        .map(|w| w.ip)
        .collect();
    let current: Vec<(Ipv4Addr, String, u32)> = capture
        .enrolled()
        .map(|(ip, link)| (*ip, link.ifname.clone(), link.ifindex))
        .collect();
    for (ip, ifname, ifindex) in current {
        let moved = routing::ifindex(&ifname) != Some(ifindex);
        if (!desired.contains(&ip) || moved)
            && let Err(e) = capture.release(ip)
        {
            warn!(pod_ip = %ip, error = %e, "releasing pod from capture failed");
        }
    }
    pending.retain(|ip, _| desired.contains(ip));
    let captured: BTreeSet<Ipv4Addr> = capture.enrolled().map(|(ip, _)| *ip).collect();
    for ip in desired.difference(&captured) {
        let result = routing::pod_link(*ip)
            .map_err(|e| e.to_string())
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

/// The node's uplinks: the devices its routes to other nodes' pods go through (one route
/// lookup per other node). Pod veths of this node are never among them.
pub fn uplinks(snapshot: &Snapshot, node: &str) -> BTreeMap<String, u32> {
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
        match routing::route_device(w.ip) {
            Ok(Some((name, ifindex))) => {
                uplinks.insert(name, ifindex);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(node = %w.node, error = %e, "no route to the node's pods"),
        }
    }
    uplinks
}
