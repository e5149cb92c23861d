//! Test servers and clients on tokio. Every wait has a deadline, so a broken data path fails
//! with a message naming what did not arrive instead of hanging the test.
//!
//! Servers: [`Server::echo`], [`Server::sink`] (reads to EOF, replies `"<count> <fnv1a64 hex>\n"`),
//! [`Server::counter`] (reads to EOF, replies `"<count>\n"`; cheap, for throughput),
//! [`Server::peer_reporter`] (writes the peer `ip:port` it saw as one line, then closes).
//! Clients: [`send_and_verify`], [`send_to_sink`], [`read_peer`], [`http_get`].

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
    time::timeout,
};

/// How long a connect may take before the flow fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole exchange may take (plus [`io_timeout`]'s allowance for large payloads).
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

const BUF: usize = 64 * 1024;

/// The deadline for moving `len` bytes: [`IO_TIMEOUT`] plus 250 ms per MiB.
pub fn io_timeout(len: usize) -> Duration {
    IO_TIMEOUT + Duration::from_millis(250 * (len as u64 >> 20))
}

/// `len` bytes of a deterministic pseudo-random stream, different for each `seed`: a byte
/// dropped, duplicated or moved shows up as a mismatch at a precise offset.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a 64, fed incrementally: order-sensitive and independent of how the bytes were chunked.
#[derive(Clone, Copy, Debug)]
pub struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
}

impl Checksum {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn value(self) -> u64 {
        self.0
    }

    pub fn of(bytes: &[u8]) -> u64 {
        let mut c = Checksum::default();
        c.update(bytes);
        c.value()
    }
}

/// What a client saw of one finished flow.
#[derive(Clone, Debug)]
pub struct FlowReport {
    /// The client socket's own address.
    pub local: SocketAddr,
    /// The address the client connected to.
    pub peer: SocketAddr,
    pub bytes_sent: usize,
    pub bytes_received: usize,
    pub elapsed: Duration,
}

/// What [`read_peer`] learned: the client's own address and the one the server saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerReport {
    pub local: SocketAddr,
    pub seen_by_server: SocketAddr,
}

type Handler = Arc<
    dyn Fn(TcpStream, SocketAddr) -> Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send + Sync,
>;

#[derive(Default)]
struct ServerLog {
    accepted: AtomicUsize,
    peers: Mutex<Vec<SocketAddr>>,
    errors: Mutex<Vec<String>>,
}

/// What an HTTP server recorded of each request it answered (the echo's report), in order.
pub type RequestLog = Arc<Mutex<Vec<serde_json::Value>>>;

/// A running test server; dropping it stops the accept loop and every connection it serves.
pub struct Server {
    local: SocketAddr,
    task: JoinHandle<()>,
    log: Arc<ServerLog>,
    requests: RequestLog,
}

impl Server {
    /// Serves each accepted connection with `handler` on its own task.
    pub fn custom<F, Fut>(listener: TcpListener, handler: F) -> Server
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |s, p| Box::pin(handler(s, p)));
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let log = Arc::new(ServerLog::default());
        let task = tokio::spawn(accept_loop(listener, handler, log.clone()));
        Server {
            local,
            task,
            log,
            requests: RequestLog::default(),
        }
    }

    /// Gives an HTTP server the log its handler records requests in.
    pub fn with_requests(mut self, requests: RequestLog) -> Server {
        self.requests = requests;
        self
    }

    /// The requests an HTTP server answered so far (empty for other servers).
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes back everything it reads; closes its write side after the client's EOF.
    pub fn echo(listener: TcpListener) -> Server {
        Server::custom(listener, |stream, _| echo(stream))
    }

    /// Reads to EOF, then replies `"<count> <fnv1a64 as 16 hex>\n"` and closes (see [`send_to_sink`]).
    pub fn sink(listener: TcpListener) -> Server {
        Server::custom(listener, |stream, _| sink(stream, true))
    }

    /// Reads to EOF, then replies `"<count>\n"` and closes: a sink cheap enough for throughput runs.
    pub fn counter(listener: TcpListener) -> Server {
        Server::custom(listener, |stream, _| sink(stream, false))
    }

    /// Writes the peer address it saw (`ip:port\n`), then closes (see [`read_peer`]).
    pub fn peer_reporter(listener: TcpListener) -> Server {
        Server::custom(listener, |mut stream, peer| async move {
            stream.write_all(format!("{peer}\n").as_bytes()).await?;
            stream.shutdown().await?;
            Ok(())
        })
    }

    /// The listening address (`0.0.0.0:port` for a wildcard listener).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn port(&self) -> u16 {
        self.local.port()
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.log.accepted.load(Ordering::SeqCst)
    }

    /// The peer address of every accepted connection, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.log
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Errors of accepts and of connection handlers so far.
    pub fn errors(&self) -> Vec<String> {
        self.log
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, handler: Handler, log: Arc<ServerLog>) {
    // Owned here so that aborting the accept loop also ends every connection it serves.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    log.accepted.fetch_add(1, Ordering::SeqCst);
                    log.peers.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                    let (handler, log) = (handler.clone(), log.clone());
                    connections.spawn(async move {
                        if let Err(e) = handler(stream, peer).await {
                            log.errors.lock().unwrap_or_else(|e| e.into_inner())
                                .push(format!("{peer}: {e:#}"));
                        }
                    });
                }
                Err(e) => {
                    log.errors.lock().unwrap_or_else(|e| e.into_inner()).push(format!("accept: {e}"));
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn echo(stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(BUF, rd);
    tokio::io::copy_buf(&mut rd, &mut wr).await?;
    wr.shutdown().await?;
    Ok(())
}

async fn sink(mut stream: TcpStream, checksum: bool) -> Result<()> {
    let mut buf = vec![0u8; BUF];
    let mut count = 0u64;
    let mut sum = Checksum::default();
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        count += n as u64;
        if checksum {
            sum.update(&buf[..n]);
        }
    }
    let reply = if checksum {
        format!("{count} {:016x}\n", sum.value())
    } else {
        format!("{count}\n")
    };
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Sends `len` bytes of [`pattern`] to an echo server while reading the echo back, checks every
/// byte arrives intact and in order, then half-closes and expects the server's EOF.
pub async fn send_and_verify(stream: TcpStream, len: usize) -> Result<FlowReport> {
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    let data = Arc::new(pattern(len as u64 ^ u64::from(local.port()), len));
    let start = Instant::now();
    let (mut rd, mut wr) = stream.into_split();
    let sent = data.clone();
    let writer = async move {
        wr.write_all(&sent).await.context("sending")?;
        wr.shutdown().await.context("half-closing")?;
        anyhow::Ok(wr)
    };
    let reader = async move {
        let mut buf = vec![0u8; BUF];
        let mut got = 0usize;
        loop {
            let n = rd
                .read(&mut buf)
                .await
                .with_context(|| format!("reading the echo after {got} of {len} bytes"))?;
            if n == 0 {
                break;
            }
            ensure!(
                got + n <= len,
                "echo returned more than the {len} bytes sent"
            );
            if buf[..n] != data[got..got + n] {
                let at = got
                    + buf[..n]
                        .iter()
                        .zip(&data[got..])
                        .take_while(|(a, b)| a == b)
                        .count();
                bail!("echoed stream differs from what was sent at byte {at} of {len}");
            }
            got += n;
        }
        ensure!(
            got == len,
            "connection closed after {got} of {len} echoed bytes"
        );
        anyhow::Ok(got)
    };
    let (wr, got) = timeout(io_timeout(len), async { tokio::try_join!(writer, reader) })
        .await
        .with_context(|| format!("echo of {len} bytes {local} -> {peer}: timed out"))?
        .with_context(|| format!("echo of {len} bytes {local} -> {peer}"))?;
    drop(wr);
    Ok(FlowReport {
        local,
        peer,
        bytes_sent: len,
        bytes_received: got,
        elapsed: start.elapsed(),
    })
}

/// Sends `len` bytes of [`pattern`] to a [`Server::sink`], half-closes, then reads the sink's
/// reply and checks the count and checksum: the client's write side is shut while it still reads.
pub async fn send_to_sink(mut stream: TcpStream, len: usize) -> Result<FlowReport> {
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    let data = pattern(len as u64 ^ u64::from(local.port()) ^ 0x5eed, len);
    let start = Instant::now();
    let exchange = async {
        stream.write_all(&data).await.context("sending")?;
        stream.shutdown().await.context("half-closing")?;
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .await
            .context("reading the sink's reply after half-close")?;
        anyhow::Ok(reply)
    };
    let reply = timeout(io_timeout(len), exchange)
        .await
        .with_context(|| format!("sink flow of {len} bytes {local} -> {peer}: timed out"))?
        .with_context(|| format!("sink flow of {len} bytes {local} -> {peer}"))?;
    let expected = format!("{len} {:016x}", Checksum::of(&data));
    ensure!(
        reply.trim_end() == expected,
        "sink {peer} replied {:?}, expected {expected:?} (count and checksum of what was sent)",
        reply.trim_end()
    );
    Ok(FlowReport {
        local,
        peer,
        bytes_sent: len,
        bytes_received: reply.len(),
        elapsed: start.elapsed(),
    })
}

/// Reads the line a [`Server::peer_reporter`] writes: the client address as the server saw it.
pub async fn read_peer(mut stream: TcpStream) -> Result<PeerReport> {
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    let mut line = String::new();
    timeout(IO_TIMEOUT, stream.read_to_string(&mut line))
        .await
        .with_context(|| format!("peer report from {peer}: timed out"))?
        .with_context(|| format!("peer report from {peer}"))?;
    let seen_by_server = line
        .trim()
        .parse()
        .with_context(|| format!("peer report from {peer} is not ip:port: {line:?}"))?;
    Ok(PeerReport {
        local,
        seen_by_server,
    })
}

/// An HTTP/1.1 response read to the end.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("body is not JSON: {}", self.body))
    }
}

/// `GET <path>` over `stream` with `Connection: close`; reads the whole response.
pub async fn http_get(mut stream: TcpStream, host: &str, path: &str) -> Result<HttpResponse> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mesh-tests\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        io::Result::Ok(raw)
    };
    let raw = timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET {path} from {host}: timed out"))?
        .with_context(|| format!("GET {path} from {host}"))?;
    parse_http_response(&raw).with_context(|| format!("GET {path} from {host}"))
}

fn parse_http_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response has no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(rest.len() >= size + 2, "truncated chunk");
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_seed_dependent() {
        assert_eq!(pattern(7, 1000), pattern(7, 1000));
        assert_ne!(pattern(7, 64), pattern(8, 64));
        assert_eq!(pattern(7, 13), pattern(7, 1000)[..13]);
        assert_eq!(pattern(1, 0).len(), 0);
    }

    #[test]
    fn checksum_ignores_chunking_but_not_order() {
        let data = pattern(3, 10_000);
        let mut c = Checksum::default();
        for chunk in data.chunks(333) {
            c.update(chunk);
        }
        assert_eq!(c.value(), Checksum::of(&data));
        let mut swapped = data.clone();
        swapped.swap(10, 11);
        assert_ne!(Checksum::of(&swapped), Checksum::of(&data));
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
        assert_eq!((plain.status, plain.body.as_str()), (200, "ok"));
        assert_eq!(plain.header("content-length"), Some("2"));
        let chunked = parse_http_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((chunked.status, chunked.body.as_str()), (503, "not ready"));
    }

    #[tokio::test]
    async fn servers_and_clients_agree_on_loopback() {
        let local = |l: &TcpListener| l.local_addr().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo = Server::echo(listener);
        let to = SocketAddr::from(([127, 0, 0, 1], echo.port()));
        for len in [1, 64 * 1024, 3 * 1024 * 1024 + 7] {
            let report = send_and_verify(TcpStream::connect(to).await.unwrap(), len)
                .await
                .unwrap();
            assert_eq!(report.bytes_received, len);
        }
        assert_eq!(echo.accepted(), 3);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink_addr = local(&listener);
        let _sink = Server::sink(listener);
        send_to_sink(TcpStream::connect(sink_addr).await.unwrap(), 200_000)
            .await
            .unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer_addr = local(&listener);
        let reporter = Server::peer_reporter(listener);
        let seen = read_peer(TcpStream::connect(peer_addr).await.unwrap())
            .await
            .unwrap();
        assert_eq!(seen.local, seen.seen_by_server);
        assert_eq!(reporter.peers(), vec![seen.local]);
    }
}
