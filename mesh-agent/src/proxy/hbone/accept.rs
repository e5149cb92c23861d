//! Accepting HBONE tunnels: the TLS handshake as a given identity (bounded in time), the HTTP/2
//! handshake with the tunnel settings, and the loop that takes CONNECT streams until the peer
//! leaves, stops answering PINGs, or this process drains. The node proxy and the waypoint both
//! serve their tunnels with it.

use std::{io, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::Request;
use tokio::{io::BufReader, net::TcpStream, sync::watch};
use tracing::debug;

use super::pool::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use crate::{
    identity::{Identity, tls},
    proxy::keepalive::{self, KeepaliveSettings},
};

/// How long a peer has for its TLS handshake.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel's TLS session, server side.
pub type TlsStream = tokio_rustls::server::TlsStream<BufReader<TcpStream>>;
/// A tunnel's HTTP/2 connection, server side.
pub type Connection = h2::server::Connection<TlsStream, Bytes>;

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("TLS handshake refused: {0}")]
    Tls(#[source] io::Error),
    #[error("TLS handshake timed out")]
    TlsTimeout,
    #[error("peer certificate has no SPIFFE identity")]
    NoIdentity,
    #[error("HTTP/2 handshake failed: {0}")]
    Http2(#[source] h2::Error),
}

impl AcceptError {
    /// The refusal's kind, as `mesh_agent_refused_total` labels it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Tls(_) => "tls handshake",
            Self::TlsTimeout => "tls timeout",
            Self::NoIdentity => "no peer identity",
            Self::Http2(_) => "http2",
        }
    }
}

/// The authenticated other end of a tunnel.
#[derive(Debug, Clone)]
pub struct Peer {
    pub identity: Identity,
    /// Serial number of the certificate it presented.
    pub serial: String,
}

/// Mutual TLS on `tcp` with `config` (which requires a client certificate), and the peer's
/// SPIFFE identity from the certificate it presented.
pub async fn tls(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> Result<(TlsStream, Peer), AcceptError> {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(super::transport(tcp));
    let tls = tokio::time::timeout(TLS_TIMEOUT, accept)
        .await
        .map_err(|_| AcceptError::TlsTimeout)?
        .map_err(AcceptError::Tls)?;
    let (identity, serial) =
        tls::peer_certificate(tls.get_ref().1).ok_or(AcceptError::NoIdentity)?;
    Ok((tls, Peer { identity, serial }))
}

/// The HTTP/2 server handshake with the tunnel settings: large windows and frames, at most
/// `max_streams` concurrent CONNECT streams.
pub async fn http2(tls: TlsStream, max_streams: u32) -> Result<Connection, AcceptError> {
    h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(max_streams)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(AcceptError::Http2)
}

/// Why a tunnel ended.
#[derive(Debug)]
pub enum Ended {
    /// The peer closed it (or it drained and every stream finished).
    Closed,
    /// The connection failed.
    Error(h2::Error),
    /// The peer left a PING unanswered for the keepalive timeout.
    KeepaliveTimeout,
}

/// Takes CONNECT streams from `connection`, handing each to `stream` (which spawns what serves
/// it), until the tunnel ends. When `draining` turns true the peer is sent GOAWAY, so it opens
/// its next streams on a new connection (to whichever process accepts now) while the streams in
/// flight here finish. Dropping the connection at the end resets every stream still on it.
pub async fn serve<F>(
    mut connection: Connection,
    keepalive: KeepaliveSettings,
    mut draining: watch::Receiver<bool>,
    mut stream: F,
) -> Ended
where
    F: FnMut(Request<RecvStream>, SendResponse<Bytes>),
{
    let mut going_away = false;
    let peer_gone = keepalive::unanswered(connection.ping_pong(), keepalive);
    tokio::pin!(peer_gone);
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = &mut peer_gone => return Ended::KeepaliveTimeout,
            // h2 sends GOAWAY in two steps (the highest id first, the real last one a round trip
            // later), so a stream already on its way is still served, not refused.
            _ = crate::shutdown::requested(&mut draining), if !going_away => {
                debug!("draining: GOAWAY to the tunnel's peer");
                connection.graceful_shutdown();
                going_away = true;
                continue;
            }
        };
        match next {
            None => return Ended::Closed,
            Some(Ok((request, respond))) => stream(request, respond),
            Some(Err(e)) => return Ended::Error(e),
        }
    }
}
