//! Fuzzes the HBONE server's request handling: `parse_connect` on requests built from fuzzer
//! bytes, and an HTTP/2 server, set up as the tunnel port sets it up, fed fuzzer bytes as its
//! client's byte stream — never a panic, never a hang.
//!
//! The first byte chooses: even, a request from the rest ([`request`]); odd, the rest as the
//! client's bytes after the HTTP/2 preface ([`tunnel`]).
#![no_main]

use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::hbone::{
    bridge,
    headers::{self, ConnectTarget, HeaderError},
    pool::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW},
};
use mesh_agent::proxy::limits::STREAMS_PER_TUNNEL;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longer than anything the server could wait for on its own: with the clock paused, reaching
/// it means every task is waiting and nothing is left to wake them — the server is stuck.
const STUCK: Duration = Duration::from_secs(3600);
/// How long the client waits, on the paused clock, before it closes its side.
const SETTLE: Duration = Duration::from_secs(1);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        request(rest);
    } else {
        tunnel(rest);
    }
});

/// A request from lines: the method, the URI, then `name: value` headers; what `http` refuses
/// to build is skipped, as h2 would refuse it on the wire.
fn request(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let Ok(method) = Method::from_bytes(lines.next().unwrap_or_default()) else {
        return;
    };
    let Ok(uri) = Uri::try_from(lines.next().unwrap_or_default()) else {
        return;
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    for line in lines {
        let split = line.iter().position(|&b| b == b':').unwrap_or(line.len());
        let (name, value) = line.split_at(split);
        let value = value.strip_prefix(b":").unwrap_or(value).trim_ascii();
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            request.headers_mut().append(name, value);
        }
    }
    if let Ok(target) = headers::parse_connect(&request) {
        round_trip(&target);
    }
}

/// What was read from a request is what the client side would send again: the request it
/// builds for the same destination and client parses back to them.
fn round_trip(target: &ConnectTarget) {
    let client = target.forwarded_for.unwrap_or(target.destination);
    let again = headers::connect_request(target.destination, client)
        .expect("a CONNECT request for a parsed destination");
    let parsed = headers::parse_connect(&again).expect("our own CONNECT request parses");
    assert_eq!(parsed.destination, target.destination);
    assert_eq!(parsed.forwarded_for, Some(client));
}

/// The bytes as the client's side of an HTTP/2 connection to a server built as the tunnel
/// port builds it; each stream is answered as the server answers it, until the bytes run out.
fn tunnel(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(data);
    runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        // The client sends everything, waits until the server has done all it can with it,
        // then closes its side; what the server sends back is read and dropped, so the server
        // never waits for room to write.
        let writer = tokio::spawn(async move {
            let _ = client_write.write_all(&input).await;
            // With the clock paused this ends as soon as no task can go on. Closing at once
            // would lose the requests: h2 returns no more streams once it has read the end.
            tokio::time::sleep(SETTLE).await;
            let _ = client_write.shutdown().await;
        });
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = client_read.read_to_end(&mut sink).await;
        });
        let serve = async move {
            let handshake = h2::server::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .max_concurrent_streams(STREAMS_PER_TUNNEL)
                .handshake::<_, Bytes>(server)
                .await;
            let Ok(mut connection) = handshake else {
                return;
            };
            let mut streams = Vec::new();
            while let Some(next) = connection.accept().await {
                let Ok((request, respond)) = next else { break };
                streams.push(tokio::spawn(stream(request, respond)));
            }
            drop(connection);
            for stream in streams {
                stream.await.expect("a stream task panicked");
            }
        };
        tokio::time::timeout(STUCK, serve)
            .await
            .expect("the HTTP/2 server is stuck: nothing left to wake it");
        writer.await.expect("the writer panicked");
        // The server is gone: its side of the pipe is closed, so the reader ends.
        tokio::time::timeout(STUCK, reader)
            .await
            .expect("the reader is stuck")
            .expect("the reader panicked");
    });
}

/// One CONNECT stream, as the tunnel server treats it up to the upstream connection: parsed,
/// refused with the server's status when bad, else its early data taken, a 200 sent and the
/// rest of the client's bytes read.
async fn stream(request: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>) {
    let target = match headers::parse_connect(&request) {
        Ok(target) => target,
        Err(error) => {
            let status = match error {
                HeaderError::NotConnect(_) => StatusCode::METHOD_NOT_ALLOWED,
                _ => StatusCode::BAD_REQUEST,
            };
            answer(&mut respond, status, true);
            return;
        }
    };
    round_trip(&target);
    let mut body = request.into_body();
    let _ = bridge::early_data(&mut body);
    let Some(mut send) = answer(&mut respond, StatusCode::OK, false) else {
        return;
    };
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
    }
    let _ = send.send_data(Bytes::new(), true);
}

fn answer(
    respond: &mut SendResponse<Bytes>,
    status: StatusCode,
    end: bool,
) -> Option<h2::SendStream<Bytes>> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    respond.send_response(response, end).ok()
}
