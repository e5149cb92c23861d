//! The JSON views served by the admin API (and rendered as tables by the CLI).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde::Serialize;
use tokio::sync::watch;

use crate::{
    capture::{Capture, CaptureStatus, reconcile::Pending},
    config::Config,
    proxy::connections::{Connections, Totals},
    state::{Snapshot, StateStatus},
};

/// Everything the admin API reads; shared with the rest of the agent.
pub struct AdminState {
    pub config: Config,
    pub started: Instant,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub state_status: watch::Receiver<StateStatus>,
    pub capture: Arc<Mutex<Option<Capture>>>,
    pub pending: Arc<Mutex<Pending>>,
    pub connections: Connections,
    pub ready: watch::Receiver<bool>,
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub node: String,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub ready: bool,
    pub state: StateView,
    pub capture: CaptureSummary,
    pub connections: ConnectionSummary,
}

#[derive(Debug, Serialize)]
pub struct StateView {
    pub path: String,
    pub namespaces: usize,
    pub workloads: usize,
    pub status: StateStatus,
}

#[derive(Debug, Serialize)]
pub struct CaptureSummary {
    pub active: bool,
    pub enrolled_on_node: usize,
    pub captured: usize,
    pub pending: BTreeMap<Ipv4Addr, String>,
}

#[derive(Debug, Serialize)]
pub struct ConnectionSummary {
    pub open: usize,
    pub totals: Totals,
}

#[derive(Debug, Serialize)]
pub struct WorkloadView {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub service_account: String,
    pub enrolled: bool,
    pub reason: String,
    /// Whether the pod runs on this agent's node.
    pub local: bool,
    /// Host-side device the capture programs are attached to, for captured pods.
    pub capture_device: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ConfigDump {
    pub config: Config,
    pub state: Arc<Snapshot>,
}

impl AdminState {
    fn captured(&self) -> BTreeMap<Ipv4Addr, String> {
        let capture = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        capture
            .as_ref()
            .map(|c| c.enrolled().map(|(ip, link)| (*ip, link.ifname.clone())).collect())
            .unwrap_or_default()
    }

    pub fn status(&self) -> StatusView {
        let snapshot = self.snapshot.borrow().clone();
        let captured = self.captured();
        let active = self.capture.lock().map(|c| c.is_some()).unwrap_or(false);
        StatusView {
            node: self.config.node.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            ready: *self.ready.borrow(),
            state: StateView {
                path: self.config.state_path.display().to_string(),
                namespaces: snapshot.namespaces.len(),
                workloads: snapshot.workloads.len(),
                status: self.state_status.borrow().clone(),
            },
            capture: CaptureSummary {
                active,
                enrolled_on_node: snapshot
                    .workloads_on_node(&self.config.node)
                    .filter(|w| w.is_enrolled())
                    .count(),
                captured: captured.len(),
                pending: self.pending.lock().map(|p| p.clone()).unwrap_or_default(),
            },
            connections: ConnectionSummary {
                open: self.connections.open_count(),
                totals: self.connections.view().totals,
            },
        }
    }

    pub fn workloads(&self) -> Vec<WorkloadView> {
        let snapshot = self.snapshot.borrow().clone();
        let captured = self.captured();
        snapshot
            .workloads
            .iter()
            .map(|w| {
                let (enrolled, reason) = match &w.enrollment {
                    crate::state::Enrollment::Enrolled { reason } => (true, reason.clone()),
                    crate::state::Enrollment::NotEnrolled { reason } => (false, reason.clone()),
                };
                WorkloadView {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    node: w.node.clone(),
                    ip: w.ip,
                    service_account: w.service_account.clone(),
                    enrolled,
                    reason,
                    local: w.node == self.config.node,
                    capture_device: captured.get(&w.ip).cloned(),
                }
            })
            .collect()
    }

    pub fn bpf(&self) -> Option<CaptureStatus> {
        let capture = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        capture.as_ref().map(Capture::status)
    }

    pub fn config_dump(&self) -> ConfigDump {
        ConfigDump { config: self.config.clone(), state: self.snapshot.borrow().clone() }
    }
}
