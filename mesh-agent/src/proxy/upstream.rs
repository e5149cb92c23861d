//! How the proxy reaches a connection's destination.
//!
//! Today every destination is reached directly, in plaintext, from the client's own address.
//! The HBONE tunnel (HTTP/2 CONNECT over mutual TLS to the destination node's port 15008) will
//! be chosen here for enrolled destinations, behind the same `connect` call.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use tokio::net::TcpStream;

use super::socket;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("only IPv4 is supported (got {0})")]
    NotIpv4(SocketAddr),
    #[error("connecting to {destination}: {source}")]
    Connect {
        destination: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {destination}: timed out after {CONNECT_TIMEOUT:?}")]
    Timeout { destination: SocketAddrV4 },
}

/// The route name recorded with each connection.
pub const DIRECT: &str = "direct";

/// Opens the upstream connection for a client at `source` that wanted `destination`.
pub async fn connect(source: SocketAddr, destination: SocketAddr) -> Result<TcpStream, UpstreamError> {
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) = (source, destination) else {
        return Err(UpstreamError::NotIpv4(destination));
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, socket::connect_as(*source.ip(), destination)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(UpstreamError::Connect { destination, source }),
        Err(_) => Err(UpstreamError::Timeout { destination }),
    }
}
