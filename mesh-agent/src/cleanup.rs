//! `mesh-agent cleanup`: removes what a crashed agent left in this node's network namespace.
//!
//! A running agent holds its eBPF attachments as bpf_links, which the kernel removes when the
//! process dies. What can outlive it is the policy route (rule + table) and pinned objects
//! under bpffs; this removes them and reports any capture program still attached.

use std::path::Path;

use aya::programs::{SchedClassifier, TcAttachType};
use serde::Serialize;

use crate::capture::{PROG_EGRESS, PROG_INGRESS, routing, sysctl};

/// bpffs directory for objects pinned by the agent.
pub const PIN_ROOT: &str = "/sys/fs/bpf/mesh-agent";

#[derive(Debug, Default, Serialize)]
pub struct CleanupReport {
    pub removed_capture_route: bool,
    /// `net.ipv4.tcp_early_demux` turned back on (the agent turns it off while it runs).
    pub restored_early_demux: bool,
    pub removed_pins: Vec<String>,
    /// Capture programs still attached (another agent is running in this namespace).
    pub still_attached: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(transparent)]
    Routing(#[from] routing::RoutingError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    #[error("removing pins under {path}: {source}")]
    Pins {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn cleanup() -> Result<CleanupReport, CleanupError> {
    let mut report = CleanupReport {
        removed_capture_route: routing::remove_capture_route()?,
        ..Default::default()
    };
    // Only when our route was there, i.e. an agent died here: then early demux is off because
    // of it, and the kernel default (on) is the value to go back to.
    if report.removed_capture_route && sysctl::get(sysctl::EARLY_DEMUX)? == "0" {
        sysctl::set(sysctl::EARLY_DEMUX, "1")?;
        report.restored_early_demux = true;
    }
    let root = Path::new(PIN_ROOT);
    if root.exists() {
        collect(root, &mut report.removed_pins);
        std::fs::remove_dir_all(root).map_err(|source| CleanupError::Pins {
            path: PIN_ROOT.into(),
            source,
        })?;
    }
    report.still_attached = attached_capture_programs();
    Ok(report)
}

fn collect(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, out);
        } else {
            out.push(path.display().to_string());
        }
    }
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
                if prog_name == PROG_INGRESS || prog_name == PROG_EGRESS {
                    found.push(format!("{name} {label} {prog_name}"));
                }
            }
        }
    }
    found
}
