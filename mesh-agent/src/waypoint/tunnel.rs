//! HBONE into the waypoint (port 15008): mutual TLS as the waypoint's own identity, then one
//! CONNECT stream per client connection, whose `:authority` is what the client dialed — a
//! Service VIP:port, or a pod's ip:port for a pod that uses the waypoint itself. A Service
//! port that carries HTTP is served request by request ([`super::http`]); anything else is
//! passed as bytes to one endpoint.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    WaypointContext, authorization,
    backends::{self, Target},
    http::{self as serve_http, Downstream},
};
use crate::{
    identity::{Identity, tls},
    proxy::{
        hbone::{accept, headers, stream_io::StreamIo},
        upstream::Endpoint,
    },
    state::AppProtocol,
};

/// Concurrent CONNECT streams per tunnel, as Istio's waypoint allows.
const MAX_STREAMS: u32 = 100;

pub async fn handle(ctx: Arc<WaypointContext>, tcp: TcpStream, peer: SocketAddr) {
    let cert = match ctx.certs.fetch(&ctx.identity).await {
        Ok(cert) => cert,
        Err(e) => {
            warn!(src = %peer, identity = %ctx.identity, error = %e, "no certificate for the waypoint; refused");
            return;
        }
    };
    let config = match tls::server_config(&cert, ctx.certs.roots()) {
        Ok(config) => config,
        Err(e) => {
            warn!(src = %peer, error = %e, "TLS configuration failed; refused");
            return;
        }
    };
    let (tls, client) = match accept::tls(tcp, config).await {
        Ok(accepted) => accepted,
        Err(e) => {
            warn!(src = %peer, error = %e, "tunnel refused");
            ctx.metrics.refused("waypoint", e.reason());
            return;
        }
    };
    let connection = match accept::http2(tls, MAX_STREAMS).await {
        Ok(c) => c,
        Err(e) => {
            warn!(src = %peer, error = %e, "tunnel refused");
            return;
        }
    };
    debug!(src = %peer, peer_identity = %client.identity, "tunnel accepted");
    let ended = accept::serve(
        connection,
        ctx.keepalive,
        ctx.draining.clone(),
        |request, respond| {
            let (ctx, identity) = (ctx.clone(), client.identity.clone());
            tokio::spawn(async move { stream(ctx, request, respond, peer, identity).await });
        },
    )
    .await;
    match ended {
        accept::Ended::Closed => {}
        accept::Ended::Error(e) => debug!(src = %peer, error = %e, "tunnel ended"),
        accept::Ended::KeepaliveTimeout => {
            warn!(src = %peer, "tunnel peer left a PING unanswered; closed");
        }
    }
}

/// Where a CONNECT goes, as this waypoint serves it.
enum Destination {
    /// A port of a Service that uses this waypoint.
    Service {
        namespace: String,
        name: String,
        port: u16,
        protocol: AppProtocol,
    },
    /// A pod that uses this waypoint, addressed directly.
    Workload,
}

async fn stream(
    ctx: Arc<WaypointContext>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    peer_identity: Identity,
) {
    let target = match headers::parse_connect(&request) {
        Ok(t) => t,
        Err(e) => {
            let status = match e {
                headers::HeaderError::NotConnect(_) => StatusCode::METHOD_NOT_ALLOWED,
                _ => StatusCode::BAD_REQUEST,
            };
            warn!(src = %peer, %peer_identity, error = %e, "tunnel request refused");
            ctx.metrics.refused("waypoint", "bad request");
            reply(&mut respond, status);
            return;
        }
    };
    let Some(destination) = destination(&ctx, target.destination) else {
        warn!(src = %peer, %peer_identity, dst = %target.destination, "CONNECT to a destination this waypoint does not serve; refused");
        ctx.metrics.refused("waypoint", "not served here");
        reply(&mut respond, StatusCode::BAD_REQUEST);
        return;
    };
    let client = target.client(peer);
    if let Some(service) = destination.tcp_service() {
        // TCP is decided once, before the tunnel is answered; HTTP request by request.
        let conn = crate::proxy::connection_attributes(
            client.ip(),
            Some(&peer_identity.to_string()),
            target.destination,
        );
        let decision = authorization::authorize_connection(&ctx, service, &conn, &peer_identity);
        if !decision.allowed {
            // As ztunnel answers a CONNECT its policy denies.
            reply(&mut respond, StatusCode::UNAUTHORIZED);
            return;
        }
    }
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            debug!(src = %peer, error = %e, "CONNECT answer failed");
            return;
        }
    };
    let io = StreamIo::new(send, request.into_body());
    match destination {
        Destination::Service {
            namespace,
            name,
            port,
            protocol: protocol @ (AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc),
        } => {
            let downstream = Downstream::new(
                (namespace, name, port),
                protocol,
                target.destination,
                client,
                peer_identity,
            );
            serve_http::serve(ctx, io, downstream).await;
        }
        Destination::Service { .. } | Destination::Workload => {
            pass_tcp(&ctx, io, target.destination, client).await;
        }
    }
}

impl Destination {
    /// For traffic passed as TCP, the Service it is for (`None` for a pod); `None` outside
    /// for HTTP, which is authorized request by request.
    fn tcp_service(&self) -> Option<Option<(&str, &str)>> {
        match self {
            Destination::Service {
                protocol: AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc,
                ..
            } => None,
            Destination::Service {
                namespace, name, ..
            } => Some(Some((namespace, name))),
            Destination::Workload => Some(None),
        }
    }
}

/// What `address` (a CONNECT's authority) is for this waypoint, if it serves it.
fn destination(ctx: &WaypointContext, address: SocketAddr) -> Option<Destination> {
    let snapshot = ctx.snapshot();
    let SocketAddr::V4(v4) = address else {
        return None;
    };
    if let Some(service) = snapshot.service_by_ip(*v4.ip()) {
        let port = service.ports.iter().find(|p| p.port == address.port())?;
        return ctx
            .serves_service(&snapshot, service)
            .then(|| Destination::Service {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                port: port.port,
                protocol: port.app_protocol,
            });
    }
    let workload = snapshot.workload_by_ip(*v4.ip())?;
    ctx.serves_workload(&snapshot, workload)
        .then_some(Destination::Workload)
}

/// Bytes both ways between the client's stream and one endpoint of `address`: the first of the
/// Service's endpoints that accepts, or the pod itself.
async fn pass_tcp(
    ctx: &WaypointContext,
    mut io: StreamIo,
    address: SocketAddr,
    client: SocketAddr,
) {
    let targets: Vec<Target> = {
        let snapshot = ctx.snapshot();
        let SocketAddr::V4(v4) = address else { return };
        match snapshot.service_by_ip(*v4.ip()).and_then(|service| {
            let port = service.ports.iter().find(|p| p.port == address.port())?;
            Some(
                ctx.balancer
                    .service_endpoints(&snapshot, service, port, true),
            )
        }) {
            Some(endpoints) => endpoints.iter().map(|e| Target::of(ctx, e)).collect(),
            None => vec![Target::of(
                ctx,
                &Endpoint {
                    address,
                    workload: snapshot.workload_by_ip(*v4.ip()),
                },
            )],
        }
    };
    if targets.is_empty() {
        warn!(src = %client, dst = %address, "no ready endpoint");
        ctx.metrics.refused("waypoint", "no endpoint");
        return;
    }
    for target in &targets {
        match backends::connect(ctx, target, client).await {
            Ok(mut upstream) => {
                if let Err(e) = tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
                    debug!(src = %client, dst = %target.address, error = %e, "TCP through the waypoint ended");
                }
                return;
            }
            Err(e) => warn!(src = %client, dst = %target.address, error = %e, "endpoint failed"),
        }
    }
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    let _ = respond.send_response(response, true);
}
