//! Authentication and L7 authorization at the waypoint, in Istio's filter order: the JWT
//! RequestAuthentications attached to this waypoint, the Service or the `istio-waypoint` class
//! validate the request's token, then the AuthorizationPolicies attached there decide it on its
//! attributes. Refusals are logged and counted with their reason.

use http::request::Parts;
use tracing::warn;

use super::{WaypointContext, http::Downstream, jwt::JwtError};
use crate::{
    identity::Identity,
    metrics::DenialLabels,
    policy::{
        self, ConnectionAttributes, Decision, RequestAttributes, RequestAuth, WaypointTarget,
    },
    state::{RequestAuthentication, waypoint_request_authentications},
};

/// The body of Istio's denial, the text its tests look for.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// Validates the request's JWT against the RequestAuthentications attached here: the identity
/// it gives, or why it is refused (401). Without attached policies nothing is looked at.
pub async fn authenticate(
    ctx: &WaypointContext,
    downstream: &Downstream,
    parts: &mut Parts,
) -> Result<Option<RequestAuth>, JwtError> {
    let snapshot = ctx.snapshot();
    let policies: Vec<&RequestAuthentication> = waypoint_request_authentications(
        &snapshot,
        &ctx.mesh.root_namespace,
        WaypointTarget {
            gateway: &ctx.gateway,
            service: Some((&downstream.namespace, &downstream.name)),
        },
    )
    .collect();
    if policies.is_empty() {
        return Ok(None);
    }
    let authenticated = ctx.authenticator.authenticate(&policies, parts).await;
    if let Err(e) = &authenticated {
        warn!(
            src = %downstream.client,
            dst = %downstream.address,
            service = %format!("{}/{}", downstream.namespace, downstream.name),
            path = %parts.uri.path(),
            error = %e,
            "request refused: bad token"
        );
        let decision = Decision {
            allowed: false,
            policy: None,
            rule: None,
            reason: e.to_string(),
            dry_run: Vec::new(),
        };
        count(
            ctx,
            &decision,
            Some((&downstream.namespace, &downstream.name)),
            &downstream.client_identity,
            "jwt",
        );
    }
    authenticated
}

/// Decides `parts` (its path already normalized) with `auth` from its JWT, if any. A denial is
/// logged and counted with the deciding policy's name.
pub fn authorize(
    ctx: &WaypointContext,
    downstream: &Downstream,
    parts: &Parts,
    auth: Option<&RequestAuth>,
) -> Decision {
    let snapshot = ctx.snapshot();
    let request = request_attributes(&downstream.connection, parts, auth);
    let decision = policy::authorize_request(
        &snapshot,
        &ctx.mesh.root_namespace,
        WaypointTarget {
            gateway: &ctx.gateway,
            service: Some((&downstream.namespace, &downstream.name)),
        },
        &request,
    );
    if !decision.allowed {
        let service = format!("{}/{}", downstream.namespace, downstream.name);
        warn!(
            src = %downstream.client,
            dst = %downstream.address,
            service,
            method = %parts.method,
            path = %parts.uri.path(),
            policy = decision.policy.as_deref().unwrap_or("-"),
            reason = %decision.reason,
            "request denied"
        );
        count(
            ctx,
            &decision,
            Some((&downstream.namespace, &downstream.name)),
            &downstream.client_identity,
            "authorization",
        );
    }
    decision
}

/// Decides a TCP connection through the waypoint to `service` (or a pod, `None`), with L4
/// semantics; logged and counted as [`authorize`] does.
pub fn authorize_connection(
    ctx: &WaypointContext,
    service: Option<(&str, &str)>,
    conn: &ConnectionAttributes,
    client_identity: &Identity,
) -> Decision {
    let snapshot = ctx.snapshot();
    let decision = policy::authorize_at_waypoint(
        &snapshot,
        &ctx.mesh.root_namespace,
        WaypointTarget {
            gateway: &ctx.gateway,
            service,
        },
        conn,
    );
    if !decision.allowed {
        warn!(
            src = %conn.source_ip,
            dst = %std::net::SocketAddr::from((conn.destination_ip, conn.destination_port)),
            policy = decision.policy.as_deref().unwrap_or("-"),
            reason = %decision.reason,
            "connection denied"
        );
        count(ctx, &decision, service, client_identity, "authorization");
    }
    decision
}

/// Counts a refusal in `mesh_agent_requests_denied_total`, by Service and deciding policy.
pub fn count(
    ctx: &WaypointContext,
    decision: &Decision,
    service: Option<(&str, &str)>,
    client_identity: &Identity,
    reason: &'static str,
) {
    let (namespace, name) = service.unwrap_or(("-", "-"));
    ctx.metrics
        .requests_denied
        .get_or_create(&DenialLabels {
            reporter: "waypoint",
            destination_workload: name.to_string(),
            destination_workload_namespace: namespace.to_string(),
            source_principal: client_identity.to_string(),
            policy: decision.policy.clone().unwrap_or_else(|| "default".into()),
            reason,
        })
        .inc();
}

/// What policy sees of a request: the client's connection as the tunnel told it, and the
/// request line, host and headers. The remote IP is the source IP: the mesh trusts no proxy
/// hop in front of the client.
pub fn request_attributes<'a>(
    connection: &'a ConnectionAttributes,
    parts: &'a Parts,
    auth: Option<&'a RequestAuth>,
) -> RequestAttributes<'a> {
    RequestAttributes {
        connection,
        remote_ip: connection.source_ip.into(),
        method: parts.method.as_str(),
        path: parts.uri.path(),
        host: super::http::request_host(parts).unwrap_or_default(),
        headers: &parts.headers,
        auth,
    }
}
