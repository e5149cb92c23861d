//! Copies bytes both ways between two connections, passing half-closes along and counting bytes.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    keepalive::{Cut, idle_error},
    socket::reset_on_close,
};

const BUFFER: usize = 32 * 1024;

/// Live byte counts of one proxied connection.
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// From the client towards the destination.
    pub sent: AtomicU64,
    /// From the destination back to the client.
    pub received: AtomicU64,
    /// Set when the connection stayed idle too long (see `Connections::cut_idle`).
    pub idle: Cut,
}

/// Forwards until both directions have finished. A read of EOF on one side becomes a
/// `shutdown(SHUT_WR)` on the other, so half-closed connections keep working. An error on
/// either side, or the idle timeout, resets both.
pub async fn bidirectional(
    client: TcpStream,
    upstream: TcpStream,
    counts: Arc<ByteCounts>,
) -> io::Result<()> {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut upstream_rx, mut upstream_tx) = upstream.into_split();
    let to_upstream = copy_half(&mut client_rx, &mut upstream_tx, &counts.sent);
    let to_client = copy_half(&mut upstream_rx, &mut client_tx, &counts.received);
    let result = tokio::select! {
        biased;
        done = async { tokio::try_join!(to_upstream, to_client) } => done.map(|_| ()),
        () = counts.idle.wait() => Err(idle_error()),
    };
    if result.is_err()
        && let (Ok(client), Ok(upstream)) = (
            client_rx.reunite(client_tx),
            upstream_rx.reunite(upstream_tx),
        )
    {
        reset_on_close(&client);
        reset_on_close(&upstream);
    }
    result
}

async fn copy_half<R, W>(reader: &mut R, writer: &mut W, counter: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(());
        }
        writer.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}
