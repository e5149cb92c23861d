//! The waypoint's connections to endpoints: HBONE as the waypoint to an enrolled pod (whose
//! node's agent then applies L4 policy to the waypoint's identity, as Istio's does), plain TCP
//! to anything else; and HTTP over them with hyper, kept alive and reused — HTTP/1.1 one request
//! at a time per connection, HTTP/2 multiplexed over one.

use std::{
    collections::HashMap,
    io,
    net::{SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, combinators::BoxBody};
use hyper::{
    body::{Body as _, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::debug;

use super::WaypointContext;
use crate::{
    identity::Identity,
    proxy::{
        hbone::{
            pool::{PoolKey, TunnelError},
            stream_io::StreamIo,
        },
        upstream::Endpoint,
    },
};

/// Every body the waypoint sends or answers with.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A byte stream to an endpoint: an HBONE stream or a TCP connection.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("tunnel to {address}: {source}")]
    Tunnel {
        address: SocketAddr,
        #[source]
        source: Box<TunnelError>,
    },
    #[error("connecting to {address}: {source}")]
    Connect {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {address} timed out")]
    Timeout { address: SocketAddr },
    #[error("HTTP handshake with {address}: {source}")]
    Handshake {
        address: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("no endpoint")]
    NoEndpoint,
    #[error("request to {address}: {source}")]
    Request {
        address: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl BackendError {
    /// Whether no endpoint was reached (Envoy's `UF`/`UH`), as opposed to one that failed the
    /// request it was sent.
    pub fn is_connect_failure(&self) -> bool {
        !matches!(self, Self::Request { .. })
    }
}

/// The HTTP version spoken to endpoints of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// One endpoint and how it is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The pod (or outside) address and target port: what a tunnel's CONNECT asks for.
    pub address: SocketAddr,
    /// HBONE to the pod's node as this waypoint; `None`: plain TCP.
    pub tunnel: Option<PoolKey>,
}

impl Target {
    pub fn of(ctx: &WaypointContext, endpoint: &Endpoint<'_>) -> Target {
        let tunnel = endpoint
            .workload
            .filter(|w| w.is_enrolled())
            .and_then(|w| ctx.identity_of(w))
            .zip(match endpoint.address {
                SocketAddr::V4(a) => Some(*a.ip()),
                SocketAddr::V6(_) => None,
            })
            .map(|(destination, ip): (Identity, _)| PoolKey {
                source: ctx.identity.clone(),
                source_ip: ctx.ip,
                destination,
                address: SocketAddrV4::new(ip, mesh_common::TUNNEL_PORT),
            });
        Target {
            address: endpoint.address,
            tunnel,
        }
    }
}

/// Opens a byte stream to `target`; `client` is who the traffic is for (the tunnel's
/// `Forwarded`).
pub async fn connect(
    ctx: &WaypointContext,
    target: &Target,
    client: SocketAddr,
) -> Result<Box<dyn Io>, BackendError> {
    let address = target.address;
    match &target.tunnel {
        Some(key) => {
            let stream = ctx
                .pool
                .connect(key, address, client)
                .await
                .map_err(|source| BackendError::Tunnel {
                    address,
                    source: Box::new(source),
                })?;
            Ok(Box::new(StreamIo::pooled(stream)))
        }
        None => {
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
                .await
                .map_err(|_| BackendError::Timeout { address })?
                .map_err(|source| BackendError::Connect { address, source })?;
            let _ = tcp.set_nodelay(true);
            Ok(Box::new(tcp))
        }
    }
}

type Idle = Arc<Mutex<HashMap<Target, Vec<http1::SendRequest<Body>>>>>;

/// HTTP connections to endpoints, reused across requests and clients.
#[derive(Default)]
pub struct Backends {
    /// HTTP/1.1 connections between requests: one is taken per request and given back when its
    /// response has been read to the end.
    idle: Idle,
    /// One HTTP/2 connection per endpoint, shared by every request to it.
    multiplexed: Mutex<HashMap<Target, http2::SendRequest<Body>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Backends {
    /// Sends `request` to the first of `targets` that can be reached, over a kept connection if
    /// one is free, else a new one. A kept connection the endpoint has closed meanwhile gives
    /// the request back, which then goes on a new one; an endpoint that cannot be reached
    /// passes it to the next. Once sent, a failure is final (the body is gone).
    pub async fn send<'t>(
        &self,
        ctx: &WaypointContext,
        targets: &'t [Target],
        version: Version,
        client: SocketAddr,
        mut request: Request<Body>,
    ) -> Result<(&'t Target, Response<Body>), BackendError> {
        let mut last = None;
        for target in targets {
            let address = target.address;
            let failed = |source| BackendError::Request { address, source };
            let sent = match version {
                Version::Http1 => {
                    if let Some(mut sender) = self.idle_http1(target)
                        && sender.ready().await.is_ok()
                    {
                        match sender.try_send_request(request).await {
                            Ok(response) => {
                                return Ok((target, self.recycle(target, sender, response)));
                            }
                            Err(mut e) => match e.take_message() {
                                Some(back) => request = back,
                                None => return Err(failed(e.into_error())),
                            },
                        }
                    }
                    match self.dial_http1(ctx, target, client).await {
                        Ok(mut sender) => sender
                            .send_request(request)
                            .await
                            .map(|response| self.recycle(target, sender, response)),
                        Err(e) => {
                            debug!(%address, error = %e, "endpoint unreachable; trying the next");
                            last = Some(e);
                            continue;
                        }
                    }
                }
                Version::Http2 => {
                    if let Some(mut sender) = self.shared_http2(target) {
                        match sender.try_send_request(request).await {
                            Ok(response) => return Ok((target, response.map(BodyExt::boxed))),
                            Err(mut e) => match e.take_message() {
                                Some(back) => request = back,
                                None => return Err(failed(e.into_error())),
                            },
                        }
                    }
                    match self.dial_http2(ctx, target, client).await {
                        Ok(mut sender) => sender
                            .send_request(request)
                            .await
                            .map(|response| response.map(BodyExt::boxed)),
                        Err(e) => {
                            debug!(%address, error = %e, "endpoint unreachable; trying the next");
                            last = Some(e);
                            continue;
                        }
                    }
                }
            };
            return sent.map(|response| (target, response)).map_err(failed);
        }
        Err(last.unwrap_or(BackendError::NoEndpoint))
    }

    async fn dial_http1(
        &self,
        ctx: &WaypointContext,
        target: &Target,
        client: SocketAddr,
    ) -> Result<http1::SendRequest<Body>, BackendError> {
        let address = target.address;
        let io = connect(ctx, target, client).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| BackendError::Handshake { address, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%address, error = %e, "backend connection ended");
            }
        });
        Ok(sender)
    }

    async fn dial_http2(
        &self,
        ctx: &WaypointContext,
        target: &Target,
        client: SocketAddr,
    ) -> Result<http2::SendRequest<Body>, BackendError> {
        let address = target.address;
        let io = connect(ctx, target, client).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| BackendError::Handshake { address, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%address, error = %e, "backend connection ended");
            }
        });
        lock(&self.multiplexed).insert(target.clone(), sender.clone());
        Ok(sender)
    }

    fn idle_http1(&self, target: &Target) -> Option<http1::SendRequest<Body>> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(target)?;
        // Given back once its last response was read: ready, or about to be, unless closed.
        while let Some(sender) = list.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn shared_http2(&self, target: &Target) -> Option<http2::SendRequest<Body>> {
        let mut shared = lock(&self.multiplexed);
        match shared.get(target) {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                shared.remove(target);
                None
            }
            None => None,
        }
    }

    /// The response, whose connection goes back to the idle ones once its body has been read.
    fn recycle(
        &self,
        target: &Target,
        sender: http1::SendRequest<Body>,
        response: Response<Incoming>,
    ) -> Response<Body> {
        let idle = self.idle.clone();
        let target = target.clone();
        response.map(|body| {
            Recycle {
                body,
                back: Some((idle, target, sender)),
            }
            .boxed()
        })
    }
}

/// A response body that hands its HTTP/1.1 connection back when it has ended.
struct Recycle {
    body: Incoming,
    back: Option<(Idle, Target, http1::SendRequest<Body>)>,
}

impl Recycle {
    fn give_back(&mut self) {
        if let Some((idle, target, sender)) = self.back.take() {
            let mut idle = lock(&idle);
            let list = idle.entry(target).or_default();
            if list.len() < MAX_IDLE_PER_ENDPOINT {
                list.push(sender);
            }
        }
    }
}

impl hyper::body::Body for Recycle {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Recycle {
    /// A body nobody polls to its end because it had none (a 204, a HEAD) still frees its
    /// connection; one dropped half read takes its connection with it.
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}
