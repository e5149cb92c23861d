//! Outbound: a connection an enrolled pod opened, captured on its way out. It goes to the
//! original destination (or one of its Service's endpoints) through a tunnel, in-process, or
//! directly, and a failed connect moves on to the next endpoint.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    ProxyContext,
    connections::{ConnectionInfo, Direction, Security},
    forward,
    hbone::{
        bridge::{self, Answer, Sender, Side},
        pool::{PoolKey, TunnelError},
    },
    socket, upstream, workload_ref,
};
use crate::state::{Snapshot, Workload};

pub async fn handle(ctx: Arc<ProxyContext>, client: TcpStream, peer: SocketAddr) {
    // The transparent socket's local address is where the pod was connecting to.
    let Ok(original_destination) = client.local_addr() else {
        return;
    };
    // Decided while the state is at hand; the state is let go before any waiting, so a long
    // connection does not pin the state it started under.
    let Plan {
        service,
        candidates,
        attempts,
    } = plan(&ctx, &ctx.snapshot(), peer, original_destination);
    debug!(src = %peer, dst = %original_destination, candidates, "outbound connection captured");

    let mut last_error = None;
    for Attempt {
        address,
        info,
        route,
    } in attempts
    {
        match route {
            Route::Local(destination) => {
                let Some(mut guard) = ctx.admit(&ctx.snapshot(), info, &destination) else {
                    socket::reset_on_close(&client);
                    return;
                };
                match upstream::direct(peer, address).await {
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
            Route::Tunnel(key) => {
                // With one possible destination the client's bytes follow the request at once
                // (those already sent ride in the request's packet); with several, wait for the
                // answer so a failure can move on to the next.
                let (opened, first) = if candidates == 1 {
                    let first = bridge::already_received(&client);
                    let opened = ctx
                        .pool
                        .connect_early(&key, address, peer)
                        .await
                        .map(|s| (s.send, Answer::Pending(s.response), s.guard));
                    (opened, first)
                } else {
                    let opened = ctx
                        .pool
                        .connect(&key, address, peer)
                        .await
                        .map(|s| (s.send, Answer::Ready(s.recv), s.guard));
                    (opened, Bytes::new())
                };
                match opened {
                    Ok((send, answer, stream_guard)) => {
                        let mut guard = ctx.connections.open(info);
                        let counts = guard.counts();
                        if let Err(e) = bridge::bridge(
                            client,
                            Sender::Ready(send),
                            answer,
                            first,
                            &counts,
                            Side::Client,
                        )
                        .await
                        {
                            guard.fail(e);
                        }
                        drop(stream_guard);
                        return;
                    }
                    Err(TunnelError::Refused { status: 401, .. }) => {
                        // Denied at the destination: that node recorded and logged it.
                        warn!(src = %peer, dst = %address, "connection denied by the destination's policy");
                        let mut guard = ctx.connections.open(info);
                        guard.fail("denied by the destination's policy");
                        socket::reset_on_close(&client);
                        return;
                    }
                    Err(e) => {
                        warn!(src = %peer, dst = %address, error = %e, "tunnel failed");
                        let mut guard = ctx.connections.open(info);
                        guard.fail(&e);
                        last_error = Some(e.to_string());
                    }
                }
            }
            Route::Direct => match upstream::direct(peer, address).await {
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
    if candidates == 0 {
        warn!(src = %peer, dst = %original_destination, service = service.as_deref().unwrap_or("-"), "no ready endpoint");
        ctx.metrics.refused("outbound", "no endpoint");
    } else {
        debug!(src = %peer, dst = %original_destination, error = last_error.as_deref().unwrap_or("-"), "every endpoint failed");
    }
    socket::reset_on_close(&client);
}

/// How one endpoint is reached.
enum Route {
    /// Enrolled on both ends, same node: served here, under the destination's policy (the
    /// destination is kept for that decision, made when this endpoint is tried).
    Local(Workload),
    /// Enrolled destination elsewhere: HBONE to its node, as the source workload.
    Tunnel(PoolKey),
    /// Outside the mesh (or a source we cannot vouch for): plaintext, as before.
    Direct,
}

/// One endpoint to try, with what the connection is recorded as if it goes there.
struct Attempt {
    address: SocketAddr,
    info: ConnectionInfo,
    route: Route,
}

struct Plan {
    /// `namespace/name` of the Service the client dialed, if it did.
    service: Option<String>,
    /// Endpoints the destination resolved to (a few may have no usable route).
    candidates: usize,
    attempts: Vec<Attempt>,
}

/// The endpoints of `original_destination` in the order to try them, and how to reach each.
fn plan(
    ctx: &ProxyContext,
    snapshot: &Snapshot,
    peer: SocketAddr,
    original_destination: SocketAddr,
) -> Plan {
    let source = match peer.ip() {
        IpAddr::V4(ip) => snapshot.workload_by_ip(ip),
        IpAddr::V6(_) => None,
    };
    let source_identity = source
        .filter(|w| w.is_enrolled())
        .and_then(|w| ctx.identity_of(w));
    let resolved = ctx.services.resolve(snapshot, original_destination);
    let attempts = resolved
        .endpoints
        .iter()
        .filter_map(|endpoint| {
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
            let route = match (
                destination_workload.zip(destination_identity),
                &source_identity,
            ) {
                (Some((dst, _)), Some(_)) if dst.node == ctx.node => {
                    info.route = upstream::LOCAL;
                    info.security = Security::MutualTls;
                    Route::Local(dst.clone())
                }
                (Some((_, dst_id)), Some(src_id)) => {
                    info.route = upstream::TUNNEL;
                    info.security = Security::MutualTls;
                    let (SocketAddr::V4(peer4), IpAddr::V4(dst_ip)) = (peer, endpoint.address.ip())
                    else {
                        return None;
                    };
                    Route::Tunnel(PoolKey {
                        source: src_id.clone(),
                        source_ip: *peer4.ip(),
                        destination: dst_id,
                        address: SocketAddrV4::new(dst_ip, mesh_common::TUNNEL_PORT),
                    })
                }
                _ => Route::Direct,
            };
            Some(Attempt {
                address: endpoint.address,
                info,
                route,
            })
        })
        .collect();
    Plan {
        service: resolved.service,
        candidates: resolved.endpoints.len(),
        attempts,
    }
}
