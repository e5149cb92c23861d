//! Node routing the capture relies on: the policy route for marked packets, and finding a
//! pod's host-side veth from the route a CNI installs for the pod's IP.
//!
//! Uses iproute2 (`ip -json`), which every node has; the rules it adds are removed by
//! [`remove_capture_route`] on shutdown and by `mesh-agent cleanup`.

use std::{net::Ipv4Addr, process::Command};

use mesh_common::{CAPTURE_MARK, CAPTURE_MARK_MASK, CAPTURE_ROUTE_TABLE, CAPTURE_RULE_PRIORITY};

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
pub fn install_capture_route() -> Result<(), RoutingError> {
    // Idempotent: a previous crashed run may have left the rule behind.
    remove_capture_route()?;
    ip_owned(&rule_args("add"))?;
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
    Ok(())
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

/// Finds the device the node routes `ip` through, which must be a local link (no gateway),
/// as a routed CNI installs `<podIP>/32 dev <veth> scope link`.
pub fn pod_link(ip: Ipv4Addr) -> Result<PodLink, RoutingError> {
    let addr = ip.to_string();
    let args = ["-json", "route", "get", addr.as_str()];
    let out = self::ip(&args)?;
    let ifname = parse_route_get(&out).map_err(|reason| RoutingError::Output {
        args: args.join(" "),
        reason,
    })?;
    let Some(ifname) = ifname else {
        return Err(RoutingError::NoLocalRoute { ip });
    };
    let ifindex = ifindex(&ifname).ok_or(RoutingError::NoLocalRoute { ip })?;
    Ok(PodLink { ifname, ifindex })
}

/// `Ok(Some(dev))` for a directly connected route through a device other than `lo`.
fn parse_route_get(json: &str) -> Result<Option<String>, String> {
    let routes: Vec<serde_json::Value> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let Some(route) = routes.first() else {
        return Ok(None);
    };
    if route.get("gateway").is_some() || route.get("type").and_then(|t| t.as_str()) == Some("local")
    {
        return Ok(None);
    }
    match route.get("dev").and_then(|d| d.as_str()) {
        Some("lo") | None => Ok(None),
        Some(dev) => Ok(Some(dev.to_string())),
    }
}

/// Current index of a device in this network namespace.
pub fn ifindex(ifname: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(ifname).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_through_veth_is_a_pod_link() {
        let json = r#"[{"dst":"10.7.1.10","dev":"veth1a2b3c4d","prefsrc":"169.254.1.1","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(parse_route_get(json), Ok(Some("veth1a2b3c4d".into())));
    }

    #[test]
    fn routes_via_gateway_or_local_are_not() {
        let via = r#"[{"dst":"10.7.2.10","gateway":"192.168.7.2","dev":"eth0","flags":[]}]"#;
        assert_eq!(parse_route_get(via), Ok(None));
        let local = r#"[{"type":"local","dst":"127.0.0.1","dev":"lo","flags":[]}]"#;
        assert_eq!(parse_route_get(local), Ok(None));
        assert!(parse_route_get("not json").is_err());
    }
}
