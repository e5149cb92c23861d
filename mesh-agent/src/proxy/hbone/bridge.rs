//! Copies bytes between a TCP connection and an HTTP/2 CONNECT stream, both ways, keeping
//! HTTP/2 flow control (memory stays bounded whatever the transfer size) and passing half-close
//! (END_STREAM ↔ FIN) and resets (RST_STREAM ↔ TCP RST) across.

use std::{
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::pool::PendingResponse;
use crate::proxy::{forward::ByteCounts, socket::reset_on_close};

/// Largest read from the TCP side; also the most a stream asks capacity for at once.
const CHUNK: usize = 64 * 1024;

/// Which way the bytes of a stream count: from the client (`sent`) or to it (`received`).
#[derive(Clone, Copy)]
pub enum Side {
    /// The TCP side is the client: TCP→h2 bytes are `sent`.
    Client,
    /// The TCP side is the destination: TCP→h2 bytes are `received`.
    Destination,
}

/// The answer to the CONNECT: already received, or still on its way (early data).
pub enum Answer {
    Ready(RecvStream),
    Pending(PendingResponse),
}

impl Answer {
    async fn recv(self) -> io::Result<RecvStream> {
        match self {
            Answer::Ready(recv) => Ok(recv),
            Answer::Pending(response) => response
                .established()
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e)),
        }
    }
}

/// Runs both directions until each has finished; on an error (a refused CONNECT included),
/// resets the other side too. With a pending answer the client's bytes flow at once and the
/// way back opens when the 200 arrives.
pub async fn bridge(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    answer: Answer,
    counts: &ByteCounts,
    side: Side,
) -> io::Result<()> {
    let (from_tcp, to_tcp) = match side {
        Side::Client => (&counts.sent, &counts.received),
        Side::Destination => (&counts.received, &counts.sent),
    };
    let (mut rd, mut wr) = tcp.into_split();
    let mut send = send;
    let up = tcp_to_stream(&mut rd, &mut send, from_tcp);
    let down = async { stream_to_tcp(answer.recv().await?, &mut wr, to_tcp).await };
    let result = tokio::try_join!(up, down);
    if result.is_err() {
        send.send_reset(Reason::CANCEL);
        if let Ok(tcp) = rd.reunite(wr) {
            reset_on_close(&tcp);
        }
    }
    result.map(|_| ())
}

async fn tcp_to_stream<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut SendStream<Bytes>,
    counter: &AtomicU64,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(CHUNK);
        let n = rd.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_error)?;
            return Ok(());
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(granted) => granted.map_err(h2_error)?,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "stream closed by peer",
                    ));
                }
            };
            if granted == 0 {
                continue;
            }
            let part = chunk.split_to(granted.min(chunk.len()));
            counter.fetch_add(part.len() as u64, Ordering::Relaxed);
            send.send_data(part, false).map_err(h2_error)?;
        }
    }
}

async fn stream_to_tcp<W: AsyncWrite + Unpin>(
    mut recv: RecvStream,
    wr: &mut W,
    counter: &AtomicU64,
) -> io::Result<()> {
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_error)?;
        wr.write_all(&data).await?;
        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        // Window credit is returned only once the bytes are written: a slow reader on the TCP
        // side stops the sender instead of growing our buffers.
        recv.flow_control()
            .release_capacity(data.len())
            .map_err(h2_error)?;
    }
    wr.shutdown().await
}

pub fn h2_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 io error"));
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}
