//! Agent configuration: a plain struct, logged at start-up and served by `/config_dump`.

use std::{net::SocketAddr, time::Duration};

use serde::Serialize;

use crate::{
    identity::IdentityConfig,
    proxy::{
        MeshConfig, hbone::pool::PoolSettings, keepalive::KeepaliveSettings, limits::LimitOverrides,
    },
    source::{StateSource, kube::daemonset::DaemonSetRef},
};

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Kubernetes node name this agent serves (pods' `spec.nodeName`).
    pub node: String,
    /// Where the cluster state comes from: YAML files or the Kubernetes API.
    pub source: StateSource,
    pub admin_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// How long open connections may take to finish on shutdown.
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
    /// Data-plane worker threads.
    pub worker_threads: usize,
    pub identity: IdentityConfig,
    pub mesh: MeshConfig,
    pub pool: PoolSettings,
    /// Limits given explicitly; `mesh-agent status` shows all of them as in force.
    pub limits: LimitOverrides,
    pub keepalive: KeepaliveSettings,
    /// The agent's own DaemonSet: when it is deleted, a stopping agent uninstalls the data plane.
    pub daemonset: Option<DaemonSetRef>,
}

pub mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}
