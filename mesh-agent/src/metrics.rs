//! Prometheus metrics with Istio's standard names and labels, so existing dashboards work,
//! plus the agent's own denial and failure counters. Served as text at `:15020/metrics`.

use std::{
    collections::HashMap,
    sync::{PoisonError, RwLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Istio's TCP labels (a subset of the standard set; unknown values are "unknown").
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (the client's node) or `destination` (the server's node).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub reporter: &'static str,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub source_principal: String,
    /// `namespace/name` of the deciding policy, or `default`.
    pub policy: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub reporter: &'static str,
    pub listener: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The bound that refused (`connections_per_source`, `handshakes`, ...).
    pub limit: &'static str,
}

/// The four Istio TCP counters of one label set. A connection looks them up once, when it
/// opens; everything after that is an atomic add.
#[derive(Clone, Debug)]
pub struct TcpCounters {
    pub opened: Counter,
    pub closed: Counter,
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
}

pub struct Metrics {
    registry: Registry,
    /// The counters of every label set seen, found with one hash instead of one per family.
    tcp: RwLock<HashMap<TcpLabels, TcpCounters>>,
    // Istio's TCP families; reached through `tcp`, which caches a label set's four counters.
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent_bytes: Family<TcpLabels, Counter>,
    received_bytes: Family<TcpLabels, Counter>,
    pub denied: Family<DenialLabels, Counter>,
    /// Requests (and TCP connections) a waypoint refused: by policy, or for a bad token.
    pub requests_denied: Family<DenialLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    limit_refusals: Family<LimitLabels, Counter>,
    /// Data-plane steps failing on the last reconcile pass (retried each second; the capture
    /// in place stays meanwhile).
    pub capture_problems: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let opened = Family::default();
        let closed = Family::default();
        let sent_bytes = Family::default();
        let received_bytes = Family::default();
        let denied = Family::default();
        let requests_denied = Family::default();
        let failures = Family::default();
        let limit_refusals = Family::default();
        let capture_problems = Gauge::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent by the client during TCP connections",
            sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes sent to the client during TCP connections",
            received_bytes.clone(),
        );
        registry.register(
            "mesh_agent_connections_denied",
            "Connections denied by policy",
            denied.clone(),
        );
        registry.register(
            "mesh_agent_requests_denied",
            "Requests a waypoint refused: by policy, or for a bad token",
            requests_denied.clone(),
        );
        registry.register(
            "mesh_agent_connection_failures",
            "Connections refused or failed before carrying data",
            failures.clone(),
        );
        registry.register(
            "mesh_agent_limit_refusals",
            "New connections, streams, handshakes or tunnels refused at a limit",
            limit_refusals.clone(),
        );
        registry.register(
            "mesh_agent_capture_problems",
            "Data-plane steps that failed on the last reconcile pass and are being retried",
            capture_problems.clone(),
        );
        Self {
            registry,
            tcp: RwLock::default(),
            opened,
            closed,
            sent_bytes,
            received_bytes,
            denied,
            requests_denied,
            failures,
            limit_refusals,
            capture_problems,
        }
    }

    /// The registry, for a process that adds families of its own (the waypoint's request
    /// metrics, [`crate::waypoint::telemetry`]).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The TCP counters of `labels` (created at zero the first time).
    pub fn tcp(&self, labels: &TcpLabels) -> TcpCounters {
        let cached = self
            .tcp
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(labels)
            .cloned();
        if let Some(counters) = cached {
            return counters;
        }
        let counters = TcpCounters {
            opened: self.opened.get_or_create(labels).clone(),
            closed: self.closed.get_or_create(labels).clone(),
            sent_bytes: self.sent_bytes.get_or_create(labels).clone(),
            received_bytes: self.received_bytes.get_or_create(labels).clone(),
        };
        self.tcp
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(labels.clone())
            .or_insert(counters)
            .clone()
    }

    /// Something refused because a limit was reached.
    pub fn limit_refused(&self, limit: &'static str) {
        self.limit_refusals
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// A connection the proxy refused before it was a connection (bad TLS, bad request...).
    pub fn refused(&self, listener: &'static str, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                // Outbound refusals happen on the client's node, the rest on the server's.
                reporter: if listener == "outbound" {
                    "source"
                } else {
                    "destination"
                },
                listener,
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_are_exported() {
        let m = Metrics::new();
        let labels = TcpLabels {
            reporter: "source",
            source_workload: "web".into(),
            source_workload_namespace: "shop".into(),
            source_principal: "spiffe://cluster.local/ns/shop/sa/web".into(),
            source_app: "web".into(),
            destination_workload: "db".into(),
            destination_workload_namespace: "shop".into(),
            destination_principal: "spiffe://cluster.local/ns/shop/sa/db".into(),
            destination_app: "db".into(),
            destination_service: "unknown".into(),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        };
        m.tcp(&labels).opened.inc();
        m.tcp(&labels).sent_bytes.inc_by(10);
        m.refused("tunnel", "tls handshake");
        let text = m.encode().unwrap();
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"source\""));
        assert!(text.contains("istio_tcp_sent_bytes_total{"));
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_sent_bytes_total{") && l.ends_with(" 10")),
            "the cached counters are the exported ones:\n{text}"
        );
        assert!(text.contains("connection_security_policy=\"mutual_tls\""));
        assert!(text.contains("mesh_agent_connection_failures_total{reporter=\"destination\",listener=\"tunnel\",reason=\"tls handshake\"} 1"));
    }
}
