//! `mesh-agent explain` for HTTP: what a waypoint would do with one request — its token, the
//! policy rule that decides, the route and the backends — computed with the functions the
//! waypoint itself uses ([`super::http`] calls the same normalization, token validation,
//! authorization and route selection, in the same order).

use http::{HeaderMap, Method, Request, request::Parts};
use serde::Serialize;

use super::{authorization::request_attributes, http::normalize_path, jwt::Authenticator, routing};
use crate::{
    policy::{self, ConnectionAttributes, Decision, WaypointTarget},
    state::{
        Filter, RequestAuthentication, Service, Snapshot, WaypointRef,
        waypoint_request_authentications,
    },
};

/// The request to explain.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// A token goes here as `authorization: Bearer ...`, where the waypoint looks by default.
    pub headers: HeaderMap,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpExplanation {
    pub waypoint: String,
    pub service: String,
    pub port: u16,
    pub method: String,
    /// The path as policy and routes see it (dot segments removed).
    pub path: String,
    /// `no token`, `token accepted`, or why it is refused.
    pub authentication: String,
    /// `<iss>/<sub>` of an accepted token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_principal: Option<String>,
    /// The L7 authorization decision (absent when the token was refused first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// `<namespace>.<route>.<rule>` of the HTTPRoute rule that matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Where the request may go, with the weights of the choice.
    pub backends: Vec<WeightedBackend>,
    /// The waypoint's own answer (401, 403, 404, 500, a redirect's 30x); `None`: the request
    /// goes to a backend.
    pub status: Option<u16>,
    pub summary: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct WeightedBackend {
    /// `namespace/name:port`.
    pub service: String,
    pub weight: u32,
}

/// What the waypoint `gateway` would do with `request` to `service`'s `port`, arriving on a
/// connection `conn`.
#[allow(clippy::too_many_arguments)]
pub async fn explain_request(
    snapshot: &Snapshot,
    root: &str,
    gateway: &WaypointRef,
    service: &Service,
    port: u16,
    conn: &ConnectionAttributes,
    request: HttpRequest,
    authenticator: &Authenticator,
) -> HttpExplanation {
    let mut parts = parts_of(request);
    normalize_path(&mut parts);
    let mut explanation = HttpExplanation {
        waypoint: gateway.to_string(),
        service: format!("{}/{}", service.namespace, service.name),
        port,
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        authentication: "no token".into(),
        request_principal: None,
        decision: None,
        route: None,
        backends: Vec::new(),
        status: None,
        summary: String::new(),
    };
    let target = WaypointTarget {
        gateway,
        service: Some((&service.namespace, &service.name)),
    };
    let policies: Vec<&RequestAuthentication> =
        waypoint_request_authentications(snapshot, root, target).collect();
    let auth = if policies.is_empty() {
        None
    } else {
        match authenticator.authenticate(&policies, &mut parts).await {
            Ok(auth) => auth,
            Err(e) => {
                explanation.authentication = format!("refused: {e}");
                explanation.status = Some(401);
                explanation.summary = format!("answered 401 by the waypoint: {e}");
                return explanation;
            }
        }
    };
    if let Some(auth) = &auth {
        explanation.authentication = "token accepted".into();
        explanation.request_principal = Some(auth.principal.clone());
    }
    let decision = policy::authorize_request(
        snapshot,
        root,
        target,
        &request_attributes(conn, &parts, auth.as_ref()),
    );
    let allowed = decision.allowed;
    let reason = decision.reason.clone();
    explanation.decision = Some(decision);
    if !allowed {
        explanation.status = Some(403);
        explanation.summary = format!("answered 403 RBAC: access denied by the waypoint: {reason}");
        return explanation;
    }
    let query = parts.uri.query().map(str::to_owned);
    let selection = routing::select(
        routing::attached(snapshot, service, port),
        &routing::RequestView {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: query.as_deref(),
            headers: &parts.headers,
        },
    );
    match selection {
        routing::Selection::Unrouted => {
            explanation.backends.push(WeightedBackend {
                service: format!("{}/{}:{port}", service.namespace, service.name),
                weight: 1,
            });
            explanation.summary =
                format!("{reason}; no route attached: forwarded to the service itself");
        }
        routing::Selection::NoMatch => {
            explanation.status = Some(404);
            explanation.summary = format!("{reason}; no route rule matches: answered 404");
        }
        routing::Selection::Matched(matched) => {
            let name = format!(
                "{}.{}.{}",
                matched.route.namespace, matched.route.name, matched.rule_index
            );
            explanation.route = Some(name.clone());
            let redirect = matched.rule.filters.iter().find_map(|f| match f {
                Filter::Redirect(redirect) => Some(redirect.status),
                _ => None,
            });
            explanation.backends = matched
                .rule
                .backends
                .iter()
                .filter(|b| b.weight > 0)
                .map(|b| WeightedBackend {
                    service: format!(
                        "{}/{}:{}",
                        b.service.namespace,
                        b.service.name,
                        b.service.port.unwrap_or(port)
                    ),
                    weight: b.weight,
                })
                .collect();
            explanation.summary = match redirect {
                Some(status) => {
                    explanation.status = Some(status);
                    format!("{reason}; route {name} redirects: answered {status}")
                }
                None if explanation.backends.is_empty() => {
                    explanation.status = Some(500);
                    format!("{reason}; route {name} has no usable backend: answered 500")
                }
                None => format!("{reason}; route {name} forwards it"),
            };
        }
    }
    explanation
}

fn parts_of(request: HttpRequest) -> Parts {
    let mut built = Request::new(());
    *built.method_mut() = request.method;
    *built.uri_mut() = request
        .path
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"));
    *built.headers_mut() = request.headers;
    built.into_parts().0
}
