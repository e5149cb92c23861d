//! `mesh-agent explain`: what would happen to a connection from a pod (or address) to an
//! address, and why — computed with the same functions the proxy uses to decide.

use std::net::{Ipv4Addr, SocketAddr};

use serde::Serialize;

use crate::{
    policy::{self, Decision, MtlsMode},
    proxy::{MeshConfig, upstream::ServiceBalancer},
    state::{AppProtocol, Snapshot, Workload},
    waypoint::{
        explain::{HttpExplanation, HttpRequest, explain_request},
        jwt::Authenticator,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("no pod {0} in the state")]
    UnknownPod(String),
    #[error("{0:?} is neither an IPv4 address nor namespace/name")]
    BadSource(String),
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub source: Endpoint,
    pub destination: SocketAddr,
    /// `namespace/name` when the destination is a Service address.
    pub service: Option<String>,
    /// The waypoint the destination uses (`namespace/name`), whose pods are then the paths.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<String>,
    pub paths: Vec<PathExplanation>,
    /// One line for humans.
    pub summary: String,
    /// What the waypoint would do with the HTTP request asked about, if one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpVerdict>,
}

/// The HTTP side of an explanation: the waypoint's verdict on the request, or why no
/// waypoint looks at HTTP on this path.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum HttpVerdict {
    Explained(Box<HttpExplanation>),
    NotHttp { not_http: String },
}

#[derive(Debug, Serialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub workload: Option<String>,
    pub enrolled: bool,
    pub identity: Option<String>,
}

/// What happens when the connection goes to one endpoint.
#[derive(Debug, Serialize)]
pub struct PathExplanation {
    pub endpoint: SocketAddr,
    pub workload: Option<String>,
    /// `tunnel`, `local`, `direct`, `host` (from the destination's own node, not captured), or
    /// `plaintext-inbound`.
    pub route: &'static str,
    /// Whether the destination's node proxy sees the connection at all.
    pub captured_at_destination: bool,
    pub mtls_mode: Option<MtlsMode>,
    pub allowed: bool,
    pub decision: Option<Decision>,
    pub reason: String,
}

/// The node whose agent explains: connections its own processes open to its pods are not
/// captured (as in Istio ambient, host traffic to ambient pods bypasses the proxy).
pub struct Here<'a> {
    pub node: &'a str,
    /// The node's own IPv4 addresses.
    pub addresses: &'a [Ipv4Addr],
}

pub fn explain(
    snapshot: &Snapshot,
    mesh: &MeshConfig,
    balancer: &ServiceBalancer,
    here: &Here<'_>,
    from: &str,
    to: SocketAddr,
) -> Result<Explanation, ExplainError> {
    let source = resolve_source(snapshot, from)?;
    let source_enrolled = source.as_ref().is_some_and(Workload::is_enrolled);
    let source_ip = match (&source, from.parse::<Ipv4Addr>()) {
        (Some(w), _) => w.ip,
        (None, Ok(ip)) => ip,
        (None, Err(_)) => return Err(ExplainError::BadSource(from.into())),
    };
    let identity = source
        .as_ref()
        .filter(|w| w.is_enrolled())
        .and_then(|w| {
            crate::identity::Identity::new(&mesh.trust_domain, &w.namespace, &w.service_account)
                .ok()
        })
        .map(|i| i.to_string());
    let resolved = balancer.peek(snapshot, to);
    let source_node = source.as_ref().map(|w| w.node.as_str());
    let source_endpoint = Endpoint {
        ip: source_ip,
        workload: source
            .as_ref()
            .map(|w| format!("{}/{}", w.namespace, w.name)),
        enrolled: source_enrolled,
        identity,
    };
    let paths: Vec<PathExplanation> = resolved
        .endpoints
        .iter()
        .map(|endpoint| match resolved.waypoint {
            Some(used) => waypoint_path(&source_endpoint, &used.waypoint, endpoint),
            None => explain_path(
                snapshot,
                mesh,
                here,
                &source_endpoint,
                source_node,
                endpoint,
            ),
        })
        .collect();
    let unusable = resolved
        .waypoint
        .and_then(|used| Some((&used.waypoint, used.problem.as_deref()?)));
    let summary = match (&resolved.service, paths.first()) {
        _ if let Some((waypoint, problem)) = unusable => {
            format!("waypoint {waypoint} cannot be used ({problem}): the connection is reset")
        }
        _ if resolved.waypoint.is_some() && paths.is_empty() => {
            "the waypoint has no running pod: the connection is reset".into()
        }
        (Some(service), None) => {
            format!("service {service} has no ready endpoint: the connection is reset")
        }
        (_, None) => "no destination".into(),
        (_, Some(first)) if paths.iter().all(|p| p.allowed == first.allowed) => {
            verdict_line(first.allowed, &first.reason)
        }
        (_, Some(_)) => "depends on the endpoint chosen; see paths".into(),
    };
    Ok(Explanation {
        source: source_endpoint,
        destination: to,
        service: resolved.service,
        waypoint: resolved.waypoint.map(|used| used.waypoint.to_string()),
        paths,
        summary,
        http: None,
    })
}

/// What the waypoint in front of `explanation`'s destination would do with `request`, with the
/// waypoint's own functions ([`crate::waypoint::explain`]).
pub async fn explain_http(
    snapshot: &Snapshot,
    mesh: &MeshConfig,
    explanation: &Explanation,
    request: HttpRequest,
    authenticator: &Authenticator,
) -> HttpVerdict {
    let not_http = |why: &str| HttpVerdict::NotHttp {
        not_http: why.to_string(),
    };
    let to = explanation.destination;
    let service = match to {
        SocketAddr::V4(v4) => snapshot.service_by_ip(*v4.ip()),
        SocketAddr::V6(_) => None,
    };
    let Some(service) = service else {
        return not_http("the destination is not a Service address: no waypoint looks at its HTTP");
    };
    let Some(port) = service.ports.iter().find(|p| p.port == to.port()) else {
        return not_http("the Service has no such port");
    };
    let Some(used) = snapshot.service_waypoint(service).filter(|u| u.is_usable()) else {
        return not_http("the Service uses no waypoint: only L4 policy applies");
    };
    if !explanation.source.enrolled {
        return not_http("the source is not in the mesh: its traffic does not reach the waypoint");
    }
    if !matches!(
        port.app_protocol,
        AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc
    ) {
        return not_http(
            "the port is not HTTP (appProtocol or name): it passes the waypoint as TCP",
        );
    }
    let conn = crate::proxy::connection_attributes(
        explanation.source.ip.into(),
        explanation.source.identity.as_deref(),
        to,
    );
    HttpVerdict::Explained(Box::new(
        explain_request(
            snapshot,
            &mesh.root_namespace,
            &used.waypoint,
            service,
            port.port,
            &conn,
            request,
            authenticator,
        )
        .await,
    ))
}

/// A path through a waypoint pod: the node sends the connection there over HBONE; what happens
/// next (L7 policy, routes) is the waypoint's to decide.
fn waypoint_path(
    source: &Endpoint,
    waypoint: &crate::state::WaypointRef,
    endpoint: &crate::proxy::upstream::Endpoint,
) -> PathExplanation {
    let (allowed, reason) = if source.enrolled {
        (
            true,
            format!("through waypoint {waypoint} over HBONE; its policies and routes decide"),
        )
    } else {
        (
            false,
            format!(
                "the source is not in the mesh: its connection is not captured and does not reach waypoint {waypoint}"
            ),
        )
    };
    PathExplanation {
        endpoint: endpoint.address,
        workload: endpoint
            .workload
            .map(|w| format!("{}/{}", w.namespace, w.name)),
        route: "waypoint",
        captured_at_destination: true,
        mtls_mode: None,
        allowed,
        decision: None,
        reason,
    }
}

fn resolve_source(snapshot: &Snapshot, from: &str) -> Result<Option<Workload>, ExplainError> {
    if let Ok(ip) = from.parse::<Ipv4Addr>() {
        return Ok(snapshot.workload_by_ip(ip).cloned());
    }
    let Some((namespace, name)) = from.split_once('/') else {
        return Err(ExplainError::BadSource(from.into()));
    };
    snapshot
        .workload(namespace, name)
        .cloned()
        .map(Some)
        .ok_or_else(|| ExplainError::UnknownPod(from.into()))
}

/// What happens on the way from `source` (on `source_node`, if a pod) to one endpoint.
fn explain_path(
    snapshot: &Snapshot,
    mesh: &MeshConfig,
    here: &Here<'_>,
    source: &Endpoint,
    source_node: Option<&str>,
    endpoint: &crate::proxy::upstream::Endpoint,
) -> PathExplanation {
    let Endpoint {
        ip: source_ip,
        enrolled: source_enrolled,
        ..
    } = *source;
    let identity = source.identity.as_deref();
    let workload = endpoint
        .workload
        .map(|w| format!("{}/{}", w.namespace, w.name));
    let direct = |reason: &str| PathExplanation {
        endpoint: endpoint.address,
        workload: workload.clone(),
        route: "direct",
        captured_at_destination: false,
        mtls_mode: None,
        allowed: true,
        decision: None,
        reason: reason.into(),
    };
    let Some(destination) = endpoint.workload.filter(|w| w.is_enrolled()) else {
        return direct("the destination is not in the mesh: no policy applies");
    };
    if !endpoint.address.is_ipv4() {
        return direct("IPv6 is not captured");
    }
    if destination.node == here.node && here.addresses.contains(&source_ip) {
        return PathExplanation {
            route: "host",
            ..direct(
                "from the pod's own node (kubelet probes, host-network pods): not captured, no policy applies",
            )
        };
    }
    let attributes =
        crate::proxy::connection_attributes(source_ip.into(), identity, endpoint.address);
    let mode = policy::mtls_mode(
        snapshot,
        &mesh.root_namespace,
        destination,
        endpoint.address.port(),
    );
    let route = match (source_enrolled, source_node) {
        (true, Some(node)) if node == destination.node => "local",
        (true, _) => "tunnel",
        (false, _) => "plaintext-inbound",
    };
    if !source_enrolled && mode == MtlsMode::Strict {
        return PathExplanation {
            endpoint: endpoint.address,
            workload,
            route,
            captured_at_destination: true,
            mtls_mode: Some(mode),
            allowed: false,
            decision: None,
            reason: "plaintext refused by PeerAuthentication STRICT".into(),
        };
    }
    let decision = policy::authorize(snapshot, &mesh.root_namespace, destination, &attributes);
    PathExplanation {
        endpoint: endpoint.address,
        workload,
        route,
        captured_at_destination: true,
        mtls_mode: Some(mode),
        allowed: decision.allowed,
        reason: decision.reason.clone(),
        decision: Some(decision),
    }
}

/// "ALLOW: <reason>", without repeating a verdict the reason already starts with.
fn verdict_line(allowed: bool, reason: &str) -> String {
    let verdict = if allowed { "ALLOW" } else { "DENY" };
    let rest = ["allowed: ", "denied: "]
        .iter()
        .find_map(|prefix| reason.strip_prefix(prefix))
        .unwrap_or(reason);
    format!("{verdict}: {rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_is_not_repeated() {
        assert_eq!(
            verdict_line(true, "allowed: no ALLOW policy applies"),
            "ALLOW: no ALLOW policy applies"
        );
        assert_eq!(
            verdict_line(false, "plaintext refused by PeerAuthentication STRICT"),
            "DENY: plaintext refused by PeerAuthentication STRICT"
        );
    }

    const STATE: &str = "---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: n2, serviceAccountName: waypoint}
status: {podIP: 10.0.2.9, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: n1}
status: {podIP: 10.0.1.1, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80}]}
";

    fn explain_web(text: &str) -> Explanation {
        let (snapshot, _) = crate::source::local::testing::assemble_text(text);
        let mesh = MeshConfig {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
        };
        let here = Here {
            node: "n1",
            addresses: &[],
        };
        let to = "10.96.0.10:80".parse().expect("address");
        explain(
            &snapshot,
            &mesh,
            &ServiceBalancer::default(),
            &here,
            "shop/web-1",
            to,
        )
        .expect("explained")
    }

    #[test]
    fn a_service_behind_a_waypoint_is_explained_as_going_through_it() {
        let explanation = explain_web(STATE);
        assert_eq!(explanation.waypoint.as_deref(), Some("shop/waypoint"));
        let [path] = &explanation.paths[..] else {
            panic!("{explanation:?}")
        };
        assert_eq!(path.route, "waypoint");
        assert_eq!(path.endpoint, "10.0.2.9:15008".parse().expect("address"));
        assert_eq!(
            explanation.summary,
            "ALLOW: through waypoint shop/waypoint over HBONE; its policies and routes decide"
        );
        let gone = STATE.replace(
            "gatewayClassName: istio-waypoint",
            "gatewayClassName: istio",
        );
        assert_eq!(
            explain_web(&gone).summary,
            "waypoint shop/waypoint cannot be used (its namespace's label names waypoint shop/waypoint, which is not a valid istio-waypoint Gateway): the connection is reset"
        );
    }
}
