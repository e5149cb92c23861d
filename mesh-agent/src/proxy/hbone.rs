//! HBONE: TCP carried in HTTP/2 CONNECT streams over mutual TLS, port 15008, as Istio's ztunnel
//! speaks it — the client side ([`pool`]) and the server side ([`server`]).

pub mod accept;
pub mod bridge;
pub mod headers;
pub mod pool;
pub mod server;
pub mod stream_io;

use tokio::{io::BufReader, net::TcpStream};

/// Read buffer under a tunnel's TLS.
const TRANSPORT_BUFFER: usize = 32 * 1024;

/// The TCP connection of a tunnel, as its TLS layer reads it. rustls asks for at most 4 KiB
/// per read, so a full 16 KiB record would cost four `recv` calls; a buffer underneath serves
/// those reads from one (writes pass straight through).
pub fn transport(tcp: TcpStream) -> BufReader<TcpStream> {
    BufReader::with_capacity(TRANSPORT_BUFFER, tcp)
}
