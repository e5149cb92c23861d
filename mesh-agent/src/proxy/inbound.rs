//! Inbound plaintext (15006): TCP addressed to an enrolled pod of this node that did not come
//! through a tunnel — from a pod outside the mesh, or the node itself. PeerAuthentication
//! decides whether plaintext is accepted (STRICT refuses it); authorization policy applies with
//! the source address only (there is no identity).

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    ProxyContext,
    connections::{ConnectionInfo, Direction, Security},
    forward, socket, upstream, workload_ref, workload_ref_at,
};
use crate::policy::{self, MtlsMode};

pub async fn handle(ctx: Arc<ProxyContext>, client: TcpStream, peer: SocketAddr) {
    let Ok(original_destination) = client.local_addr() else {
        return;
    };
    let Ok(_permit) = ctx
        .limits
        .connection_to(peer.ip(), original_destination.ip())
    else {
        socket::reset_on_close(&client);
        return;
    };
    let snapshot = ctx.snapshot();
    let Some(destination) = ctx.local_enrolled(&snapshot, original_destination.ip()) else {
        // Only reachable by a stale capture entry or a client dialing 15006 directly.
        warn!(src = %peer, dst = %original_destination, "inbound connection for a pod that is not an enrolled pod of this node; refused");
        ctx.metrics.refused("inbound", "unknown destination");
        socket::reset_on_close(&client);
        return;
    };
    let info = ConnectionInfo {
        direction: Direction::Inbound,
        source: peer,
        source_workload: workload_ref_at(&snapshot, peer),
        source_identity: None,
        source_certificate_serial: None,
        original_destination,
        destination_service: None,
        destination_workload: Some(workload_ref(destination)),
        destination: original_destination,
        destination_identity: ctx.identity_of(destination).map(|i| i.to_string()),
        route: upstream::DIRECT,
        security: Security::None,
    };
    let mode = policy::mtls_mode(
        &snapshot,
        &ctx.mesh.root_namespace,
        destination,
        original_destination.port(),
    );
    if mode == MtlsMode::Strict {
        warn!(src = %peer, dst = %original_destination, "plaintext refused: PeerAuthentication STRICT");
        ctx.connections
            .deny(info, None, "plaintext refused by PeerAuthentication STRICT");
        socket::reset_on_close(&client);
        return;
    }
    debug!(src = %peer, dst = %original_destination, "inbound plaintext connection captured");
    let Some(mut guard) = ctx.admit(&snapshot, info, destination) else {
        socket::reset_on_close(&client);
        return;
    };
    // A long connection must not pin the state it started under.
    drop(snapshot);
    match upstream::direct(peer, original_destination, &ctx.node_addresses).await {
        Ok(up) => {
            if let Err(e) = forward::bidirectional(client, up, guard.counts()).await {
                guard.fail(e);
            }
        }
        Err(e) => {
            socket::reset_on_close(&client);
            guard.fail(e);
        }
    }
}
