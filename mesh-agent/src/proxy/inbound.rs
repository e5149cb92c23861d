//! Inbound: plain TCP addressed to an enrolled pod on this node, captured before delivery.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    ProxyContext,
    connections::{ConnectionInfo, Direction},
    socket, upstream,
};

pub async fn handle(ctx: Arc<ProxyContext>, client: TcpStream, peer: SocketAddr) {
    let Ok(original_destination) = client.local_addr() else { return };
    if !is_local_enrolled(&ctx, original_destination) {
        // Only reachable by a stale capture entry or a client dialing 15006 directly.
        warn!(src = %peer, dst = %original_destination, "inbound connection for a pod that is not an enrolled pod of this node; refused");
        socket::reset_on_close(&client);
        return;
    }
    let info = ConnectionInfo {
        direction: Direction::Inbound,
        source: peer,
        source_workload: ctx.workload_name(peer),
        original_destination,
        destination_workload: ctx.workload_name(original_destination),
        route: upstream::DIRECT,
    };
    debug!(src = %peer, dst = %original_destination, "inbound connection captured");
    super::carry(&ctx, client, info).await;
}

fn is_local_enrolled(ctx: &ProxyContext, addr: SocketAddr) -> bool {
    let SocketAddr::V4(addr) = addr else { return false };
    let snapshot = ctx.state.borrow();
    snapshot
        .workload_by_ip(*addr.ip())
        .is_some_and(|w| w.node == ctx.node && w.is_enrolled())
}
