//! Copies bytes between a TCP connection and an HTTP/2 CONNECT stream, both ways, keeping
//! HTTP/2 flow control (memory stays bounded whatever the transfer size) and passing half-close
//! (END_STREAM ↔ FIN) and resets (RST_STREAM ↔ TCP RST) across.

use std::{
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream, server::SendResponse};
use http::Response;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::pool::PendingResponse;
use crate::proxy::{forward::ByteCounts, keepalive::idle_error, socket::reset_on_close};

/// Largest read from the TCP side; also the most a stream asks capacity for at once.
const CHUNK: usize = 64 * 1024;
/// First read from the TCP side. Each read that brings at least that much doubles the next, up to
/// [`CHUNK`]: a bulk transfer reaches full-size reads within a few, while a connection that
/// carries a request or two never allocates (and frees) a bulk-sized buffer.
const FIRST_READ: usize = 4 * 1024;

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

/// How long the destination side holds its 200 back for the destination's first bytes when
/// the client did not wait for it (see [`Sender::Deferred`]).
const RESPONSE_HOLD: Duration = Duration::from_millis(2);

/// The sending half of a stream.
pub enum Sender {
    Ready(SendStream<Bytes>),
    /// Destination side, when the client sent bytes behind its CONNECT without waiting for the
    /// answer: the 200 goes out with the destination's first bytes (one TLS record, one packet,
    /// one wake-up of the other proxy fewer), or alone after [`RESPONSE_HOLD`], or at its EOF.
    /// A client that waits for the 200 before sending (ztunnel does) always gets it at once.
    Deferred(SendResponse<Bytes>),
}

impl Sender {
    /// The stream to send on, answering 200 first if that is still due.
    fn stream(&mut self) -> io::Result<&mut SendStream<Bytes>> {
        if let Sender::Deferred(respond) = self {
            let stream = respond
                .send_response(Response::new(()), false)
                .map_err(h2_error)?;
            *self = Sender::Ready(stream);
        }
        match self {
            Sender::Ready(stream) => Ok(stream),
            Sender::Deferred(_) => Err(io::Error::other("CONNECT left unanswered")),
        }
    }

    fn reset(&mut self, reason: Reason) {
        match self {
            Sender::Ready(stream) => stream.send_reset(reason),
            Sender::Deferred(respond) => respond.send_reset(reason),
        }
    }
}

/// Data the peer sent right behind its CONNECT request, if it is already here: taken without
/// waiting (one poll), with its flow-control credit returned. `None` also when the stream
/// ended or failed, which the bridge then finds for itself.
pub fn early_data(body: &mut RecvStream) -> Option<Bytes> {
    let mut cx = Context::from_waker(Waker::noop());
    match body.poll_data(&mut cx) {
        Poll::Ready(Some(Ok(data))) => {
            let _ = body.flow_control().release_capacity(data.len());
            Some(data)
        }
        _ => None,
    }
}

/// What the TCP side has already sent and is waiting in its receive queue, without waiting for
/// more (empty if nothing is there yet). Sent right behind a CONNECT, it shares the request's TLS
/// record and packet instead of following in its own.
pub fn already_received(tcp: &TcpStream) -> Bytes {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    match tcp.try_read_buf(&mut buf) {
        Ok(n) if n > 0 => buf.freeze(),
        _ => Bytes::new(),
    }
}

/// Runs both directions until each has finished; on an error (a refused CONNECT included),
/// resets the other side too. With a pending answer the client's bytes flow at once and the
/// way back opens when the 200 arrives. `first` holds bytes already read from the TCP side
/// (see [`already_received`]); they go into the stream before anything else.
pub async fn bridge(
    tcp: TcpStream,
    mut send: Sender,
    answer: Answer,
    first: Bytes,
    counts: &ByteCounts,
    side: Side,
) -> io::Result<()> {
    let (from_tcp, to_tcp) = match side {
        Side::Client => (&counts.sent, &counts.received),
        Side::Destination => (&counts.received, &counts.sent),
    };
    let (mut rd, mut wr) = tcp.into_split();
    if !first.is_empty() {
        // Within the stream's initial window: h2 queues it behind the request headers.
        from_tcp.fetch_add(first.len() as u64, Ordering::Relaxed);
        let sent = send
            .stream()
            .and_then(|s| s.send_data(first, false).map_err(h2_error));
        if let Err(e) = sent {
            send.reset(Reason::CANCEL);
            return Err(e);
        }
    }
    let up = tcp_to_stream(&mut rd, &mut send, from_tcp);
    let down = async { stream_to_tcp(answer.recv().await?, &mut wr, to_tcp).await };
    let result = tokio::select! {
        biased;
        done = async { tokio::try_join!(up, down) } => done.map(|_| ()),
        () = counts.idle.wait() => Err(idle_error()),
    };
    if result.is_err() {
        send.reset(Reason::CANCEL);
        if let Ok(tcp) = rd.reunite(wr) {
            reset_on_close(&tcp);
        }
    }
    result
}

async fn tcp_to_stream<R: AsyncRead + Unpin>(
    rd: &mut R,
    sender: &mut Sender,
    counter: &AtomicU64,
) -> io::Result<()> {
    let mut buf = BytesMut::new();
    let mut read_size = FIRST_READ;
    let mut holding = matches!(sender, Sender::Deferred(_));
    loop {
        buf.reserve(read_size);
        let n = if holding {
            holding = false;
            // `read_buf` is cancel safe: when the hold ends first, nothing was read.
            tokio::select! {
                biased;
                read = rd.read_buf(&mut buf) => read?,
                () = tokio::time::sleep(RESPONSE_HOLD) => {
                    sender.stream()?;
                    continue;
                }
            }
        } else {
            rd.read_buf(&mut buf).await?
        };
        let send = sender.stream()?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_error)?;
            return Ok(());
        }
        if n >= read_size {
            read_size = (read_size * 2).min(CHUNK);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::hbone::headers;
    use tokio::net::TcpListener;

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (app, proxy) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (app.expect("connect"), proxy.expect("accept").0)
    }

    #[tokio::test]
    async fn already_received_takes_only_what_is_queued() {
        let (mut app, proxy) = tcp_pair().await;
        assert!(already_received(&proxy).is_empty());
        app.write_all(b"hello").await.expect("write");
        proxy.readable().await.expect("readable");
        assert_eq!(&already_received(&proxy)[..], b"hello");
        assert!(already_received(&proxy).is_empty());
    }

    /// Bytes read before the bridge starts lead the stream, in order, and are counted.
    #[tokio::test]
    async fn first_bytes_lead_the_stream() {
        let (response, send, accepted) = connect_stream().await;
        let server = tokio::spawn(async move {
            let (mut body, mut respond) = accepted.await.expect("server");
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .expect("respond");
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("data");
                body.flow_control()
                    .release_capacity(chunk.len())
                    .expect("release");
                got.extend_from_slice(&chunk);
            }
            send.send_data(Bytes::from_static(b"reply"), true)
                .expect("reply");
            got
        });
        let recv = response.await.expect("response").into_body();

        let (mut app, proxy) = tcp_pair().await;
        app.write_all(b"early").await.expect("write");
        proxy.readable().await.expect("readable");
        let first = already_received(&proxy);
        assert_eq!(&first[..], b"early");
        let counts = ByteCounts::default();
        let bridged = bridge(
            proxy,
            Sender::Ready(send),
            Answer::Ready(recv),
            first,
            &counts,
            Side::Client,
        );
        let app_side = async {
            app.write_all(b" and late").await.expect("write");
            app.shutdown().await.expect("shutdown");
            let mut reply = Vec::new();
            app.read_to_end(&mut reply).await.expect("read");
            reply
        };
        let (bridged, reply) = tokio::join!(bridged, app_side);
        bridged.expect("bridge");
        assert_eq!(reply, b"reply");
        assert_eq!(server.await.expect("server"), b"early and late");
        assert_eq!(counts.sent.load(Ordering::Relaxed), 14);
        assert_eq!(counts.received.load(Ordering::Relaxed), 5);
    }

    /// An HTTP/2 client and server over memory with one CONNECT stream: the client's halves,
    /// and the server's once it has accepted the stream.
    async fn connect_stream() -> (
        h2::client::ResponseFuture,
        SendStream<Bytes>,
        tokio::task::JoinHandle<(RecvStream, SendResponse<Bytes>)>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let accepted = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io)
                .await
                .expect("server handshake");
            let (request, respond) = connection
                .accept()
                .await
                .expect("a request")
                .expect("a valid request");
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            (request.into_body(), respond)
        });
        let (send_request, connection) = h2::client::handshake(client_io)
            .await
            .expect("client handshake");
        tokio::spawn(connection);
        let request = headers::connect_request(
            "10.0.2.10:8080".parse().expect("address"),
            "10.0.1.10:40000".parse().expect("address"),
        )
        .expect("request");
        let mut send_request = send_request.ready().await.expect("ready");
        let (response, send) = send_request.send_request(request, false).expect("send");
        (response, send, accepted)
    }

    /// [`connect_stream`], whose server stream is returned once its request data (sent right
    /// behind the request, without waiting) has arrived.
    async fn early_stream() -> (
        h2::client::ResponseFuture,
        SendStream<Bytes>,
        SendResponse<Bytes>,
        RecvStream,
        Bytes,
    ) {
        let (response, mut send, accepted) = connect_stream().await;
        send.send_data(Bytes::from_static(b"ping"), false)
            .expect("early data");
        let (mut body, respond) = accepted.await.expect("server");
        let early = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                if let Some(early) = early_data(&mut body) {
                    return early;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the early data arrives");
        (response, send, respond, body, early)
    }

    /// The destination side's bridge over `proxy`, its 200 held until the destination speaks.
    fn held_bridge(
        proxy: TcpStream,
        respond: SendResponse<Bytes>,
        body: RecvStream,
        counts: &ByteCounts,
    ) -> impl Future<Output = io::Result<()>> + '_ {
        bridge(
            proxy,
            Sender::Deferred(respond),
            Answer::Ready(body),
            Bytes::new(),
            counts,
            Side::Destination,
        )
    }

    /// The destination answers: the held 200 goes out, with its bytes behind it.
    #[tokio::test]
    async fn a_held_answer_comes_with_the_first_bytes_back() {
        let (response, mut send, respond, body, early) = early_stream().await;
        assert_eq!(&early[..], b"ping");
        let (mut destination, proxy) = tcp_pair().await;
        let counts = ByteCounts::default();
        let bridged = held_bridge(proxy, respond, body, &counts);
        let client = async {
            let response = response.await.expect("an answer");
            assert_eq!(response.status(), http::StatusCode::OK);
            let mut recv = response.into_body();
            let data = recv.data().await.expect("data").expect("no error");
            send.send_data(Bytes::new(), true).expect("end");
            data
        };
        let destination_side = async {
            destination.write_all(b"pong").await.expect("write");
            let mut rest = Vec::new();
            destination.read_to_end(&mut rest).await.expect("read");
            destination.shutdown().await.expect("shutdown");
        };
        let (bridged, data, ()) = tokio::join!(bridged, client, destination_side);
        bridged.expect("bridge");
        assert_eq!(&data[..], b"pong");
        assert_eq!(counts.received.load(Ordering::Relaxed), 4);
    }

    /// A destination that says nothing (it waits for more from the client) does not keep the
    /// client without an answer: the 200 goes alone once the hold is over.
    #[tokio::test]
    async fn a_held_answer_goes_alone_when_the_destination_is_silent() {
        let (response, mut send, respond, body, _early) = early_stream().await;
        let (mut destination, proxy) = tcp_pair().await;
        let counts = ByteCounts::default();
        let bridged = held_bridge(proxy, respond, body, &counts);
        let client = async {
            let response = tokio::time::timeout(std::time::Duration::from_secs(5), response)
                .await
                .expect("answered while the destination is silent")
                .expect("an answer");
            assert_eq!(response.status(), http::StatusCode::OK);
            send.send_data(Bytes::new(), true).expect("end");
            let mut recv = response.into_body();
            while let Some(data) = recv.data().await {
                assert!(data.expect("no error").is_empty(), "no data, just the end");
            }
        };
        let destination_side = async {
            let mut rest = Vec::new();
            destination.read_to_end(&mut rest).await.expect("read");
            destination.shutdown().await.expect("shutdown");
        };
        let (bridged, (), ()) = tokio::join!(bridged, client, destination_side);
        bridged.expect("bridge");
    }
}
