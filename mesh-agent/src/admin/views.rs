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
    explain::{self, Explanation},
    identity::CertificateView,
    policy::{self, AppliedPolicy, MtlsMode},
    proxy::{
        ProxyContext,
        connections::{ConnectionRecord, Totals},
        hbone::pool::TunnelView,
    },
    source::StateStatus,
    state::Snapshot,
};

/// Everything the admin API reads; shared with the rest of the agent.
pub struct AdminState {
    pub config: Config,
    pub started: Instant,
    pub state_status: watch::Receiver<StateStatus>,
    /// Each watch of the Kubernetes source (`None` for the directory source).
    pub source_watches: Option<watch::Receiver<Vec<crate::source::kube::WatchStatus>>>,
    pub capture: Arc<Mutex<Option<Capture>>>,
    pub pending: Arc<Mutex<Pending>>,
    pub proxy: Arc<ProxyContext>,
    pub ready: watch::Receiver<bool>,
    /// The agent processes this one took over from or handed over to.
    pub handovers: watch::Receiver<crate::lifecycle::Handovers>,
    /// The open-files limit raised at start.
    pub open_files: crate::limits::OpenFiles,
    /// JWT validation for `explain` of HTTP requests (its own cache of fetched key sets).
    pub authenticator: crate::waypoint::jwt::Authenticator,
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub node: String,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub ready: bool,
    pub trust_domain: String,
    pub state: StateView,
    pub capture: CaptureSummary,
    pub connections: ConnectionSummary,
    pub certificates: usize,
    pub lifecycle: LifecycleView,
    pub limits: LimitsView,
}

/// The process's resource limits.
#[derive(Debug, Serialize)]
pub struct LimitsView {
    pub open_files: crate::limits::OpenFiles,
    /// The proxy's bounds, what is held against them, and what they refused.
    pub proxy: crate::proxy::limits::LimitsStatus,
    pub keepalive: crate::proxy::keepalive::KeepaliveSettings,
}

/// The pinned data plane this process serves, and the processes before and after it.
#[derive(Debug, Serialize)]
pub struct LifecycleView {
    pub pid: u32,
    pub dataplane: Option<crate::lifecycle::pins::DataPlaneStatus>,
    #[serde(flatten)]
    pub handovers: crate::lifecycle::Handovers,
}

#[derive(Debug, Serialize)]
pub struct StateView {
    pub path: String,
    pub namespaces: usize,
    pub workloads: usize,
    pub services: usize,
    pub authorization_policies: usize,
    pub peer_authentications: usize,
    pub status: StateStatus,
    /// The Kubernetes source's watches: state, objects held, last event, failing since.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub watches: Vec<crate::source::kube::WatchStatus>,
}

#[derive(Debug, Serialize)]
pub struct CaptureSummary {
    pub active: bool,
    pub enrolled_on_node: usize,
    pub captured: usize,
    pub pending: BTreeMap<Ipv4Addr, String>,
    /// Steps failing and retried; the capture in place stays as it is meanwhile.
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ConnectionSummary {
    pub open: usize,
    pub tunnels: usize,
    pub totals: Totals,
}

#[derive(Debug, Serialize)]
pub struct WorkloadView {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub service_account: String,
    pub identity: Option<String>,
    pub enrolled: bool,
    pub reason: String,
    /// Whether the pod runs on this agent's node.
    pub local: bool,
    /// Host-side device the capture programs are attached to, for captured pods.
    pub capture_device: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ConnectionsView {
    pub open: Vec<ConnectionRecord>,
    pub recent: Vec<ConnectionRecord>,
    pub totals: Totals,
    /// Pooled HBONE connections this node opened.
    pub tunnels: Vec<TunnelView>,
}

#[derive(Debug, Serialize)]
pub struct WorkloadPolicies {
    pub workload: String,
    pub identity: String,
    /// PeerAuthentication mode for plaintext arriving at the workload (no port given).
    pub mtls_mode: MtlsMode,
    pub policies: Vec<AppliedPolicy>,
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
            .map(|c| {
                c.enrolled()
                    .map(|(ip, link)| (*ip, link.ifname.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn status(&self) -> StatusView {
        let snapshot = self.proxy.snapshot();
        let captured = self.captured();
        let active = self.capture.lock().map(|c| c.is_some()).unwrap_or(false);
        StatusView {
            node: self.config.node.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            ready: *self.ready.borrow(),
            trust_domain: self.config.identity.trust_domain.clone(),
            state: StateView {
                path: self.state_status.borrow().path.display().to_string(),
                namespaces: snapshot.namespaces.len(),
                workloads: snapshot.workloads.len(),
                services: snapshot.services.len(),
                authorization_policies: snapshot.authorization_policies.len(),
                peer_authentications: snapshot.peer_authentications.len(),
                status: self.state_status.borrow().clone(),
                watches: self
                    .source_watches
                    .as_ref()
                    .map(|w| w.borrow().clone())
                    .unwrap_or_default(),
            },
            capture: CaptureSummary {
                active,
                enrolled_on_node: snapshot
                    .workloads_on_node(&self.config.node)
                    .filter(|w| w.is_enrolled())
                    .count(),
                captured: captured.len(),
                pending: self.pending.lock().map(|p| p.clone()).unwrap_or_default(),
                problems: self
                    .capture
                    .lock()
                    .ok()
                    .and_then(|c| c.as_ref().map(Capture::problems))
                    .unwrap_or_default(),
            },
            connections: ConnectionSummary {
                open: self.proxy.connections.open_count(),
                tunnels: self.proxy.pool.view().len(),
                totals: self.proxy.connections.totals(),
            },
            certificates: self.proxy.certs.certificates().len(),
            lifecycle: LifecycleView {
                pid: std::process::id(),
                dataplane: self
                    .capture
                    .lock()
                    .ok()
                    .and_then(|c| c.as_ref().map(|c| c.dataplane().clone())),
                handovers: self.handovers.borrow().clone(),
            },
            limits: LimitsView {
                open_files: self.open_files,
                proxy: self.proxy.limits.status(),
                keepalive: self.proxy.keepalive,
            },
        }
    }

    pub fn workloads(&self) -> Vec<WorkloadView> {
        let snapshot = self.proxy.snapshot();
        let captured = self.captured();
        snapshot
            .workloads
            .iter()
            .map(|w| WorkloadView {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                node: w.node.clone(),
                ip: w.ip,
                service_account: w.service_account.clone(),
                identity: w
                    .is_enrolled()
                    .then(|| self.proxy.identity_of(w))
                    .flatten()
                    .map(|i| i.to_string()),
                enrolled: w.is_enrolled(),
                reason: w.enrollment.reason().to_string(),
                local: w.node == self.config.node,
                capture_device: captured.get(&w.ip).cloned(),
            })
            .collect()
    }

    pub fn connections(&self) -> ConnectionsView {
        let view = self.proxy.connections.view();
        ConnectionsView {
            open: view.open,
            recent: view.recent,
            totals: view.totals,
            tunnels: self.proxy.pool.view(),
        }
    }

    pub fn certificates(&self) -> Vec<CertificateView> {
        self.proxy.certs.certificates()
    }

    /// Policies of each enrolled workload of this node.
    pub fn policies(&self) -> Vec<WorkloadPolicies> {
        let snapshot = self.proxy.snapshot();
        let root = &self.proxy.mesh.root_namespace;
        snapshot
            .workloads_on_node(&self.config.node)
            .filter(|w| w.is_enrolled())
            .map(|w| WorkloadPolicies {
                workload: format!("{}/{}", w.namespace, w.name),
                identity: self
                    .proxy
                    .identity_of(w)
                    .map(|i| i.to_string())
                    .unwrap_or_default(),
                mtls_mode: policy::mtls_mode(&snapshot, root, w, 0),
                policies: policy::policies_for(&snapshot, root, w),
            })
            .collect()
    }

    pub async fn explain(
        &self,
        from: &str,
        to: &str,
        request: Option<crate::waypoint::explain::HttpRequest>,
    ) -> Result<Explanation, String> {
        let to = to
            .parse()
            .map_err(|_| format!("--to {to:?} is not an ip:port"))?;
        let snapshot = self.proxy.snapshot();
        let addresses = node_addresses();
        let here = explain::Here {
            node: &self.proxy.node,
            addresses: &addresses,
        };
        let mut explanation = explain::explain(
            &snapshot,
            &self.proxy.mesh,
            &self.proxy.services,
            &here,
            from,
            to,
        )
        .map_err(|e| e.to_string())?;
        if let Some(request) = request {
            explanation.http = Some(
                explain::explain_http(
                    &snapshot,
                    &self.proxy.mesh,
                    &explanation,
                    request,
                    &self.authenticator,
                )
                .await,
            );
        }
        Ok(explanation)
    }

    pub fn bpf(&self) -> Option<CaptureStatus> {
        let capture = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        capture.as_ref().map(Capture::status)
    }

    pub fn config_dump(&self) -> ConfigDump {
        ConfigDump {
            config: self.config.clone(),
            state: self.proxy.snapshot(),
        }
    }
}

/// The IPv4 addresses of the network namespace the agent runs in (its node's); none if they
/// cannot be listed.
fn node_addresses() -> Vec<std::net::Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .map(|addresses| {
            addresses
                .filter_map(|a| a.address?.as_sockaddr_in().map(|sin| sin.ip()))
                .collect()
        })
        .unwrap_or_default()
}
