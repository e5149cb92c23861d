//! Outbound: a connection an enrolled pod opened, captured on its way out. It goes to the
//! original destination (or one of its Service's endpoints) through a tunnel, in-process, or
//! directly, and a failed connect moves on to the next endpoint.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    ProxyContext,
    connections::{ConnectionInfo, Direction, Security},
    forward,
    hbone::{
        bridge::{self, Answer, Side},
        pool::{PoolKey, TunnelError},
    },
    socket, upstream, workload_ref,
};

pub async fn handle(ctx: Arc<ProxyContext>, client: TcpStream, peer: SocketAddr) {
    // The transparent socket's local address is where the pod was connecting to.
    let Ok(original_destination) = client.local_addr() else {
        return;
    };
    let snapshot = ctx.snapshot();
    let source = match peer.ip() {
        std::net::IpAddr::V4(ip) => snapshot.workload_by_ip(ip),
        std::net::IpAddr::V6(_) => None,
    };
    let source_identity = source
        .filter(|w| w.is_enrolled())
        .and_then(|w| ctx.identity_of(w));
    let resolved = ctx.services.resolve(&snapshot, original_destination);
    debug!(src = %peer, dst = %original_destination, candidates = resolved.endpoints.len(), "outbound connection captured");

    let mut last_error = None;
    for endpoint in &resolved.endpoints {
        let destination_workload = endpoint.workload.filter(|w| w.is_enrolled());
        let destination_identity = destination_workload.and_then(|w| ctx.identity_of(w));
        let mut info = ConnectionInfo {
            direction: Direction::Outbound,
            source: peer,
            source_workload: source.map(workload_ref),
            source_identity: source_identity.as_ref().map(|i| i.to_string()),
            source_certificate_serial: None,
            original_destination,
            destination_service: resolved.service.clone(),
            destination_workload: endpoint.workload.map(workload_ref),
            destination: endpoint.address,
            destination_identity: destination_identity.as_ref().map(|i| i.to_string()),
            route: upstream::DIRECT,
            security: Security::None,
        };
        match (
            destination_workload.zip(destination_identity),
            &source_identity,
        ) {
            // Enrolled on both ends, same node: serve it here, under the destination's policy.
            (Some((dst, _)), Some(_)) if dst.node == ctx.node => {
                info.route = upstream::LOCAL;
                info.security = Security::MutualTls;
                let Some(mut guard) = ctx.admit(info, dst) else {
                    socket::reset_on_close(&client);
                    return;
                };
                match upstream::direct(peer, endpoint.address).await {
                    Ok(up) => {
                        if let Err(e) = forward::bidirectional(client, up, guard.counts()).await {
                            guard.fail(e);
                        }
                        return;
                    }
                    Err(e) => {
                        guard.fail(&e);
                        last_error = Some(e.to_string());
                    }
                }
            }
            // Enrolled destination elsewhere: HBONE to its node, as the source workload.
            (Some((_, dst_id)), Some(src_id)) => {
                info.route = upstream::TUNNEL;
                info.security = Security::MutualTls;
                let (SocketAddr::V4(peer4), std::net::IpAddr::V4(dst_ip)) =
                    (peer, endpoint.address.ip())
                else {
                    continue;
                };
                let key = PoolKey {
                    source: src_id.clone(),
                    source_ip: *peer4.ip(),
                    destination: dst_id,
                    address: std::net::SocketAddrV4::new(dst_ip, mesh_common::TUNNEL_PORT),
                };
                // With one possible destination the client's bytes follow the request at once
                // (those already sent ride in the request's packet); with several, wait for the
                // answer so a failure can move on to the next.
                let (opened, first) = if resolved.endpoints.len() == 1 {
                    let first = bridge::already_received(&client);
                    let opened = ctx
                        .pool
                        .connect_early(&key, endpoint.address, peer)
                        .await
                        .map(|s| (s.send, Answer::Pending(s.response), s.guard));
                    (opened, first)
                } else {
                    let opened = ctx
                        .pool
                        .connect(&key, endpoint.address, peer)
                        .await
                        .map(|s| (s.send, Answer::Ready(s.recv), s.guard));
                    (opened, Bytes::new())
                };
                match opened {
                    Ok((send, answer, stream_guard)) => {
                        let mut guard = ctx.connections.open(info);
                        let counts = guard.counts();
                        if let Err(e) =
                            bridge::bridge(client, send, answer, first, &counts, Side::Client).await
                        {
                            guard.fail(e);
                        }
                        drop(stream_guard);
                        return;
                    }
                    Err(TunnelError::Refused { status: 401, .. }) => {
                        // Denied at the destination: that node recorded and logged it.
                        warn!(src = %peer, dst = %endpoint.address, "connection denied by the destination's policy");
                        let mut guard = ctx.connections.open(info);
                        guard.fail("denied by the destination's policy");
                        socket::reset_on_close(&client);
                        return;
                    }
                    Err(e) => {
                        warn!(src = %peer, dst = %endpoint.address, error = %e, "tunnel failed");
                        let mut guard = ctx.connections.open(info);
                        guard.fail(&e);
                        last_error = Some(e.to_string());
                    }
                }
            }
            // Outside the mesh (or a source we cannot vouch for): plaintext, as before.
            _ => match upstream::direct(peer, endpoint.address).await {
                Ok(up) => {
                    let mut guard = ctx.connections.open(info);
                    if let Err(e) = forward::bidirectional(client, up, guard.counts()).await {
                        guard.fail(e);
                    }
                    return;
                }
                Err(e) => {
                    let mut guard = ctx.connections.open(info);
                    guard.fail(&e);
                    last_error = Some(e.to_string());
                }
            },
        }
    }
    if resolved.endpoints.is_empty() {
        warn!(src = %peer, dst = %original_destination, service = resolved.service.as_deref().unwrap_or("-"), "no ready endpoint");
        ctx.metrics.refused("outbound", "no endpoint");
    } else {
        debug!(src = %peer, dst = %original_destination, error = last_error.as_deref().unwrap_or("-"), "every endpoint failed");
    }
    socket::reset_on_close(&client);
}
