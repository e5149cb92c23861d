//! Outbound HBONE connections, pooled: streams with the same source identity, source address and
//! destination workload share one HTTP/2 connection over mutual TLS, up to a stream limit;
//! idle connections are closed.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use serde::Serialize;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{debug, info, warn};

use super::{bridge::h2_error, headers};
use crate::{
    identity::{CertificateManager, Identity, WorkloadCertificate, tls},
    proxy::{
        keepalive::{self, KeepaliveSettings},
        socket,
    },
};

/// HTTP/2 settings for tunnels (both ends): large windows so one stream can fill a fast link.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize)]
pub struct PoolSettings {
    /// Streams one connection carries before another is opened.
    pub max_streams: usize,
    /// A connection without streams for this long is closed.
    #[serde(with = "crate::config::secs")]
    pub idle_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_streams: 100,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Everything that makes two streams able to share a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: Identity,
    pub source_ip: Ipv4Addr,
    pub destination: Identity,
    /// The destination workload's address, port 15008.
    pub address: SocketAddrV4,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no certificate for {identity}: {reason}")]
    Certificate { identity: Identity, reason: String },
    #[error("connecting to {address}: {source}")]
    Connect {
        address: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {address} (expecting {expected}): {source}")]
    Tls {
        address: SocketAddrV4,
        expected: Identity,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 with {address}: {source}")]
    Http2 {
        address: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
    #[error("{address} timed out")]
    Timeout { address: SocketAddrV4 },
    #[error("CONNECT refused by {address}: HTTP {status}")]
    Refused { address: SocketAddrV4, status: u16 },
    #[error("building the CONNECT request: {0}")]
    Request(#[from] headers::HeaderError),
}

impl TunnelError {
    /// The failure's kind, as `mesh_agent_connection_failures_total` labels it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Certificate { .. } => "no certificate",
            Self::Connect { .. } => "connect",
            Self::Tls { .. } => "tls handshake",
            Self::Http2 { .. } => "http2",
            Self::Timeout { .. } => "timeout",
            Self::Refused { .. } => "refused by destination",
            Self::Request(_) => "bad request",
        }
    }
}

struct Connection {
    id: u64,
    key: PoolKey,
    send: SendRequest<Bytes>,
    streams: AtomicUsize,
    total_streams: AtomicU64,
    closed: Arc<AtomicBool>,
    /// Serial of the certificate the connection was opened with; after a rotation, new streams
    /// go to a new connection presenting the new certificate while old ones finish.
    cert_serial: String,
    opened: SystemTime,
    idle_since: Mutex<Option<Instant>>,
    local: SocketAddr,
}

/// Keeps a connection's stream count while a stream is open.
pub struct StreamGuard {
    connection: Arc<Connection>,
}

impl StreamGuard {
    pub fn connection_id(&self) -> u64 {
        self.connection.id
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.connection.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.connection.idle_since) = Some(Instant::now());
        }
    }
}

/// One open CONNECT stream of a pooled connection.
pub struct Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub guard: StreamGuard,
}

#[derive(Debug, Clone, Serialize)]
pub struct TunnelView {
    pub id: u64,
    pub source_identity: String,
    pub source_ip: Ipv4Addr,
    pub destination_identity: String,
    pub address: SocketAddrV4,
    pub local_address: SocketAddr,
    pub active_streams: usize,
    pub total_streams: u64,
    pub opened: SystemTime,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    settings: PoolSettings,
    keepalive: KeepaliveSettings,
    certs: CertificateManager,
    connections: Mutex<HashMap<PoolKey, Vec<Arc<Connection>>>>,
    dialing: Mutex<HashMap<PoolKey, Arc<AsyncMutex<()>>>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    pub fn new(
        settings: PoolSettings,
        keepalive: KeepaliveSettings,
        certs: CertificateManager,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                keepalive,
                certs,
                connections: Mutex::new(HashMap::new()),
                dialing: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Opens a CONNECT stream to `destination` for `client` over a pooled connection and waits
    /// for the destination's answer.
    pub async fn connect(
        &self,
        key: &PoolKey,
        destination: SocketAddr,
        client: SocketAddr,
    ) -> Result<Stream, TunnelError> {
        let EarlyStream {
            send,
            response,
            guard,
        } = self.connect_early(key, destination, client).await?;
        let recv = response.established().await?;
        Ok(Stream { send, recv, guard })
    }

    /// Like [`Pool::connect`] but returns as soon as the request is sent. Only for a single
    /// destination: once client bytes went into the stream, a refusal cannot fall back to
    /// another endpoint.
    pub async fn connect_early(
        &self,
        key: &PoolKey,
        destination: SocketAddr,
        client: SocketAddr,
    ) -> Result<EarlyStream, TunnelError> {
        let mut retried = false;
        loop {
            let connection = self.checkout(key).await?;
            let guard = StreamGuard {
                connection: connection.clone(),
            };
            match start_stream(&connection, destination, client).await {
                Ok((send, response)) => {
                    return Ok(EarlyStream {
                        send,
                        response,
                        guard,
                    });
                }
                Err(TunnelError::Http2 { .. }) if !retried => {
                    connection.closed.store(true, Ordering::Release);
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A connection with room for one more stream (its count already taken), dialing if needed.
    async fn checkout(&self, key: &PoolKey) -> Result<Arc<Connection>, TunnelError> {
        let cert =
            self.inner
                .certs
                .fetch(&key.source)
                .await
                .map_err(|e| TunnelError::Certificate {
                    identity: key.source.clone(),
                    reason: e.to_string(),
                })?;
        if let Some(c) = self.reserve_existing(key, cert.serial()) {
            return Ok(c);
        }
        // One dial at a time per key, so a burst of streams shares the new connection.
        let gate = lock(&self.inner.dialing)
            .entry(key.clone())
            .or_default()
            .clone();
        let _dialing = gate.lock().await;
        if let Some(c) = self.reserve_existing(key, cert.serial()) {
            return Ok(c);
        }
        // Boxed: dialing (TLS and HTTP/2 handshakes) is rare, and inline it would make every
        // outbound connection's future several KiB larger, copied at each spawn and move.
        let connection = Arc::new(Box::pin(self.dial(key, &cert)).await?);
        connection.streams.fetch_add(1, Ordering::AcqRel);
        connection.total_streams.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.connections)
            .entry(key.clone())
            .or_default()
            .push(connection.clone());
        Ok(connection)
    }

    fn reserve_existing(&self, key: &PoolKey, cert_serial: &str) -> Option<Arc<Connection>> {
        let mut map = lock(&self.inner.connections);
        let list = map.get_mut(key)?;
        list.retain(|c| !c.closed.load(Ordering::Acquire));
        let max = self.inner.settings.max_streams;
        let found = list.iter().find(|c| {
            c.cert_serial == cert_serial
                && c.streams
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    })
                    .is_ok()
        })?;
        found.total_streams.fetch_add(1, Ordering::Relaxed);
        *lock(&found.idle_since) = None;
        Some(found.clone())
    }

    async fn dial(
        &self,
        key: &PoolKey,
        cert: &WorkloadCertificate,
    ) -> Result<Connection, TunnelError> {
        let address = key.address;
        let config = tls::client_config(
            cert,
            self.inner.certs.roots(),
            vec![key.destination.clone()],
        )
        .map_err(|e| TunnelError::Certificate {
            identity: key.source.clone(),
            reason: e.to_string(),
        })?;
        let handshake = async {
            let tcp = socket::connect_as(key.source_ip, address)
                .await
                .map_err(|source| TunnelError::Connect { address, source })?;
            let local = tcp
                .local_addr()
                .map_err(|source| TunnelError::Connect { address, source })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(tls::server_name(), super::transport(tcp))
                .await
                .map_err(|source| TunnelError::Tls {
                    address,
                    expected: key.destination.clone(),
                    source,
                })?;
            let (send, connection) = h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| TunnelError::Http2 {
                    address,
                    source: h2_error(e),
                })?;
            Ok::<_, TunnelError>((send, connection, local))
        };
        let (send, connection, local) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| TunnelError::Timeout { address })??;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        let keepalive = self.inner.keepalive;
        tokio::spawn(async move {
            let mut connection = connection;
            let peer_gone = keepalive::unanswered(connection.ping_pong(), keepalive);
            tokio::select! {
                ended = &mut connection => if let Err(e) = ended {
                    debug!(tunnel = id, error = %e, "tunnel connection ended with an error");
                },
                // Dropping the connection fails every stream on it: their clients are reset.
                () = peer_gone => {
                    warn!(tunnel = id, %address, "tunnel peer left a PING unanswered; closed");
                }
            }
            done.store(true, Ordering::Release);
        });
        info!(tunnel = id, src = %key.source, dst = %key.destination, %address, "tunnel opened");
        Ok(Connection {
            id,
            key: key.clone(),
            send,
            streams: AtomicUsize::new(0),
            total_streams: AtomicU64::new(0),
            closed,
            cert_serial: cert.serial().to_string(),
            opened: SystemTime::now(),
            idle_since: Mutex::new(None),
            local,
        })
    }

    /// Drops connections idle longer than the idle timeout, and dead ones. (One opened with a
    /// certificate that has since been replaced takes no new streams, so it goes idle and is
    /// dropped by the same rule.) Run periodically.
    pub fn reap_idle(&self) -> usize {
        let timeout = self.inner.settings.idle_timeout;
        let mut map = lock(&self.inner.connections);
        let mut closed = 0;
        for list in map.values_mut() {
            list.retain(|c| {
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && lock(&c.idle_since).is_some_and(|since| since.elapsed() >= timeout);
                let keep = !idle && !c.closed.load(Ordering::Acquire);
                if !keep {
                    closed += 1;
                    debug!(tunnel = c.id, idle, "tunnel closed");
                }
                keep
            });
        }
        map.retain(|_, list| !list.is_empty());
        closed
    }

    /// Periodic reaping until shutdown.
    pub async fn run_reaper(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let period = (self.inner.settings.idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => return,
                _ = tick.tick() => { self.reap_idle(); }
            }
        }
    }

    pub fn view(&self) -> Vec<TunnelView> {
        let map = lock(&self.inner.connections);
        let mut views: Vec<TunnelView> = map
            .values()
            .flatten()
            .filter(|c| !c.closed.load(Ordering::Acquire))
            .map(|c| TunnelView {
                id: c.id,
                source_identity: c.key.source.to_string(),
                source_ip: c.key.source_ip,
                destination_identity: c.key.destination.to_string(),
                address: c.key.address,
                local_address: c.local,
                active_streams: c.streams.load(Ordering::Acquire),
                total_streams: c.total_streams.load(Ordering::Relaxed),
                opened: c.opened,
            })
            .collect();
        views.sort_by_key(|v| v.id);
        views
    }
}

/// Sends the CONNECT request; the response is awaited separately.
async fn start_stream(
    connection: &Connection,
    destination: SocketAddr,
    client: SocketAddr,
) -> Result<(SendStream<Bytes>, PendingResponse), TunnelError> {
    let address = connection.key.address;
    let http2 = |e: h2::Error| TunnelError::Http2 {
        address,
        source: h2_error(e),
    };
    let request = headers::connect_request(destination, client)?;
    let mut send = connection.send.clone().ready().await.map_err(http2)?;
    let (response, stream) = send.send_request(request, false).map_err(http2)?;
    Ok((
        stream,
        PendingResponse {
            address,
            destination,
            response,
        },
    ))
}

/// The answer to a CONNECT not yet received.
pub struct PendingResponse {
    address: SocketAddrV4,
    destination: SocketAddr,
    response: h2::client::ResponseFuture,
}

impl PendingResponse {
    /// The stream's receiving half once the destination answered 200.
    pub async fn established(self) -> Result<RecvStream, TunnelError> {
        let PendingResponse {
            address,
            destination,
            response,
        } = self;
        let http2 = |e: h2::Error| TunnelError::Http2 {
            address,
            source: h2_error(e),
        };
        let response = tokio::time::timeout(HANDSHAKE_TIMEOUT, response)
            .await
            .map_err(|_| TunnelError::Timeout { address })?
            .map_err(http2)?;
        if response.status() != http::StatusCode::OK {
            warn!(%address, %destination, status = %response.status(), "CONNECT refused");
            return Err(TunnelError::Refused {
                address,
                status: response.status().as_u16(),
            });
        }
        Ok(response.into_body())
    }
}

/// A CONNECT stream whose response may still be on its way: the client's first bytes can
/// travel right behind the request, saving a round trip per connection.
pub struct EarlyStream {
    pub send: SendStream<Bytes>,
    pub response: PendingResponse,
    pub guard: StreamGuard,
}

#[cfg(test)]
mod tests {
    use tokio::io::DuplexStream;

    use super::*;
    use crate::identity::CertificateAuthority;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "shop", sa).unwrap()
    }

    fn key(source_ip: [u8; 4]) -> PoolKey {
        PoolKey {
            source: id("web"),
            source_ip: Ipv4Addr::from(source_ip),
            destination: id("cart"),
            address: SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 1), 15008),
        }
    }

    fn pool(max_streams: usize) -> Pool {
        let ca = Arc::new(CertificateAuthority::self_signed("cluster.local").unwrap());
        Pool::new(
            PoolSettings {
                max_streams,
                idle_timeout: Duration::from_secs(60),
            },
            KeepaliveSettings::default(),
            CertificateManager::new(ca, Duration::from_secs(3600)),
        )
    }

    /// A live HTTP/2 connection (in memory, no TLS: the pool's decisions do not look at the
    /// transport) opened with the certificate `serial`, put in `pool` under `key` as a dial
    /// would. The server end is returned: dropping it breaks the connection.
    async fn add(
        pool: &Pool,
        key: &PoolKey,
        serial: &str,
    ) -> (Arc<Connection>, tokio::task::JoinHandle<()>) {
        let (client_io, server_io): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            if let Ok(mut connection) = h2::server::handshake(server_io).await {
                while let Some(Ok(_)) = connection.accept().await {}
            }
        });
        let (send, connection) = h2::client::handshake(client_io).await.unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        tokio::spawn(async move {
            let _ = connection.await;
            done.store(true, Ordering::Release);
        });
        let connection = Arc::new(Connection {
            id: pool.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            key: key.clone(),
            send,
            streams: AtomicUsize::new(0),
            total_streams: AtomicU64::new(0),
            closed,
            cert_serial: serial.to_owned(),
            opened: SystemTime::now(),
            idle_since: Mutex::new(Some(Instant::now())),
            local: "10.0.1.1:40000".parse().unwrap(),
        });
        lock(&pool.inner.connections)
            .entry(key.clone())
            .or_default()
            .push(connection.clone());
        (connection, server)
    }

    /// Which connection a new stream of `key` takes, by id (`None`: a new one is dialed).
    fn reserve(pool: &Pool, key: &PoolKey, serial: &str) -> Option<u64> {
        pool.reserve_existing(key, serial).map(|c| c.id)
    }

    fn pooled(pool: &Pool) -> usize {
        lock(&pool.inner.connections).values().map(Vec::len).sum()
    }

    #[tokio::test]
    async fn streams_share_a_connection_up_to_the_stream_limit() {
        let pool = pool(2);
        let key = key([10, 0, 1, 1]);
        let (a, _server_a) = add(&pool, &key, "s1").await;
        assert_eq!(reserve(&pool, &key, "s1"), Some(a.id));
        assert_eq!(reserve(&pool, &key, "s1"), Some(a.id));
        // Full: the third stream needs another connection.
        assert_eq!(reserve(&pool, &key, "s1"), None);
        let (b, _server_b) = add(&pool, &key, "s1").await;
        assert_eq!(reserve(&pool, &key, "s1"), Some(b.id));
        assert_eq!(a.streams.load(Ordering::Acquire), 2);
        assert_eq!(b.streams.load(Ordering::Acquire), 1);
        // A stream ending makes room on the first connection again.
        drop(StreamGuard {
            connection: a.clone(),
        });
        assert_eq!(reserve(&pool, &key, "s1"), Some(a.id));
        assert_eq!(a.total_streams.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn streams_of_another_source_or_destination_do_not_share() {
        let pool = pool(100);
        let key = key([10, 0, 1, 1]);
        let (_a, _server) = add(&pool, &key, "s1").await;
        let other_ip = PoolKey {
            source_ip: Ipv4Addr::new(10, 0, 1, 2),
            ..key.clone()
        };
        let other_destination = PoolKey {
            destination: id("db"),
            ..key.clone()
        };
        let other_source = PoolKey {
            source: id("batch"),
            ..key.clone()
        };
        for other in [other_ip, other_destination, other_source] {
            assert_eq!(reserve(&pool, &other, "s1"), None, "{other:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_opened_with_a_replaced_certificate_takes_no_new_streams() {
        let pool = pool(100);
        let key = key([10, 0, 1, 1]);
        let (old, _server) = add(&pool, &key, "old").await;
        assert_eq!(reserve(&pool, &key, "old"), Some(old.id));
        // After a rotation the current serial differs: new streams go to a new connection,
        // while the old one keeps its open stream.
        assert_eq!(reserve(&pool, &key, "new"), None);
        assert_eq!(old.streams.load(Ordering::Acquire), 1);
        assert_eq!(pooled(&pool), 1);
    }

    #[tokio::test]
    async fn a_closed_connection_is_dropped_and_never_reused() {
        let pool = pool(100);
        let key = key([10, 0, 1, 1]);
        let (dead, server) = add(&pool, &key, "s1").await;
        server.abort();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dead.closed.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the connection never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(reserve(&pool, &key, "s1"), None);
        assert_eq!(pooled(&pool), 0);
        assert!(pool.view().is_empty());
    }

    #[tokio::test]
    async fn idle_connections_are_reaped_after_the_idle_timeout_busy_ones_never() {
        let pool = pool(100);
        let key = key([10, 0, 1, 1]);
        let long_ago = Instant::now() - Duration::from_secs(61);
        let (stale, _s1) = add(&pool, &key, "s1").await;
        *lock(&stale.idle_since) = Some(long_ago);
        let (recent, _s2) = add(&pool, &key, "s1").await;
        *lock(&recent.idle_since) = Some(Instant::now() - Duration::from_secs(1));
        let (busy, _s3) = add(&pool, &key, "s1").await;
        // A stream open for longer than the timeout: the connection is in use, not idle.
        busy.streams.store(1, Ordering::Release);
        *lock(&busy.idle_since) = Some(long_ago);
        let (dead, _s4) = add(&pool, &key, "s1").await;
        dead.closed.store(true, Ordering::Release);

        assert_eq!(pool.reap_idle(), 2);
        let left: Vec<u64> = pool.view().iter().map(|v| v.id).collect();
        assert_eq!(left, [recent.id, busy.id]);
        assert_eq!(pool.reap_idle(), 0);
    }

    #[tokio::test]
    async fn the_last_stream_ending_starts_the_idle_clock() {
        let pool = pool(100);
        let key = key([10, 0, 1, 1]);
        let (c, _server) = add(&pool, &key, "s1").await;
        let first = pool.reserve_existing(&key, "s1").unwrap();
        let second = pool.reserve_existing(&key, "s1").unwrap();
        assert!(
            lock(&c.idle_since).is_none(),
            "a connection with streams is not idle"
        );
        drop(StreamGuard { connection: first });
        assert!(lock(&c.idle_since).is_none(), "one stream is still open");
        drop(StreamGuard { connection: second });
        assert!(lock(&c.idle_since).is_some());
        assert_eq!(c.streams.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_stream_on_a_broken_connection_is_marked_closed_and_redialed_once() {
        let pool = pool(100);
        // Nothing listens there: the redial fails to connect (or, without the privileges a
        // socket mark needs, to create its socket), which shows a dial was attempted.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let key = PoolKey {
            source_ip: Ipv4Addr::LOCALHOST,
            address: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            ..key([127, 0, 0, 1])
        };
        let serial = pool
            .inner
            .certs
            .fetch(&key.source)
            .await
            .unwrap()
            .serial()
            .to_owned();
        let (broken, server) = add(&pool, &key, &serial).await;
        server.abort();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !broken.closed.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the connection never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The pool has not noticed yet (the race a stream can lose): it takes the connection,
        // the stream fails, and the pool tries once more on a fresh one.
        broken.closed.store(false, Ordering::Release);
        let result = pool
            .connect_early(
                &key,
                "10.0.2.1:8080".parse().unwrap(),
                "10.0.1.1:40000".parse().unwrap(),
            )
            .await;
        assert!(
            matches!(result, Err(TunnelError::Connect { address, .. }) if address == key.address),
            "{:?}",
            result.err()
        );
        assert!(broken.closed.load(Ordering::Acquire));
        assert_eq!(pooled(&pool), 0);
    }

    #[test]
    fn failures_are_labelled_by_kind() {
        let address = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 1), 15008);
        let io = || std::io::Error::other("x");
        let cases = [
            (
                TunnelError::Tls {
                    address,
                    expected: id("cart"),
                    source: io(),
                },
                "tls handshake",
            ),
            (
                TunnelError::Connect {
                    address,
                    source: io(),
                },
                "connect",
            ),
            (TunnelError::Timeout { address }, "timeout"),
            (
                TunnelError::Refused {
                    address,
                    status: 400,
                },
                "refused by destination",
            ),
            (
                TunnelError::Http2 {
                    address,
                    source: io(),
                },
                "http2",
            ),
        ];
        for (error, reason) in cases {
            assert_eq!(error.reason(), reason, "{error}");
        }
    }
}
