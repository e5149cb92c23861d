//! One HTTP/2 CONNECT stream as a byte stream (tokio's `AsyncRead` + `AsyncWrite`), so that a
//! protocol can run inside a tunnel: the waypoint serves and sends HTTP through it with hyper.
//!
//! Flow control is kept: what is read is released to the peer as it is consumed, and a write
//! waits for the peer's window. Shutdown ends the stream (END_STREAM); a reset from the peer
//! reads as an error.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::{Stream, StreamGuard};

/// The most one write asks the peer's window for.
const MAX_WRITE: usize = 64 * 1024;

pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What the last DATA frame brought and a read has not taken yet.
    pending: Bytes,
    /// END_STREAM received.
    read_done: bool,
    /// A pooled stream's hold on its connection, let go with the stream.
    _guard: Option<StreamGuard>,
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            read_done: false,
            _guard: None,
        }
    }

    /// A stream of a pooled tunnel: the connection counts it until the stream is dropped.
    pub fn pooled(stream: Stream) -> Self {
        Self {
            _guard: Some(stream.guard),
            ..Self::new(stream.send, stream.recv)
        }
    }
}

fn h2_error(e: h2::Error) -> io::Error {
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::BrokenPipe
    };
    io::Error::new(kind, e)
}

impl AsyncRead for StreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
                None => this.read_done = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        // Given back as consumed: the peer never has more in flight than the window.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len().min(MAX_WRITE));
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(capacity)) => {
                    let n = capacity.min(buf.len());
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_error)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the stream can no longer send",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends as soon as the connection task runs; there is nothing held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // An empty DATA frame with END_STREAM: the half-close a TCP FIN would be.
        match this.send.send_data(Bytes::new(), true) {
            Err(e) if e.is_reset() || e.is_go_away() || e.is_io() => Poll::Ready(Err(h2_error(e))),
            // Done, or ended already (a second shutdown): nothing more to close.
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A client and a server stream of one CONNECT over an in-memory connection.
    async fn pair() -> (StreamIo, StreamIo) {
        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.expect("handshake");
            let (request, mut respond) = connection
                .accept()
                .await
                .expect("a stream")
                .expect("a valid stream");
            let send = respond
                .send_response(Response::new(()), false)
                .expect("response");
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            StreamIo::new(send, request.into_body())
        });
        let (h2, connection) = h2::client::handshake(client_io).await.expect("handshake");
        tokio::spawn(connection);
        let mut h2 = h2.ready().await.expect("ready");
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .expect("request");
        let (response, send) = h2.send_request(request, false).expect("sent");
        let server = server.await.expect("server");
        let recv = response.await.expect("response").into_body();
        (StreamIo::new(send, recv), server)
    }

    #[tokio::test]
    async fn carries_more_than_a_window_both_ways_with_half_close() {
        let (mut client, mut server) = pair().await;
        // 1 MiB: sixteen times the default stream window, so flow control must be released.
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("written");
            client.shutdown().await.expect("shut down");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.expect("read");
        assert_eq!(received.len(), data.len());
        assert!(received == data, "bytes altered");
        server.write_all(b"done").await.expect("answered");
        server.shutdown().await.expect("shut down");
        assert_eq!(writer.await.expect("client"), b"done");
    }

    #[tokio::test]
    async fn hyper_serves_http1_and_http2_inside_a_stream() {
        use http_body_util::{BodyExt, Full};
        use hyper::service::service_fn;
        use hyper_util::rt::{TokioExecutor, TokioIo};

        let answer = |request: Request<hyper::body::Incoming>| async move {
            let path = request.uri().path().to_string();
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(path))))
        };
        // HTTP/1.1, two requests on one kept-alive connection.
        let (client, server) = pair().await;
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service_fn(answer)),
        );
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        for path in ["/one", "/two"] {
            let request = Request::get(path)
                .header("host", "web")
                .body(Full::new(Bytes::new()))
                .expect("request");
            let response = sender.send_request(request).await.expect("answered");
            let body = response.into_body().collect().await.expect("body");
            assert_eq!(body.to_bytes(), path.as_bytes());
        }
        // HTTP/2 (prior knowledge) inside the tunnel's HTTP/2 stream.
        let (client, server) = pair().await;
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server), service_fn(answer)),
        );
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        let request = Request::get("http://web/three")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = sender.send_request(request).await.expect("answered");
        let body = response.into_body().collect().await.expect("body");
        assert_eq!(body.to_bytes(), "/three".as_bytes());
    }

    #[tokio::test]
    async fn a_reset_reads_as_connection_reset() {
        let (mut client, server) = pair().await;
        let StreamIo { mut send, .. } = server;
        send.send_reset(h2::Reason::CANCEL);
        let mut buf = [0u8; 16];
        let error = client.read(&mut buf).await.expect_err("reset");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }
}
