//! The L7 waypoint (`mesh-agent waypoint`): terminates HBONE for the Services that use it and
//! applies Istio's L7 policy and Gateway API routes to their HTTP before it goes on to an
//! endpoint over HBONE, with the waypoint's own identity.
//!
//! - [`app`]: the process (state source, certificate, listeners, drain);
//! - [`tunnel`]: HBONE from node agents, one CONNECT per client connection;
//! - [`http`]: the HTTP served inside a CONNECT, request by request;
//! - [`authorization`], [`jwt`]: RequestAuthentication and L7 AuthorizationPolicy, by `targetRefs`;
//! - [`path`]: the request path as policy and routes see it;
//! - [`routing`], [`filters`]: which rule a request takes and what its filters do;
//! - [`forward`]: timeouts, retries and mirrors of a routed request;
//! - [`backends`]: connections to endpoints, pooled;
//! - [`explain`]: what the waypoint would do with a request, for `mesh-agent explain`;
//! - [`telemetry`], [`access_log`], [`trace`]: Istio's request metrics, access log and trace
//!   context.

pub mod access_log;
pub mod app;
pub mod authorization;
pub mod backends;
pub mod explain;
pub mod filters;
pub mod forward;
pub mod http;
pub mod jwt;
pub mod path;
pub mod routing;
pub mod telemetry;
pub mod trace;
pub mod tunnel;

use std::{net::Ipv4Addr, sync::Arc};

use tokio::sync::watch;

use crate::{
    identity::{CertificateManager, Identity},
    metrics::Metrics,
    proxy::{
        MeshConfig, hbone::pool::Pool, keepalive::KeepaliveSettings, upstream::ServiceBalancer,
    },
    state::{Service, Snapshot, WaypointRef, WaypointUse, Workload},
};

/// What every tunnel and request of the waypoint needs.
pub struct WaypointContext {
    /// The Gateway this process is a pod of.
    pub gateway: WaypointRef,
    /// This pod's identity: what it presents to clients and to endpoints.
    pub identity: Identity,
    /// This pod's address, the source of its connections to endpoints.
    pub ip: Ipv4Addr,
    pub mesh: MeshConfig,
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub certs: CertificateManager,
    /// HBONE to endpoints, as this waypoint.
    pub pool: Pool,
    pub balancer: ServiceBalancer,
    pub backends: backends::Backends,
    /// JWT validation, with its cache of fetched key sets.
    pub authenticator: jwt::Authenticator,
    pub metrics: Arc<Metrics>,
    /// Istio's request metrics, in `metrics`' registry.
    pub requests: telemetry::RequestMetrics,
    /// Whether each request gets an access-log line on standard output.
    pub access_log: bool,
    pub keepalive: KeepaliveSettings,
    /// Turns true when the process stops: tunnels and HTTP connections are told to go away.
    pub draining: watch::Receiver<bool>,
}

impl WaypointContext {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.borrow().clone()
    }

    /// Whether this use names this waypoint (and it can be used at all).
    fn is_ours(&self, used: Option<&WaypointUse>) -> bool {
        used.is_some_and(|u| u.is_usable() && u.waypoint == self.gateway)
    }

    /// Whether traffic to `service` is this waypoint's to handle.
    pub fn serves_service(&self, snapshot: &Snapshot, service: &Service) -> bool {
        self.is_ours(snapshot.service_waypoint(service))
    }

    /// Whether traffic addressed to the pod `workload` itself is this waypoint's to handle.
    pub fn serves_workload(&self, snapshot: &Snapshot, workload: &Workload) -> bool {
        self.is_ours(snapshot.workload_waypoint(workload))
    }

    /// The SPIFFE identity of a pod (see [`crate::proxy::ProxyContext::identity_of`]).
    pub fn identity_of(&self, workload: &Workload) -> Option<Identity> {
        self.mesh.identity_of(workload)
    }
}
