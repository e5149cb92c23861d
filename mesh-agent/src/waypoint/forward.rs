//! Sending a routed request on, as the route says: its request timeout, its retries (and the
//! per-try timeout), and its mirrors.
//!
//! A retry needs the request again, so a request whose body is small and of known length
//! (up to [`REPLAY_LIMIT`], which covers every request without a body) is kept in memory until
//! its answer is final; a larger or streamed body is sent once, and only the failover to
//! another endpoint before it is sent (which gives the request back untouched) applies to it.
//! Timeouts run until the response's headers arrive.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header, request::Parts};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use tracing::debug;

use super::{
    WaypointContext,
    backends::{BackendError, Body, Target, Version},
};
use crate::state::Retry;

/// The largest body kept for a retry or a mirror.
pub const REPLAY_LIMIT: u64 = 64 * 1024;
/// Between retries when the route sets no backoff (Envoy's base interval).
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// What the route says about sending: `timeouts` and `retry`.
#[derive(Debug, Clone, Default)]
pub struct Sending {
    /// `timeouts.request`: the whole exchange, retries included.
    pub request_timeout: Option<Duration>,
    /// `timeouts.backendRequest`: each try.
    pub try_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

/// Why no endpoint's answer comes back.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream request timeout")]
    Timeout,
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A request that may be sent more than once.
enum Replay {
    /// Sent at most once.
    Once(Option<Request<Body>>),
    /// Its head and whole body, rebuilt for each try.
    Kept(Parts, Bytes),
}

impl Replay {
    /// Keeps `request` when its body is small and its length known; else it goes once.
    async fn of(request: Request<Body>) -> Replay {
        let hint = request.body().size_hint();
        let small = request.body().is_end_stream()
            || hint.exact().is_some_and(|length| length <= REPLAY_LIMIT);
        if !small {
            return Replay::Once(Some(request));
        }
        let (parts, body) = request.into_parts();
        match body.collect().await {
            Ok(collected) => Replay::Kept(parts, collected.to_bytes()),
            // The client's body failed: send what there is once, to fail as it would have.
            Err(_) => Replay::Once(Some(Request::from_parts(parts, empty()))),
        }
    }

    /// The request for the next try; `None` once a one-time request was sent.
    fn next(&mut self) -> Option<Request<Body>> {
        match self {
            Replay::Once(request) => request.take(),
            Replay::Kept(parts, body) => {
                Some(Request::from_parts(copy_parts(parts), full(body.clone())))
            }
        }
    }

    /// A copy for a mirror, with `-shadow` added to the host, as Envoy marks mirrored
    /// requests; `None` when the body is not kept.
    fn mirrored(&self) -> Option<Request<Body>> {
        let Replay::Kept(parts, body) = self else {
            return None;
        };
        let mut parts = copy_parts(parts);
        shadow_host(&mut parts);
        Some(Request::from_parts(parts, full(body.clone())))
    }
}

/// Sends `request` to `targets` as `sending` says, and starts its mirrors.
pub async fn forward(
    ctx: &Arc<WaypointContext>,
    targets: &[Target],
    version: Version,
    client: SocketAddr,
    request: Request<Body>,
    sending: &Sending,
    mirrors: Vec<(Vec<Target>, Version)>,
) -> Result<(Target, Response<Body>), ForwardError> {
    let needs_copies = sending.retry.is_some() || !mirrors.is_empty();
    let mut replay = if needs_copies {
        Replay::of(request).await
    } else {
        Replay::Once(Some(request))
    };
    for (mirror_targets, mirror_version) in mirrors {
        match replay.mirrored() {
            Some(copy) => mirror(ctx.clone(), mirror_targets, mirror_version, client, copy),
            None => debug!(src = %client, "request body too large or of unknown length to mirror"),
        }
    }
    let tries = tries(ctx, targets, version, client, &mut replay, sending);
    match sending.request_timeout {
        Some(limit) => tokio::time::timeout(limit, tries)
            .await
            .unwrap_or(Err(ForwardError::Timeout)),
        None => tries.await,
    }
}

/// The first try and the retries the route allows.
async fn tries(
    ctx: &WaypointContext,
    targets: &[Target],
    version: Version,
    client: SocketAddr,
    replay: &mut Replay,
    sending: &Sending,
) -> Result<(Target, Response<Body>), ForwardError> {
    let retries = sending.retry.as_ref().map_or(0, |retry| retry.attempts);
    let backoff = sending
        .retry
        .as_ref()
        .and_then(|retry| retry.backoff)
        .unwrap_or(DEFAULT_BACKOFF);
    let mut order: Vec<Target> = targets.to_vec();
    let mut attempt = 0;
    loop {
        let Some(request) = replay.next() else {
            // A one-time request is gone; the last outcome stands (reported below).
            return Err(ForwardError::Backend(BackendError::NoEndpoint));
        };
        let sent = ctx.backends.send(ctx, &order, version, client, request);
        let outcome = match sending.try_timeout {
            Some(limit) => tokio::time::timeout(limit, sent)
                .await
                .unwrap_or(Err(BackendError::Timeout {
                    address: order.first().map_or(client, |t| t.address),
                }))
                .map_err(ForwardError::from),
            None => sent.await.map_err(ForwardError::from),
        };
        let last = attempt >= retries || matches!(replay, Replay::Once(None));
        let retriable = match &outcome {
            Ok((_, response)) => sending
                .retry
                .as_ref()
                .is_some_and(|retry| retriable_response(retry, response)),
            Err(ForwardError::Backend(e)) => sending.retry.is_some() && retriable_failure(e),
            Err(ForwardError::Timeout) => false,
        };
        if last || !retriable {
            return match outcome {
                Ok((target, response)) => Ok((target.clone(), response)),
                Err(ForwardError::Backend(BackendError::Timeout { .. }))
                    if sending.try_timeout.is_some() =>
                {
                    Err(ForwardError::Timeout)
                }
                Err(e) => Err(e),
            };
        }
        attempt += 1;
        debug!(src = %client, attempt, "retrying");
        // Another endpoint first next time, as Envoy's previous-hosts predicate prefers.
        order.rotate_left(1);
        tokio::time::sleep(backoff).await;
    }
}

/// A status the route lists, or gRPC's `UNAVAILABLE` / `CANCELLED` in a trailers-only answer.
fn retriable_response(retry: &Retry, response: &Response<Body>) -> bool {
    if retry.codes.contains(&response.status().as_u16()) {
        return true;
    }
    matches!(
        response
            .headers()
            .get("grpc-status")
            .map(HeaderValue::as_bytes),
        Some(b"14" | b"1")
    )
}

/// Connect failures (`connect-failure`, and a try's timeout): never a request an endpoint
/// took and failed.
fn retriable_failure(error: &BackendError) -> bool {
    error.is_connect_failure()
}

/// Sends a mirror copy and forgets it: its answer is read and dropped.
fn mirror(
    ctx: Arc<WaypointContext>,
    targets: Vec<Target>,
    version: Version,
    client: SocketAddr,
    request: Request<Body>,
) {
    tokio::spawn(async move {
        match ctx
            .backends
            .send(&ctx, &targets, version, client, request)
            .await
        {
            Ok((target, response)) => {
                let status = response.status();
                let _ = response.into_body().collect().await;
                debug!(endpoint = %target.address, %status, "mirror answered");
            }
            Err(e) => debug!(error = %e, "mirror failed"),
        }
    });
}

/// A copy of a request's head (extensions are not copied: nothing downstream of here reads
/// them).
fn copy_parts(parts: &Parts) -> Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

/// `host[:port]` becomes `host-shadow[:port]`, in `Host` and in the URI's authority.
fn shadow_host(parts: &mut Parts) {
    let shadow = |host: &str| match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() => {
            format!("{name}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    };
    if let Some(value) = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(shadow)
        .and_then(|h| HeaderValue::from_str(&h).ok())
    {
        parts.headers.insert(header::HOST, value);
    }
    if let Some(authority) = parts.uri.authority().map(|a| shadow(a.as_str())) {
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.authority = authority.parse().ok();
        parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrored_requests_say_so_in_their_host() {
        let request = Request::builder()
            .uri("http://echo:80/a")
            .header("host", "echo:80")
            .body(())
            .expect("request");
        let mut parts = request.into_parts().0;
        shadow_host(&mut parts);
        assert_eq!(parts.headers["host"], "echo-shadow:80");
        assert_eq!(parts.uri.to_string(), "http://echo-shadow:80/a");
        let mut bare = Request::builder()
            .uri("/a")
            .header("host", "echo")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        shadow_host(&mut bare);
        assert_eq!(bare.headers["host"], "echo-shadow");
    }

    #[test]
    fn listed_codes_and_unavailable_grpc_are_retried() {
        let retry = Retry {
            codes: vec![503],
            attempts: 2,
            backoff: None,
        };
        let answer = |status: u16, grpc: Option<&'static str>| {
            let mut response = Response::new(empty());
            *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
            if let Some(code) = grpc {
                response
                    .headers_mut()
                    .insert("grpc-status", HeaderValue::from_static(code));
            }
            response
        };
        assert!(retriable_response(&retry, &answer(503, None)));
        assert!(!retriable_response(&retry, &answer(500, None)));
        assert!(retriable_response(&retry, &answer(200, Some("14"))));
        assert!(!retriable_response(&retry, &answer(200, Some("0"))));
    }

    #[tokio::test]
    async fn small_bodies_are_kept_for_another_try_and_large_ones_go_once() {
        let small = Request::new(full(Bytes::from_static(b"hello")));
        let mut replay = Replay::of(small).await;
        for _ in 0..3 {
            let request = replay.next().expect("kept");
            let body = request
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(&body[..], b"hello");
        }
        let large = Request::new(full(Bytes::from(vec![0u8; REPLAY_LIMIT as usize + 1])));
        let mut replay = Replay::of(large).await;
        assert!(replay.mirrored().is_none());
        assert!(replay.next().is_some());
        assert!(replay.next().is_none());
    }
}
