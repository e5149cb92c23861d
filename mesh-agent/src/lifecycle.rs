//! Keeping the data plane across agent restarts: pinned kernel state, listener hand-over,
//! drain, uninstall.
//!
//! The capture programs' links and maps are pinned in bpffs per network namespace, so an agent
//! that exits — SIGTERM, crash, upgrade — leaves capture in place: enrolled pods' new
//! connections find no listener and are dropped (fail closed) until an agent is back. A new
//! process adopts the pins; a running one hands its listening sockets over to its successor.
//! Only `mesh-agent uninstall` takes the data plane away.

pub mod drain;
pub mod handover;
pub mod listeners;
pub mod pins;
pub mod uninstall;

use serde::Serialize;

/// The other agent processes this one met on its node, for `mesh-agent status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Handovers {
    /// The process this one took the listeners over from.
    pub previous: Option<Process>,
    /// The process this one handed its listeners to (this one then only drains).
    pub successor: Option<Process>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Process {
    pub pid: u32,
    pub version: String,
    /// `draining` or `exited` for a predecessor; `serving` for a successor.
    pub state: &'static str,
}
