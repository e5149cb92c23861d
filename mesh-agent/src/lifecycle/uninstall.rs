//! `mesh-agent uninstall`: takes this node's data plane away, so its pods talk directly again.
//!
//! It removes the pinned links (which detaches the programs), the pinned maps, the policy rule
//! and route; puts `net.ipv4.tcp_early_demux` back to the value recorded before capture turned
//! it off; and closes the sockets the proxy left on pods' addresses. Those are TIME_WAIT (and
//! orphaned) sockets of the node namespace bound to pod IPs: once capture is gone, early demux
//! would hand a pod's packets to them instead of forwarding them, and the pod's next connection
//! to the same peer would stall. It refuses while an agent still serves
//! the node: stop it first (a running agent whose DaemonSet is deleted uninstalls itself).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    maps::{Array, Map, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use mesh_common::DataPlaneMeta;
use serde::Serialize;

use crate::{
    capture::{PROG_EGRESS, PROG_INGRESS, PROG_UPLINK, kernel, routing, sysctl},
    lifecycle::{handover, pins::PinDir},
};

#[derive(Debug, Default, Serialize)]
pub struct UninstallReport {
    /// The node's pin directory, when there was one.
    pub pin_dir: Option<String>,
    /// Pinned links removed (each one detached a program).
    pub removed_links: Vec<String>,
    pub removed_capture_route: bool,
    /// The value `net.ipv4.tcp_early_demux` was put back to.
    pub restored_early_demux: Option<String>,
    /// Sockets left by the proxy on pods' addresses, closed.
    pub closed_sockets: usize,
    /// Capture programs still attached (an agent is running in this namespace).
    pub still_attached: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error(
        "an agent is serving this node (pid {pid}): stop it first, or delete its DaemonSet, which uninstalls"
    )]
    AgentRunning { pid: String },
    #[error(transparent)]
    Pins(#[from] crate::lifecycle::pins::PinError),
    #[error(transparent)]
    Routing(#[from] routing::RoutingError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("closing leftover sockets with `ss -K`: {0}")]
    Sockets(String),
}

/// Uninstalls from the calling thread's network namespace. `by_agent`: the agent itself calls
/// this on its way out (its DaemonSet was deleted), so a serving agent is not a reason to stop.
pub fn uninstall(by_agent: bool) -> Result<UninstallReport, UninstallError> {
    if !by_agent && let Some(pid) = serving_agent() {
        return Err(UninstallError::AgentRunning { pid });
    }
    let pins = PinDir::for_this_netns(Path::new(kernel::BPFFS))?;
    let mut report = UninstallReport::default();
    let meta = read_meta(&pins);

    if pins.root().exists() {
        report.pin_dir = Some(pins.root().display().to_string());
        for (pin, path) in pins.pinned_links() {
            std::fs::remove_file(&path).map_err(|source| UninstallError::Remove {
                path: path.clone(),
                source,
            })?;
            report.removed_links.push(pin.file_name());
        }
    }
    report.removed_capture_route = routing::remove_capture_route()?;
    match meta {
        Some(meta) if meta.early_demux_before > 0 => {
            let value = (meta.early_demux_before - 1).to_string();
            // Written only when it differs: in a container /proc/sys is read-only, and there
            // the init container, not the agent, turned it off (the recorded value is 0).
            if sysctl::get(sysctl::EARLY_DEMUX)? != value {
                sysctl::set(sysctl::EARLY_DEMUX, &value)?;
                report.restored_early_demux = Some(value);
            }
        }
        Some(_) => {}
        // No record (an agent from before pinning, or one that died before writing it): our
        // route was there, so early demux is off because of it; the kernel default is on.
        None => {
            if report.removed_capture_route && sysctl::get(sysctl::EARLY_DEMUX)? == "0" {
                sysctl::set(sysctl::EARLY_DEMUX, "1")?;
                report.restored_early_demux = Some("1".into());
            }
        }
    }
    report.closed_sockets = close_sockets()?;
    if pins.root().exists() {
        std::fs::remove_dir_all(pins.root()).map_err(|source| UninstallError::Remove {
            path: pins.root().to_path_buf(),
            source,
        })?;
    }
    report.still_attached = attached_capture_programs();
    Ok(report)
}

/// The pid of an agent answering the hand-over socket of this namespace, if one does.
fn serving_agent() -> Option<String> {
    use std::os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr};
    let addr = SocketAddr::from_abstract_name(handover::SOCKET_NAME).ok()?;
    let stream = std::os::unix::net::UnixStream::connect_addr(&addr).ok()?;
    let pid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_or_else(|_| "unknown".to_string(), |c| c.pid().to_string());
    Some(pid)
}

fn read_meta(pins: &PinDir) -> Option<DataPlaneMeta> {
    let data = MapData::from_pin(pins.meta()).ok()?;
    let map = Array::<MapData, DataPlaneMeta>::try_from(Map::Array(data)).ok()?;
    map.get(&0, 0).ok().filter(|m| m.pinned_since != 0)
}

/// Closes the proxy's leftovers with `SOCK_DESTROY` (`ss -K`), which also ends TIME_WAIT:
/// sockets of this namespace in a closing state whose local address is none of the node's own.
/// Only a transparent socket can have one — the proxy's upstream connections keep their
/// client's address, a pod of this node or of another — and with the agent gone nothing owns
/// them. Returns how many there were.
fn close_sockets() -> Result<usize, UninstallError> {
    let mut local: Vec<String> = vec!["0.0.0.0".into(), "127.0.0.0/8".into()];
    if let Ok(addresses) = nix::ifaddrs::getifaddrs() {
        local.extend(
            addresses.filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip().to_string())),
        );
    }
    let ours = local
        .iter()
        .map(|ip| format!("src {ip}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let mut args: Vec<String> = ["-K", "-H", "-t", "-a", "-n", "-4"]
        .map(String::from)
        .to_vec();
    for state in [
        "time-wait",
        "fin-wait-1",
        "fin-wait-2",
        "closing",
        "last-ack",
        "close-wait",
    ] {
        args.extend(["state".to_string(), state.to_string()]);
    }
    args.push(format!("not ( {ours} )"));
    let out = Command::new("ss")
        .args(&args)
        .output()
        .map_err(|e| UninstallError::Sockets(e.to_string()))?;
    if !out.status.success() {
        return Err(UninstallError::Sockets(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// `<device> <ingress|egress> <program>` for every capture program attached in this namespace.
pub fn attached_capture_programs() -> Vec<String> {
    let mut found = Vec::new();
    let Ok(interfaces) = nix::net::if_::if_nameindex() else {
        return found;
    };
    for iface in interfaces.iter() {
        let Ok(name) = iface.name().to_str() else {
            continue;
        };
        for (direction, label) in [
            (TcAttachType::Ingress, "ingress"),
            (TcAttachType::Egress, "egress"),
        ] {
            let Ok((_, programs)) = SchedClassifier::query_tcx(iface.index(), direction) else {
                continue;
            };
            for prog in programs {
                let prog_name = prog.name_as_str().unwrap_or_default();
                if [PROG_INGRESS, PROG_EGRESS, PROG_UPLINK].contains(&prog_name) {
                    found.push(format!("{name} {label} {prog_name}"));
                }
            }
        }
    }
    found
}
