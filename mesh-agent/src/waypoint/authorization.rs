//! L7 authorization at the waypoint: a request's attributes, Istio's decision over the
//! AuthorizationPolicies attached to this waypoint, the Service or the `istio-waypoint` class,
//! and what the client is told when it is denied.

use http::request::Parts;
use tracing::warn;

use super::{WaypointContext, http::Downstream};
use crate::{
    metrics::DenialLabels,
    policy::{self, Decision, RequestAttributes, RequestAuth, WaypointTarget},
};

/// The body of Istio's denial, the text its tests look for.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// Decides `parts` (its path already normalized) with `auth` from its JWT, if any. A denial is
/// logged and counted with the deciding policy's name.
pub fn authorize(
    ctx: &WaypointContext,
    downstream: &Downstream,
    parts: &Parts,
    auth: Option<&RequestAuth>,
) -> Decision {
    let snapshot = ctx.snapshot();
    let request = attributes(downstream, parts, auth);
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
        let policy = decision.policy.as_deref().unwrap_or("default");
        warn!(
            src = %downstream.client,
            dst = %downstream.address,
            service = %format!("{}/{}", downstream.namespace, downstream.name),
            method = %parts.method,
            path = %parts.uri.path(),
            policy,
            reason = %decision.reason,
            "request denied"
        );
        ctx.metrics
            .denied
            .get_or_create(&DenialLabels {
                reporter: "waypoint",
                destination_workload: downstream.name.clone(),
                destination_workload_namespace: downstream.namespace.clone(),
                source_principal: downstream.client_identity.to_string(),
                policy: policy.to_string(),
                reason: "authorization",
            })
            .inc();
    }
    decision
}

/// What policy sees of a request: the client's connection as the tunnel told it, and the
/// request line, host and headers.
pub fn attributes<'a>(
    downstream: &'a Downstream,
    parts: &'a Parts,
    auth: Option<&'a RequestAuth>,
) -> RequestAttributes<'a> {
    RequestAttributes {
        connection: &downstream.connection,
        remote_ip: downstream.client.ip(),
        method: parts.method.as_str(),
        path: parts.uri.path(),
        host: super::http::request_host(parts).unwrap_or_default(),
        headers: &parts.headers,
        auth,
    }
}
