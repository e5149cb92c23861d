//! Inbound HBONE (port 15008): terminates mutual TLS as the destination workload, learns the
//! peer's SPIFFE identity, and serves each HTTP/2 CONNECT stream by authorizing it and
//! connecting to the destination pod from the real client address.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::{debug, warn};

use super::{
    accept,
    bridge::{self, Answer, Sender, Side},
    headers,
};
use crate::{
    identity::{Identity, tls},
    proxy::{
        ProxyContext,
        connections::{ConnectionInfo, Direction, Security},
        socket, upstream, workload_ref, workload_ref_at,
    },
};

pub async fn handle(ctx: Arc<ProxyContext>, tcp: TcpStream, peer: SocketAddr) {
    // Unauthenticated until the handshake is done: bounded in all and per source address,
    // refused with a reset past that (the client learns at once; nothing waits).
    let Ok(handshake) = ctx.limits.handshake(peer.ip()) else {
        socket::reset_on_close(&tcp);
        return;
    };
    let Ok(local) = tcp.local_addr() else { return };
    let snapshot = ctx.snapshot();
    let Some(destination) = ctx.local_enrolled(&snapshot, local.ip()) else {
        warn!(src = %peer, dst = %local, "tunnel connection for a pod that is not an enrolled pod of this node; refused");
        ctx.metrics.refused("tunnel", "unknown destination");
        return;
    };
    let Some(identity) = ctx.identity_of(destination) else {
        return;
    };
    // The tunnel lives long: it keeps no snapshot (each stream takes the current one).
    drop(snapshot);
    let cert = match ctx.certs.fetch(&identity).await {
        Ok(cert) => cert,
        Err(e) => {
            warn!(dst = %local, %identity, error = %e, "no certificate for the destination; refused");
            return;
        }
    };
    let config = match tls::server_config(&cert, ctx.certs.roots()) {
        Ok(config) => config,
        Err(e) => {
            warn!(dst = %local, %identity, error = %e, "TLS configuration failed; refused");
            return;
        }
    };
    let (tls, peer_cert) = match accept::tls(tcp, config).await {
        Ok(accepted) => accepted,
        Err(e) => {
            warn!(src = %peer, dst = %local, error = %e, "tunnel refused");
            ctx.metrics.refused("tunnel", e.reason());
            return;
        }
    };
    drop(handshake);
    let Ok(_tunnel) = ctx.limits.tunnel(&peer_cert.identity) else {
        socket::reset_on_close(tls.get_ref().0.get_ref());
        return;
    };
    let connection = match accept::http2(tls, ctx.limits.settings().streams_per_tunnel).await {
        Ok(c) => c,
        Err(e) => {
            warn!(src = %peer, error = %e, "tunnel refused");
            return;
        }
    };
    let peer_identity = peer_cert.identity.clone();
    debug!(src = %peer, %peer_identity, dst = %local, "tunnel accepted");
    let keepalive = ctx.keepalive;
    let ended = accept::serve(
        connection,
        keepalive,
        ctx.draining.clone(),
        |request, respond| {
            let ctx = ctx.clone();
            let peer = Peer {
                address: peer,
                identity: peer_cert.identity.clone(),
                serial: peer_cert.serial.clone(),
            };
            tokio::spawn(async move { stream(ctx, request, respond, peer).await });
        },
    )
    .await;
    match ended {
        accept::Ended::Closed => {}
        accept::Ended::Error(e) => debug!(src = %peer, error = %e, "tunnel ended"),
        accept::Ended::KeepaliveTimeout => {
            warn!(src = %peer, %peer_identity, timeout = ?keepalive.http2_timeout, "tunnel peer left a PING unanswered; closed");
            ctx.metrics.refused("tunnel", "keepalive timeout");
        }
    }
}

/// The authenticated other end of a tunnel.
struct Peer {
    address: SocketAddr,
    identity: Identity,
    serial: String,
}

async fn stream(
    ctx: Arc<ProxyContext>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: Peer,
) {
    let Peer {
        address: peer,
        identity: peer_identity,
        serial: peer_serial,
    } = peer;
    let target = match headers::parse_connect(&request) {
        Ok(t) => t,
        Err(e) => {
            let status = match e {
                headers::HeaderError::NotConnect(_) => StatusCode::METHOD_NOT_ALLOWED,
                _ => StatusCode::BAD_REQUEST,
            };
            warn!(src = %peer, %peer_identity, error = %e, status = status.as_u16(), "tunnel request refused");
            ctx.metrics.refused("tunnel", "bad request");
            reply(&mut respond, status);
            return;
        }
    };
    let snapshot = ctx.snapshot();
    let Some(destination) = ctx.local_enrolled(&snapshot, target.destination.ip()) else {
        warn!(src = %peer, %peer_identity, dst = %target.destination, "CONNECT to a destination that is not an enrolled pod of this node; refused");
        ctx.metrics.refused("tunnel", "unknown destination");
        reply(&mut respond, StatusCode::BAD_REQUEST);
        return;
    };
    let client = target.client(peer);
    let Ok(_permit) = ctx
        .limits
        .connection_to(client.ip(), target.destination.ip())
    else {
        reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    let info = ConnectionInfo {
        direction: Direction::Inbound,
        source: client,
        source_workload: workload_ref_at(&snapshot, client),
        source_identity: Some(peer_identity.to_string()),
        source_certificate_serial: Some(peer_serial),
        original_destination: target.destination,
        destination_service: None,
        destination_workload: Some(workload_ref(destination)),
        destination: target.destination,
        destination_identity: ctx.identity_of(destination).map(|i| i.to_string()),
        route: upstream::TUNNEL,
        security: Security::MutualTls,
    };
    let Some(mut guard) = ctx.admit(&snapshot, info, destination) else {
        reply(&mut respond, StatusCode::UNAUTHORIZED);
        return;
    };
    // A long stream must not pin the state it started under.
    drop(snapshot);
    let mut upstream = match upstream::direct(client, target.destination, &ctx.node_addresses).await
    {
        Ok(up) => up,
        Err(e) => {
            guard.fail(&e);
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let counts = guard.counts();
    let mut body = request.into_body();
    // A client that sent bytes right behind its CONNECT is not waiting for the 200: hand them
    // to the destination now, and let the 200 travel with its first bytes back.
    let send = match bridge::early_data(&mut body) {
        Some(early) => {
            if let Err(e) = upstream.write_all(&early).await {
                guard.fail(&e);
                reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                return;
            }
            counts
                .sent
                .fetch_add(early.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Sender::Deferred(respond)
        }
        None => match respond.send_response(Response::new(()), false) {
            Ok(send) => Sender::Ready(send),
            Err(e) => {
                guard.fail(e);
                return;
            }
        },
    };
    if let Err(e) = bridge::bridge(
        upstream,
        send,
        Answer::Ready(body),
        Bytes::new(),
        &counts,
        Side::Destination,
    )
    .await
    {
        guard.fail(e);
    }
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    let _ = respond.send_response(response, true);
}
