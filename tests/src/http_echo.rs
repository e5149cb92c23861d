//! An HTTP echo server like the Gateway API conformance suite's (`echo-basic`): every request
//! is answered 200 with a JSON report of what arrived — method, path, host, protocol, headers —
//! and which pod answered, to whom (`remoteAddr`). HTTP/1.1 and HTTP/2 without TLS (h2c), told apart by the preface.
//!
//! Request headers steer the answer, as the conformance echo's do: `x-echo-set-header:
//! Name:value[,Name:value]` adds response headers, `x-echo-status: <code>` changes the status,
//! `x-echo-delay: <ms>` answers that much later. Every report is also kept in the server's
//! request log ([`Server::requests`]), so tests see what reached each pod — retries, mirrors.

use std::{collections::BTreeMap, convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::json;
use tokio::net::TcpListener;

use crate::traffic::{RequestLog, Server};

/// Serves the echo on `listener` as pod `namespace/pod`.
pub fn server(listener: TcpListener, namespace: &str, pod: &str) -> Server {
    let me = Arc::new((namespace.to_owned(), pod.to_owned()));
    let requests = RequestLog::default();
    let log = requests.clone();
    Server::custom(listener, move |stream, peer| {
        let (me, log) = (me.clone(), log.clone());
        async move {
            let service = service_fn(move |request| {
                let (me, log) = (me.clone(), log.clone());
                async move { Ok::<_, Infallible>(answer(&me.0, &me.1, peer, request, &log).await) }
            });
            auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
                .map_err(|e| anyhow::anyhow!("echo connection: {e}"))
        }
    })
    .with_requests(requests)
}

/// `x-header-set` → `X-Header-Set`, as Go's `http.Header` keys headers.
pub fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                }
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

async fn answer(
    namespace: &str,
    pod: &str,
    peer: std::net::SocketAddr,
    request: Request<Incoming>,
    log: &RequestLog,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let received = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(canonical(name.as_str()))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let host = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| headers.get("Host").and_then(|h| h.first().cloned()))
        .unwrap_or_default();
    let proto = match parts.version {
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let report = json!({
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": host,
        "method": parts.method.as_str(),
        "proto": proto,
        "headers": headers,
        "namespace": namespace,
        "pod": pod,
        "bodyBytes": received,
        // Who connected: through a waypoint, the waypoint's address.
        "remoteAddr": peer.to_string(),
    });
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(report.clone());
    if let Some(delay) = parts
        .headers
        .get("x-echo-delay")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let mut response = Response::new(Full::new(Bytes::from(report.to_string())));
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    if let Some(set) = parts
        .headers
        .get("x-echo-set-header")
        .and_then(|v| v.to_str().ok())
    {
        for pair in set.split(',') {
            if let Some((name, value)) = pair.split_once(':')
                && let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.trim().as_bytes()),
                    HeaderValue::from_str(value.trim()),
                )
            {
                response.headers_mut().append(name, value);
            }
        }
    }
    if let Some(status) = parts
        .headers
        .get("x-echo-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
    {
        *response.status_mut() = status;
    }
    response
}
