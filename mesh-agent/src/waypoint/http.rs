//! HTTP inside a CONNECT to a Service port the waypoint serves (HTTP/1.1 or HTTP/2, told apart
//! by the HTTP/2 preface): each request is routed by the Service's HTTPRoutes, changed by the
//! chosen rule's filters and sent to an endpoint of the backend it picks; the answer comes back
//! with the response filters applied. No route attached: the Service itself is the backend.

use std::{borrow::Cow, convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version as HttpVersion,
    header::{self, HeaderName},
    request::Parts,
};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tracing::{debug, warn};

use super::{
    WaypointContext,
    access_log::AccessLog,
    authorization,
    backends::{Body, Io, Target, Version},
    filters::{self, Origin},
    forward::{self, ForwardError, Sending},
    routing::{self, RequestView, Selection},
    telemetry::{CountedRequest, Exchange, RequestLabels, workload_labels},
    trace,
};
use crate::{
    identity::Identity,
    policy::ConnectionAttributes,
    state::{
        AppProtocol, Filter, HeaderModifier, Mirror, PathMatch, Redirect, Rewrite, Service,
        Snapshot,
    },
};

/// The client's side of one CONNECT: the Service port it dialed and who it is.
#[derive(Debug)]
pub struct Downstream {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub protocol: AppProtocol,
    /// The VIP:port the client dialed.
    pub address: SocketAddr,
    pub client: SocketAddr,
    pub client_identity: Identity,
    /// The connection as policy sees it (the client's address and principal, the VIP:port).
    pub connection: ConnectionAttributes,
    /// Istio's labels of the client's pod, found once per connection ([`workload_labels`]).
    pub source: [String; 6],
}

impl Downstream {
    pub fn new(
        (namespace, name, port): (String, String, u16),
        protocol: AppProtocol,
        address: SocketAddr,
        client: SocketAddr,
        client_identity: Identity,
    ) -> Downstream {
        let connection = crate::proxy::connection_attributes(
            client.ip(),
            Some(&client_identity.to_string()),
            address,
        );
        Downstream {
            namespace,
            name,
            port,
            protocol,
            address,
            client,
            client_identity,
            connection,
            source: std::array::from_fn(|_| "unknown".to_string()),
        }
    }

    /// The request's labels as far as they are known before it is answered.
    fn labels(&self, grpc: bool) -> RequestLabels {
        let [workload, namespace, app, version, canonical, revision] = self.source.clone();
        RequestLabels {
            reporter: "waypoint",
            source_workload: workload,
            source_workload_namespace: namespace,
            source_principal: self.client_identity.to_string(),
            source_app: app,
            source_version: version,
            source_canonical_service: canonical,
            source_canonical_revision: revision,
            source_cluster: CLUSTER,
            destination_workload: "unknown".into(),
            destination_workload_namespace: "unknown".into(),
            destination_principal: "unknown".into(),
            destination_app: "unknown".into(),
            destination_version: "unknown".into(),
            destination_service: self.host(),
            destination_service_name: self.name.clone(),
            destination_service_namespace: self.namespace.clone(),
            destination_canonical_service: "unknown".into(),
            destination_canonical_revision: "unknown".into(),
            destination_cluster: CLUSTER,
            request_protocol: if grpc { "grpc" } else { "http" },
            response_code: 0,
            grpc_response_status: String::new(),
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        }
    }

    /// Fills the destination labels from the pod at `endpoint`.
    fn label_destination(
        &self,
        ctx: &WaypointContext,
        labels: &mut RequestLabels,
        endpoint: SocketAddr,
    ) {
        let snapshot = ctx.snapshot();
        let workload = match endpoint.ip() {
            std::net::IpAddr::V4(ip) => snapshot.workload_by_ip(ip),
            std::net::IpAddr::V6(_) => None,
        };
        if let Some(identity) = workload.and_then(|w| ctx.identity_of(w)) {
            labels.destination_principal = identity.to_string();
        }
        let [workload, namespace, app, version, canonical, revision] = workload_labels(workload);
        labels.destination_workload = workload;
        labels.destination_workload_namespace = namespace;
        labels.destination_app = app;
        labels.destination_version = version;
        labels.destination_canonical_service = canonical;
        labels.destination_canonical_revision = revision;
    }

    /// The Service's host name, as Istio names it.
    fn host(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// Istio's name for the waypoint's cluster of this Service port.
    fn cluster_name(&self) -> String {
        format!("inbound-vip|{}|http|{}", self.port, self.host())
    }
}

/// Istio's default cluster name, for `*_cluster` labels.
const CLUSTER: &str = "Kubernetes";

/// Serves HTTP on `io` until the client closes it; on drain, HTTP/1.1 connections close after
/// the request in flight and HTTP/2 ones get GOAWAY.
pub async fn serve(ctx: Arc<WaypointContext>, io: impl Io, mut downstream: Downstream) {
    let mut draining = ctx.draining.clone();
    downstream.source = {
        let snapshot = ctx.snapshot();
        let client = match downstream.client.ip() {
            std::net::IpAddr::V4(ip) => snapshot.workload_by_ip(ip),
            std::net::IpAddr::V6(_) => None,
        };
        workload_labels(client)
    };
    let downstream = Arc::new(downstream);
    let service = {
        let downstream = downstream.clone();
        service_fn(move |request| {
            let (ctx, downstream) = (ctx.clone(), downstream.clone());
            async move { Ok::<_, Infallible>(handle(&ctx, &downstream, request).await) }
        })
    };
    let server = server();
    let connection = server.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = crate::shutdown::requested(&mut draining) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        debug!(src = %downstream.client, dst = %downstream.address, error = %e, "HTTP connection ended");
    }
}

/// Request headers beyond this many bytes are refused with 431 (the request line and headers
/// of HTTP/1.1, the decoded header list of HTTP/2), as Envoy's 60 KiB default does.
const MAX_HEADER_BYTES: usize = 60 * 1024;
/// Request headers beyond this many are refused with 431 (Envoy's default).
const MAX_HEADERS: usize = 100;
/// The time a client has to send a request's headers (slow clients hold nothing longer).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Concurrent requests on one HTTP/2 connection, as Istio's waypoint allows.
const MAX_STREAMS: u32 = 100;
/// Streams a client may open and reset before they are even served: past this, the connection
/// is closed with GOAWAY (ENHANCE_YOUR_CALM), the HTTP/2 rapid-reset defence (CVE-2023-44487).
const MAX_PENDING_RESETS: usize = 20;

/// The HTTP server of one client connection, with its limits.
fn server() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_STREAMS)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS);
    builder
}

/// One request, start to end, recorded when its answer has been sent.
async fn handle(
    ctx: &Arc<WaypointContext>,
    downstream: &Downstream,
    request: Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let mut exchange = Exchange::new(
        ctx.requests.clone(),
        downstream.labels(is_grpc(&parts)),
        ctx.access_log
            .then(|| AccessLog::of_request(&parts, downstream.address, downstream.client)),
    );
    let body = CountedRequest {
        body,
        received: exchange.received.clone(),
    }
    .boxed();
    let started = exchange.started;
    let (response, outcome) = respond(ctx, downstream, parts, body).await;
    if let Some(endpoint) = outcome.upstream {
        exchange.upstream_time = Some(started.elapsed().as_millis() as u64);
        downstream.label_destination(ctx, &mut exchange.labels, endpoint);
    }
    exchange.labels.response_flags = outcome.flags;
    if let Some(log) = exchange.log.as_mut() {
        log.details = outcome.details;
        log.upstream_host = outcome.upstream;
        log.route = outcome.route;
        log.upstream_cluster = Some(downstream.cluster_name());
    }
    exchange.finish(response)
}

/// How a request ended, for its telemetry.
struct Outcome {
    /// Envoy's response flags.
    flags: &'static str,
    /// Envoy's response code details.
    details: Cow<'static, str>,
    /// The endpoint that answered.
    upstream: Option<SocketAddr>,
    route: Option<String>,
}

impl Outcome {
    fn own(flags: &'static str, details: impl Into<Cow<'static, str>>) -> Outcome {
        Outcome {
            flags,
            details: details.into(),
            upstream: None,
            route: None,
        }
    }
}

/// Authenticates, authorizes, routes and forwards one request; the answer and how it came.
async fn respond(
    ctx: &Arc<WaypointContext>,
    downstream: &Downstream,
    mut parts: Parts,
    body: Body,
) -> (Response<Body>, Outcome) {
    normalize_path(&mut parts);
    let grpc = is_grpc(&parts);
    let auth = match authorization::authenticate(ctx, downstream, &mut parts).await {
        Ok(auth) => auth,
        Err(e) => {
            let details = format!("jwt_authn_access_denied{{{e}}}");
            let own = Own::Unauthenticated {
                grpc,
                why: e.to_string(),
            };
            return (own.response(false), Outcome::own("-", details));
        }
    };
    let decision = authorization::authorize(ctx, downstream, &parts, auth.as_ref());
    if !decision.allowed {
        let details = format!(
            "rbac_access_denied_matched_policy[{}]",
            decision.policy.as_deref().unwrap_or("none")
        );
        let own = Own::Forbidden { grpc };
        return (own.response(false), Outcome::own("-", details));
    }
    let plan = match plan(ctx, downstream, &mut parts) {
        Ok(plan) => plan,
        Err(own) => {
            let outcome = own.outcome();
            return (own.response(grpc), outcome);
        }
    };
    ensure_request_id(&mut parts.headers);
    trace::propagate(&mut parts.headers);
    let request = upstream_request(parts, body, plan.version);
    let sent = forward::forward(
        ctx,
        &plan.targets,
        plan.version,
        downstream.client,
        request,
        &plan.sending,
        plan.mirrors,
    )
    .await;
    let route = plan.route;
    match sent {
        Ok((target, response)) => {
            debug!(src = %downstream.client, dst = %downstream.address, endpoint = %target.address, status = response.status().as_u16(), "request served");
            let outcome = Outcome {
                flags: "-",
                details: Cow::Borrowed("via_upstream"),
                upstream: Some(target.address),
                route,
            };
            (
                downstream_response(response, &plan.response_headers),
                outcome,
            )
        }
        Err(ForwardError::Timeout) => {
            warn!(src = %downstream.client, dst = %downstream.address, "request timed out");
            let outcome = Outcome {
                route,
                ..Outcome::own("UT", "upstream_response_timeout")
            };
            (
                local_reply(
                    grpc,
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                ),
                outcome,
            )
        }
        Err(ForwardError::Backend(e)) => {
            warn!(src = %downstream.client, dst = %downstream.address, error = %e, "request failed");
            let (response, flags, details) = if e.is_connect_failure() {
                (
                    local_reply(
                        grpc,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error",
                    ),
                    "UF",
                    "upstream_reset_before_response_started{connection_failure}",
                )
            } else {
                (
                    local_reply(grpc, StatusCode::BAD_GATEWAY, "upstream request failed"),
                    "UR",
                    "upstream_reset_before_response_started{remote_reset}",
                )
            };
            let outcome = Outcome {
                route,
                ..Outcome::own(flags, details)
            };
            (response, outcome)
        }
    }
}

/// Where a request goes, decided from the state in one go (the state is not held while the
/// request is in flight).
struct Plan {
    targets: Vec<Target>,
    version: Version,
    /// Header changes for the response (the rule's, then the backend's).
    response_headers: Vec<HeaderModifier>,
    sending: Sending,
    /// Where copies go (RequestMirror filters that drew this request).
    mirrors: Vec<(Vec<Target>, Version)>,
    /// `<namespace>.<route>.<rule>`, when an HTTPRoute routed the request.
    route: Option<String>,
}

/// An answer of the waypoint's own, instead of an endpoint's.
enum Own {
    /// No rule of the attached routes matches: 404.
    NoRoute,
    /// No ready endpoint (or the Service is gone): 503.
    NoHealthyUpstream,
    /// The chosen rule's backend cannot be used (no backend, an unknown Service or port): 500,
    /// saying which.
    NoBackend(&'static str),
    Redirect(StatusCode, String),
    /// Denied by policy: 403, or gRPC's PERMISSION_DENIED for a gRPC request.
    Forbidden {
        grpc: bool,
    },
    /// A token that is not valid: 401 (gRPC's UNAUTHENTICATED) saying why.
    Unauthenticated {
        grpc: bool,
        why: String,
    },
}

impl Own {
    /// Envoy's response flags and details for this answer.
    fn outcome(&self) -> Outcome {
        match self {
            Own::NoRoute => Outcome::own("NR", "route_not_found"),
            Own::NoHealthyUpstream => Outcome::own("UH", "no_healthy_upstream"),
            Own::NoBackend(_) => Outcome::own("-", "cluster_not_found"),
            Own::Redirect(..) => Outcome::own("-", "direct_response"),
            Own::Forbidden { .. } | Own::Unauthenticated { .. } => Outcome::own("-", "-"),
        }
    }

    /// The answer; `grpc`: the request is gRPC and a status of the waypoint's own is told in
    /// gRPC's terms (Forbidden and Unauthenticated know that themselves).
    fn response(self, grpc: bool) -> Response<Body> {
        match self {
            Own::NoRoute => local_reply(grpc, StatusCode::NOT_FOUND, "route not found"),
            Own::NoHealthyUpstream => {
                local_reply(grpc, StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
            }
            Own::NoBackend(why) => local_reply(grpc, StatusCode::INTERNAL_SERVER_ERROR, why),
            Own::Forbidden { grpc: false } => {
                text(StatusCode::FORBIDDEN, authorization::DENIED_BODY)
            }
            Own::Forbidden { grpc: true } => grpc_status(
                GRPC_PERMISSION_DENIED,
                authorization::DENIED_BODY.to_owned(),
            ),
            Own::Unauthenticated { grpc: false, why } => {
                let mut response = text(StatusCode::UNAUTHORIZED, "");
                *response.body_mut() = Full::new(Bytes::from(why))
                    .map_err(|never| match never {})
                    .boxed();
                response
            }
            Own::Unauthenticated { grpc: true, why } => grpc_status(GRPC_UNAUTHENTICATED, why),
            Own::Redirect(status, location) => {
                let mut response = Response::new(empty());
                *response.status_mut() = status;
                if let Ok(location) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, location);
                }
                response
            }
        }
    }
}

/// Routes the request and applies its request filters to `parts`; an answer of the waypoint's
/// own (no route, a redirect, no backend) is the error.
fn plan(ctx: &WaypointContext, downstream: &Downstream, parts: &mut Parts) -> Result<Plan, Own> {
    let snapshot = ctx.snapshot();
    let service = snapshot
        .service(&downstream.namespace, &downstream.name)
        .ok_or(Own::NoHealthyUpstream)?;
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let selection = routing::select(
        routing::attached(&snapshot, service, downstream.port),
        &RequestView {
            method: parts.method.as_str(),
            path: &path,
            query: query.as_deref(),
            headers: &parts.headers,
        },
    );
    let mut changes = Changes::default();
    let mut sending = Sending::default();
    let mut route = None;
    let (backend, port) = match selection {
        Selection::Unrouted => (service, downstream.port),
        Selection::NoMatch => return Err(Own::NoRoute),
        Selection::Matched(matched) => {
            let rule = matched.rule;
            route = Some(format!(
                "{}.{}.{}",
                matched.route.namespace, matched.route.name, matched.rule_index
            ));
            let path_match = &matched.matched.path;
            apply_filters(&rule.filters, parts, path_match, downstream, &mut changes)?;
            let chosen = filters::choose_backend(&rule.backends, rand::random())
                .ok_or(Own::NoBackend("no backend"))?;
            apply_filters(&chosen.filters, parts, path_match, downstream, &mut changes)?;
            sending = sending_of(rule);
            let backend = snapshot
                .service(&chosen.service.namespace, &chosen.service.name)
                .ok_or(Own::NoBackend("backend service not found"))?;
            (backend, chosen.service.port.unwrap_or(downstream.port))
        }
    };
    let (targets, version) = endpoints(ctx, &snapshot, backend, port)?;
    let mirrors = changes
        .mirrors
        .iter()
        .filter(|mirror| rand::random_range(0..1_000_000) < mirror.per_million)
        .filter_map(|mirror| {
            let to = &mirror.backend;
            let service = snapshot.service(&to.namespace, &to.name)?;
            endpoints(ctx, &snapshot, service, to.port.unwrap_or(port)).ok()
        })
        .collect();
    Ok(Plan {
        targets,
        version,
        response_headers: changes.response_headers,
        sending,
        mirrors,
        route,
    })
}

/// A rule's timeouts and retry, as Istio turns them into Envoy's: `backendRequest` is each
/// try's limit when the rule retries, else a limit on the whole request like `request`. A
/// zero duration is no limit (Gateway API's `0s`).
fn sending_of(rule: &crate::state::RouteRule) -> Sending {
    let set = |limit: Option<std::time::Duration>| limit.filter(|d| !d.is_zero());
    let (request, backend) = (set(rule.request_timeout), set(rule.backend_timeout));
    match &rule.retry {
        Some(retry) => Sending {
            request_timeout: request,
            try_timeout: backend,
            retry: Some(retry.clone()),
        },
        None => Sending {
            request_timeout: match (request, backend) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            try_timeout: None,
            retry: None,
        },
    }
}

/// The ready endpoints of a Service port, and the HTTP version its `appProtocol` asks for.
fn endpoints(
    ctx: &WaypointContext,
    snapshot: &Snapshot,
    backend: &Service,
    port: u16,
) -> Result<(Vec<Target>, Version), Own> {
    let port = backend
        .ports
        .iter()
        .find(|p| p.port == port)
        .ok_or(Own::NoBackend("backend port not found"))?;
    let version = match port.app_protocol {
        AppProtocol::Http2 | AppProtocol::Grpc => Version::Http2,
        AppProtocol::Http | AppProtocol::Tcp => Version::Http1,
    };
    let targets: Vec<Target> = ctx
        .balancer
        .service_endpoints(snapshot, backend, port, true)
        .iter()
        .map(|endpoint| Target::of(ctx, endpoint))
        .collect();
    if targets.is_empty() {
        return Err(Own::NoHealthyUpstream);
    }
    Ok((targets, version))
}

/// What filters leave for after the request is routed.
#[derive(Default)]
struct Changes {
    /// Header changes for the response (the rule's, then the backend's).
    response_headers: Vec<HeaderModifier>,
    mirrors: Vec<Mirror>,
}

/// A rule's (or backend's) filters, in order: request changes go into `parts`, response
/// changes into `response_headers`; a redirect answers at once.
fn apply_filters(
    list: &[Filter],
    parts: &mut Parts,
    matched: &PathMatch,
    downstream: &Downstream,
    changes: &mut Changes,
) -> Result<(), Own> {
    for filter in list {
        match filter {
            Filter::RequestHeaders(modifier) => {
                filters::modify_headers(&mut parts.headers, modifier)
            }
            Filter::ResponseHeaders(modifier) => changes.response_headers.push(modifier.clone()),
            Filter::Redirect(redirect) => {
                return Err(redirect_to(redirect, matched, parts, downstream));
            }
            Filter::Rewrite(rewrite) => rewrite_request(rewrite, matched, parts),
            Filter::Mirror(mirror) => changes.mirrors.push(mirror.clone()),
        }
    }
    Ok(())
}

/// The host the client asked for: `:authority` (HTTP/2) or `Host` (HTTP/1.1).
pub fn request_host(parts: &Parts) -> Option<&str> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| parts.headers.get(header::HOST)?.to_str().ok())
}

fn without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: the port, if any, follows the bracket.
        return match rest.find(']') {
            Some(end) => &host[..end + 2],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn redirect_to(
    redirect: &Redirect,
    matched: &PathMatch,
    parts: &Parts,
    downstream: &Downstream,
) -> Own {
    let host = request_host(parts).map(without_port).unwrap_or_default();
    let location = filters::redirect_location(
        redirect,
        matched,
        &Origin {
            scheme: "http",
            host,
            port: downstream.port,
            path: parts.uri.path(),
            query: parts.uri.query(),
        },
    );
    Own::Redirect(
        StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND),
        location,
    )
}

fn rewrite_request(rewrite: &Rewrite, matched: &PathMatch, parts: &mut Parts) {
    if let Some(hostname) = &rewrite.hostname {
        set_host(parts, hostname);
    }
    if let Some(modifier) = &rewrite.path {
        let path = filters::rewrite_path(modifier, matched, parts.uri.path());
        let path_and_query = match parts.uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = path_and_query.parse().ok();
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
    }
}

/// Replaces the request's host, wherever its version keeps it.
fn set_host(parts: &mut Parts, host: &str) {
    if parts.uri.authority().is_some() {
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.authority = host.parse().ok();
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
    }
    if let Ok(value) = HeaderValue::from_str(host) {
        parts.headers.insert(header::HOST, value);
    }
}

/// Headers that belong to one connection (RFC 9110 section 7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
];

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Gives a request without `x-request-id` a fresh one (a random UUID, version 4), as Istio's
/// waypoint does, so the request can be followed through the endpoints' logs; one the client
/// sent is kept.
fn ensure_request_id(headers: &mut HeaderMap) {
    if headers.contains_key(REQUEST_ID) {
        return;
    }
    let bits = rand::random::<u128>();
    // Version 4 and the RFC 4122 variant in their places.
    let uuid = (bits & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let text = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        uuid >> 96,
        (uuid >> 80) & 0xffff,
        (uuid >> 64) & 0xffff,
        (uuid >> 48) & 0xffff,
        uuid & 0xffff_ffff_ffff
    );
    if let Ok(value) = HeaderValue::from_str(&text) {
        headers.insert(REQUEST_ID, value);
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the `Connection` header names are the connection's too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(HeaderName::from_static("proxy-connection"));
    // `te: trailers` is how gRPC says it reads trailers; any other TE is the connection's.
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// The request as the endpoint gets it, in the version it speaks: HTTP/1.1 in origin form with
/// `Host`, HTTP/2 with the host as `:authority`.
fn upstream_request(mut parts: Parts, body: Body, version: Version) -> Request<Body> {
    strip_hop_by_hop(&mut parts.headers);
    let host = request_host(&parts).map(str::to_owned);
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let mut uri = http::uri::Parts::default();
    uri.path_and_query = Some(path_and_query);
    match version {
        Version::Http1 => {
            parts.version = HttpVersion::HTTP_11;
            if let Some(value) = host.and_then(|h| HeaderValue::from_str(&h).ok()) {
                parts.headers.insert(header::HOST, value);
            }
        }
        Version::Http2 => {
            parts.version = HttpVersion::HTTP_2;
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = host.and_then(|h| h.parse().ok());
            parts.headers.remove(header::HOST);
        }
    }
    parts.uri = Uri::from_parts(uri).unwrap_or_default();
    Request::from_parts(parts, body)
}

fn downstream_response(response: Response<Body>, modifiers: &[HeaderModifier]) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    for modifier in modifiers {
        filters::modify_headers(&mut parts.headers, modifier);
    }
    Response::from_parts(parts, body)
}

/// Whether the request is gRPC (its content type says so), to be answered in gRPC's terms.
fn is_grpc(parts: &Parts) -> bool {
    parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// The waypoint's own answer: text, or for a gRPC request a gRPC status with the text as its
/// message, by Envoy's mapping of HTTP statuses to gRPC ones (a client reading only gRPC
/// statuses sees 404 as UNIMPLEMENTED, a refused or failed upstream as UNAVAILABLE).
fn local_reply(grpc: bool, status: StatusCode, body: &'static str) -> Response<Body> {
    if !grpc {
        return text(status, body);
    }
    let code = match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => GRPC_PERMISSION_DENIED,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    };
    grpc_status(code, body.to_owned())
}

const GRPC_PERMISSION_DENIED: u16 = 7;
const GRPC_UNAUTHENTICATED: u16 = 16;

/// A gRPC answer with no message ("trailers only"): HTTP 200, the status in the headers, as
/// Envoy turns its own 403 and 401 into gRPC statuses.
fn grpc_status(code: u16, message: String) -> Response<Body> {
    let mut response = Response::new(empty());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(message) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", message);
    }
    response
}

/// Removes `.` and `..` segments from the request's path (RFC 3986 section 5.2.4), as Istio's
/// default path normalization does before policy and routing see it, so `/public/../admin`
/// is `/admin` to both and to the endpoint.
pub fn normalize_path(parts: &mut Parts) {
    let path = parts.uri.path();
    if !path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return;
    }
    let normalized = super::path::remove_dot_segments(path);
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized,
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = path_and_query.parse().ok();
    parts.uri = Uri::from_parts(uri).unwrap_or_default();
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// An answer of the waypoint's own.
fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(request: Request<()>) -> Parts {
        request.into_parts().0
    }

    #[test]
    fn a_missing_request_id_is_made_and_a_given_one_kept() {
        let mut headers = HeaderMap::new();
        ensure_request_id(&mut headers);
        let id = headers["x-request-id"].to_str().expect("ascii").to_owned();
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{id}"
        );
        assert!(groups[2].starts_with('4'), "version 4: {id}");
        assert!(
            matches!(&groups[3][..1], "8" | "9" | "a" | "b"),
            "RFC 4122 variant: {id}"
        );
        let mut again = HeaderMap::new();
        ensure_request_id(&mut again);
        assert_ne!(again["x-request-id"], headers["x-request-id"]);
        ensure_request_id(&mut headers);
        assert_eq!(
            headers["x-request-id"].to_str().expect("ascii"),
            id,
            "a given id is kept"
        );
    }

    #[test]
    fn the_waypoints_own_answers_are_grpc_statuses_for_grpc() {
        for (status, code) in [
            (StatusCode::NOT_FOUND, "12"),
            (StatusCode::SERVICE_UNAVAILABLE, "14"),
            (StatusCode::GATEWAY_TIMEOUT, "14"),
            (StatusCode::INTERNAL_SERVER_ERROR, "2"),
        ] {
            let reply = local_reply(true, status, "route not found");
            assert_eq!(reply.status(), StatusCode::OK, "{status}");
            assert_eq!(reply.headers()["grpc-status"], code, "{status}");
            assert_eq!(reply.headers()["grpc-message"], "route not found");
            assert_eq!(reply.headers()["content-type"], "application/grpc");
        }
        let plain = local_reply(false, StatusCode::NOT_FOUND, "route not found");
        assert_eq!(plain.status(), StatusCode::NOT_FOUND);
        assert!(!plain.headers().contains_key("grpc-status"));
    }

    #[test]
    fn hosts_lose_their_port_for_redirects() {
        assert_eq!(without_port("example.com:8080"), "example.com");
        assert_eq!(without_port("example.com"), "example.com");
        assert_eq!(without_port("[::1]:80"), "[::1]");
        assert_eq!(without_port("[::1]"), "[::1]");
    }

    /// HTTP/2 in, HTTP/1.1 out: the authority becomes `Host`, the target origin form, and
    /// connection headers stay behind.
    #[test]
    fn an_http2_request_goes_out_as_http1_with_its_host() {
        let request = Request::builder()
            .version(HttpVersion::HTTP_2)
            .uri("http://echo.shop:80/a/b?x=1")
            .header("connection", "close, x-private")
            .header("x-private", "1")
            .header("te", "gzip")
            .header("x-kept", "yes")
            .body(())
            .expect("request");
        let out = upstream_request(parts(request), empty(), Version::Http1);
        assert_eq!(out.version(), HttpVersion::HTTP_11);
        assert_eq!(out.uri().to_string(), "/a/b?x=1");
        assert_eq!(out.headers()["host"], "echo.shop:80");
        assert_eq!(out.headers()["x-kept"], "yes");
        for gone in ["connection", "x-private", "te"] {
            assert!(!out.headers().contains_key(gone), "{gone} was forwarded");
        }
    }

    /// HTTP/1.1 in, HTTP/2 out (a gRPC port): `Host` becomes `:authority`, `te: trailers` stays.
    #[test]
    fn an_http1_request_goes_out_as_http2_with_its_authority() {
        let request = Request::builder()
            .uri("/pkg.Service/Method")
            .header("host", "grpc.shop:7070")
            .header("te", "trailers")
            .body(())
            .expect("request");
        let out = upstream_request(parts(request), empty(), Version::Http2);
        assert_eq!(out.version(), HttpVersion::HTTP_2);
        assert_eq!(
            out.uri().to_string(),
            "http://grpc.shop:7070/pkg.Service/Method"
        );
        assert!(!out.headers().contains_key("host"));
        assert_eq!(out.headers()["te"], "trailers");
    }

    #[test]
    fn a_rewrite_changes_host_and_path_and_keeps_the_query() {
        let mut parts = parts(
            Request::builder()
                .uri("/prefix/one?x=1")
                .header("host", "echo")
                .body(())
                .expect("request"),
        );
        let rewrite = Rewrite {
            hostname: Some("elsewhere".into()),
            path: Some(crate::state::PathModifier::Prefix("/".into())),
        };
        rewrite_request(&rewrite, &PathMatch::Prefix("/prefix".into()), &mut parts);
        assert_eq!(parts.uri.to_string(), "/one?x=1");
        assert_eq!(parts.headers["host"], "elsewhere");
    }
}
