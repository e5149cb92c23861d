//! Node routing the capture relies on: the policy route for marked packets, and finding a
//! pod's host-side veth from the route a CNI installs for the pod's IP.
//!
//! Uses iproute2 (`ip -json`), which every node has; the rules it adds are removed by
//! [`remove_capture_route`] on shutdown and by `mesh-agent cleanup`.

use std::{net::Ipv4Addr, process::Command};

use mesh_common::{CAPTURE_MARK, CAPTURE_MARK_MASK, CAPTURE_ROUTE_TABLE, CAPTURE_RULE_PRIORITY};

use super::route_table::RouteTable;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("running `ip {args}`: {source}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("`ip {args}` printed unexpected output: {reason}")]
    Output { args: String, reason: String },
    #[error("no route to pod {ip} through a local device (the pod's veth is not set up yet)")]
    NoLocalRoute { ip: Ipv4Addr },
    #[error("looking up device {ifname}: {source}")]
    DeviceLookup {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
}

/// A pod's host-side device, as found from the node's routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub ifname: String,
    pub ifindex: u32,
}

pub(super) fn ip(args: &[&str]) -> Result<String, RoutingError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| RoutingError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(RoutingError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rule_args(verb: &str) -> Vec<String> {
    vec![
        "rule".into(),
        verb.into(),
        "fwmark".into(),
        format!("{CAPTURE_MARK:#x}/{CAPTURE_MARK_MASK:#x}"),
        "lookup".into(),
        CAPTURE_ROUTE_TABLE.to_string(),
        "priority".into(),
        CAPTURE_RULE_PRIORITY.to_string(),
    ]
}

fn ip_owned(args: &[String]) -> Result<String, RoutingError> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ip(&refs)
}

/// Marked packets are delivered to the local stack, where `bpf_sk_assign` put their socket.
///
/// Idempotent without a gap: an agent taking over from another (or from a crashed one) finds
/// the rule and route in place, and removing them first would, for a moment, send captured
/// segments on to their real destination, which resets the connection.
pub fn install_capture_route() -> Result<(), RoutingError> {
    let table = CAPTURE_ROUTE_TABLE.to_string();
    ip(&[
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ])?;
    if !capture_rule_present()? {
        ip_owned(&rule_args("add"))?;
    }
    Ok(())
}

/// Whether the capture rule is in place (`ip -json rule show`).
fn capture_rule_present() -> Result<bool, RoutingError> {
    let rules = ip(&["-json", "rule", "show"])?;
    let parsed: Vec<serde_json::Value> =
        serde_json::from_str(&rules).map_err(|e| RoutingError::Output {
            args: "-json rule show".into(),
            reason: e.to_string(),
        })?;
    let hex = |v: u32| format!("{v:#x}");
    Ok(parsed.iter().any(|rule| {
        rule["priority"] == CAPTURE_RULE_PRIORITY
            && rule["fwmark"] == hex(CAPTURE_MARK).as_str()
            && rule["fwmask"] == hex(CAPTURE_MARK_MASK).as_str()
            && rule["table"] == CAPTURE_ROUTE_TABLE.to_string().as_str()
    }))
}

/// Removes the rule and flushes the table; succeeds when they are already gone.
pub fn remove_capture_route() -> Result<bool, RoutingError> {
    let mut removed = false;
    while ip_owned(&rule_args("del")).is_ok() {
        removed = true;
    }
    if table_has_routes()? {
        let table = CAPTURE_ROUTE_TABLE.to_string();
        ip(&["route", "flush", "table", &table])?;
        removed = true;
    }
    Ok(removed)
}

/// Whether the capture table holds any route; a table that was never created has none.
fn table_has_routes() -> Result<bool, RoutingError> {
    let table = CAPTURE_ROUTE_TABLE.to_string();
    match ip(&["-json", "route", "show", "table", &table]) {
        Ok(routes) => Ok(routes.contains("\"dst\"")),
        Err(RoutingError::Failed { stderr, .. }) if stderr.contains("does not exist") => Ok(false),
        Err(e) => Err(e),
    }
}

/// The device `table` routes `ip` through, which must be a local link (no gateway), as a
/// routed CNI installs `<podIP>/32 dev <veth> scope link`. (The main table only: the pod
/// routes of routed CNIs live there; hostNetwork pods, whose IP is the node's, are never
/// enrolled.)
pub fn pod_link(table: &RouteTable, ip: Ipv4Addr) -> Result<PodLink, RoutingError> {
    let ifname = table
        .link_for(ip)
        .ok_or(RoutingError::NoLocalRoute { ip })?
        .to_owned();
    let ifindex = ifindex(&ifname)?.ok_or(RoutingError::NoLocalRoute { ip })?;
    Ok(PodLink { ifname, ifindex })
}

/// Current index of a device in this network namespace: `Ok(None)` when there is no such
/// device, an error when the kernel could not be asked (the lookup needs a socket, which an
/// agent out of file descriptors cannot open). Only a device that is really gone may cost a
/// pod its capture.
pub fn ifindex(ifname: &str) -> Result<Option<u32>, RoutingError> {
    match nix::net::if_::if_nametoindex(ifname) {
        Ok(index) => Ok(Some(index)),
        Err(nix::errno::Errno::ENODEV) => Ok(None),
        Err(errno) => Err(RoutingError::DeviceLookup {
            ifname: ifname.to_owned(),
            source: errno.into(),
        }),
    }
}
