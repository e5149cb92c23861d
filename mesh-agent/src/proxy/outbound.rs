//! Outbound: a connection an enrolled pod opened, captured on its way out.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::debug;

use super::{
    ProxyContext,
    connections::{ConnectionInfo, Direction},
    upstream,
};

pub async fn handle(ctx: Arc<ProxyContext>, client: TcpStream, peer: SocketAddr) {
    // The transparent socket's local address is where the pod was connecting to.
    let Ok(original_destination) = client.local_addr() else { return };
    let info = ConnectionInfo {
        direction: Direction::Outbound,
        source: peer,
        source_workload: ctx.workload_name(peer),
        original_destination,
        destination_workload: ctx.workload_name(original_destination),
        route: upstream::DIRECT,
    };
    debug!(src = %peer, dst = %original_destination, "outbound connection captured");
    super::carry(&ctx, client, info).await;
}
