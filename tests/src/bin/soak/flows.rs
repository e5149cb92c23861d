//! The soak's traffic: long-lived connections that each send a deterministic byte stream in
//! small chunks and check every echoed byte, and the exact tally of what they did.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use mesh_tests::Pod;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
    task::JoinSet,
    time::{Instant, MissedTickBehavior, timeout},
};

/// Connects in flight at once while the connections are opened: the agents' accept queues and
/// handshake budgets see a steady ramp rather than one burst of thousands of SYNs.
const OPENING_AT_ONCE: usize = 64;
/// Each connection sends one chunk per period, at its own offset within the period.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Chunk sizes, drawn per chunk from the connection's own generator.
pub const CHUNK_MIN: usize = 64;
pub const CHUNK_MAX: usize = 1024;
/// An echo (or the final EOF) that takes longer than this counts as a stalled connection.
const ECHO_TIMEOUT: Duration = Duration::from_secs(30);
/// Error messages kept for the report; the counters hold the rest.
const KEPT_ERRORS: usize = 10;

/// The bytes of connection `seed`, produced on demand: the same sequence as
/// `mesh_tests::traffic::pattern(seed, len)`, so a byte dropped, duplicated or moved anywhere in
/// ten minutes of traffic shows as a mismatch at a precise offset.
pub struct PatternStream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl PatternStream {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
            word: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for byte in out {
            if self.used == 8 {
                // xorshift64*, as traffic::pattern.
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }
}

/// SplitMix64: a connection's start offset and chunk sizes, apart from its byte stream.
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// How a connection ended badly.
#[derive(Clone, Copy, Debug)]
pub enum Failure {
    /// Reset or broken by the other side (ECONNRESET, EPIPE, ...).
    Broken,
    /// No echo (or no EOF at the end) within [`ECHO_TIMEOUT`].
    Stalled,
    /// An echoed byte differed from the one sent.
    Mismatch,
    /// EOF before every byte sent came back, or bytes after the end.
    Truncated,
}

/// What every client connection did, counted exactly.
#[derive(Default)]
pub struct Tally {
    pub opened: AtomicUsize,
    pub connect_failed: AtomicUsize,
    /// Connections holding now: opened and not yet ended.
    pub open: AtomicUsize,
    pub sent: AtomicU64,
    /// Echoed bytes that matched what was sent.
    pub echoed: AtomicU64,
    pub chunks: AtomicU64,
    pub broken: AtomicUsize,
    pub stalled: AtomicUsize,
    pub mismatched: AtomicUsize,
    pub truncated: AtomicUsize,
    /// Ended by half-close, every byte echoed, then the server's EOF.
    pub closed_clean: AtomicUsize,
    /// The slowest echo of one chunk, µs.
    pub slowest_echo_us: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    pub fn failures(&self) -> usize {
        [
            &self.connect_failed,
            &self.broken,
            &self.stalled,
            &self.mismatched,
            &self.truncated,
        ]
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .sum()
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn fail(&self, kind: Failure, message: String) {
        let counter = match kind {
            Failure::Broken => &self.broken,
            Failure::Stalled => &self.stalled,
            Failure::Mismatch => &self.mismatched,
            Failure::Truncated => &self.truncated,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        self.keep_error(message);
    }

    fn keep_error(&self, message: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < KEPT_ERRORS {
            errors.push(message);
        }
    }
}

/// Opens `count` connections from `client` to `to`, [`OPENING_AT_ONCE`] at a time. A connect
/// that fails is counted and the rest go on; the streams come back in connection order.
pub async fn open_all(
    client: &Pod,
    to: SocketAddr,
    count: usize,
    tally: &Arc<Tally>,
) -> Vec<(usize, TcpStream)> {
    let gate = Arc::new(Semaphore::new(OPENING_AT_ONCE));
    let mut opening = JoinSet::new();
    let mut streams = Vec::with_capacity(count);
    for id in 0..count {
        let permit = gate.clone().acquire_owned().await.expect("never closed");
        // The socket is made in the pod's namespace by the harness's worker thread; the
        // connect itself runs on this runtime.
        let socket = client.netns().tcp_socket();
        opening.spawn(async move {
            let stream = match socket {
                Ok(socket) => connect(socket, to).await,
                Err(e) => Err(e),
            };
            drop(permit);
            (id, stream)
        });
        while let Some(done) = opening.try_join_next() {
            collect(done, &mut streams, tally);
        }
    }
    while let Some(done) = opening.join_next().await {
        collect(done, &mut streams, tally);
    }
    streams.sort_by_key(|(id, _)| *id);
    streams
}

async fn connect(socket: socket2::Socket, to: SocketAddr) -> Result<TcpStream> {
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    let stream = timeout(ECHO_TIMEOUT, socket.connect(to))
        .await
        .with_context(|| format!("connect to {to}: no answer within {ECHO_TIMEOUT:?}"))?
        .with_context(|| format!("connect to {to}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn collect(
    done: Result<(usize, Result<TcpStream>), tokio::task::JoinError>,
    streams: &mut Vec<(usize, TcpStream)>,
    tally: &Tally,
) {
    match done {
        Ok((id, Ok(stream))) => {
            tally.opened.fetch_add(1, Ordering::SeqCst);
            streams.push((id, stream));
        }
        Ok((id, Err(e))) => {
            tally.connect_failed.fetch_add(1, Ordering::SeqCst);
            tally.keep_error(format!("connection {id}: {e:#}"));
        }
        Err(e) => {
            tally.connect_failed.fetch_add(1, Ordering::SeqCst);
            tally.keep_error(format!("opening a connection: {e}"));
        }
    }
}

/// Holds connection `id` from `start` until `end`: one chunk per [`PERIOD`] at the
/// connection's own offset, each echo checked byte for byte; then a half-close, which must
/// bring the server's EOF and nothing more.
pub async fn hold(
    id: usize,
    mut stream: TcpStream,
    start: Instant,
    end: Instant,
    tally: Arc<Tally>,
) {
    tally.open.fetch_add(1, Ordering::SeqCst);
    let outcome = exchange(id, &mut stream, start, end, &tally).await;
    tally.open.fetch_sub(1, Ordering::SeqCst);
    match outcome {
        Ok(()) => {
            tally.closed_clean.fetch_add(1, Ordering::SeqCst);
        }
        Err((kind, message)) => tally.fail(kind, format!("connection {id}: {message}")),
    }
}

type Ended = std::result::Result<(), (Failure, String)>;

async fn exchange(
    id: usize,
    stream: &mut TcpStream,
    start: Instant,
    end: Instant,
    tally: &Tally,
) -> Ended {
    let mut draws = Draws(id as u64);
    let offset = Duration::from_micros(draws.below(PERIOD.as_micros() as u64));
    let (mut sending, mut expecting) =
        (PatternStream::new(id as u64), PatternStream::new(id as u64));
    let (mut chunk, mut expected, mut echo) =
        ([0u8; CHUNK_MAX], [0u8; CHUNK_MAX], [0u8; CHUNK_MAX]);
    let mut ticks = tokio::time::interval_at(start + offset, PERIOD);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut at = 0u64;
    loop {
        if ticks.tick().await >= end {
            break;
        }
        let len = CHUNK_MIN + draws.below((CHUNK_MAX - CHUNK_MIN + 1) as u64) as usize;
        sending.fill(&mut chunk[..len]);
        let sent_at = Instant::now();
        stream
            .write_all(&chunk[..len])
            .await
            .map_err(|e| (Failure::Broken, format!("sending at byte {at}: {e}")))?;
        tally.sent.fetch_add(len as u64, Ordering::SeqCst);
        expecting.fill(&mut expected[..len]);
        read_echo(stream, &mut echo[..len], &expected[..len], at).await?;
        tally.echoed.fetch_add(len as u64, Ordering::SeqCst);
        tally.chunks.fetch_add(1, Ordering::SeqCst);
        let took = sent_at.elapsed().as_micros() as u64;
        tally.slowest_echo_us.fetch_max(took, Ordering::SeqCst);
        at += len as u64;
    }
    close(stream, at).await
}

/// Reads `echo.len()` bytes and compares them with `expected`; `at` is the stream offset of
/// the first one.
async fn read_echo(stream: &mut TcpStream, echo: &mut [u8], expected: &[u8], at: u64) -> Ended {
    let mut got = 0;
    while got < echo.len() {
        let n = match timeout(ECHO_TIMEOUT, stream.read(&mut echo[got..])).await {
            Err(_) => {
                return Err((
                    Failure::Stalled,
                    format!(
                        "no echo of byte {} within {ECHO_TIMEOUT:?}",
                        at + got as u64
                    ),
                ));
            }
            Ok(Err(e)) => {
                return Err((
                    Failure::Broken,
                    format!("reading the echo at byte {}: {e}", at + got as u64),
                ));
            }
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            return Err((
                Failure::Truncated,
                format!(
                    "EOF after {} echoed bytes, {} sent",
                    at + got as u64,
                    at + echo.len() as u64
                ),
            ));
        }
        if let Some(i) = (got..got + n).find(|&i| echo[i] != expected[i]) {
            return Err((
                Failure::Mismatch,
                format!(
                    "echoed byte {} differs ({:#04x}, sent {:#04x})",
                    at + i as u64,
                    echo[i],
                    expected[i]
                ),
            ));
        }
        got += n;
    }
    Ok(())
}

/// The clean end: half-close, then the server's EOF with no byte before it.
async fn close(stream: &mut TcpStream, at: u64) -> Ended {
    stream.shutdown().await.map_err(|e| {
        (
            Failure::Broken,
            format!("half-closing after {at} bytes: {e}"),
        )
    })?;
    let mut rest = [0u8; 64];
    match timeout(ECHO_TIMEOUT, stream.read(&mut rest)).await {
        Err(_) => Err((
            Failure::Stalled,
            format!("no EOF within {ECHO_TIMEOUT:?} of the half-close"),
        )),
        Ok(Err(e)) => Err((
            Failure::Broken,
            format!("waiting for EOF after {at} bytes: {e}"),
        )),
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(n)) => Err((
            Failure::Truncated,
            format!("{n} bytes more than sent after the half-close"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_the_harness_pattern_however_it_is_chunked() {
        let whole = mesh_tests::traffic::pattern(42, 10_000);
        let mut stream = PatternStream::new(42);
        let mut got = Vec::new();
        let mut draws = Draws(7);
        while got.len() < whole.len() {
            let len = (1 + draws.below(300) as usize).min(whole.len() - got.len());
            let mut chunk = vec![0u8; len];
            stream.fill(&mut chunk);
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, whole);
    }

    #[test]
    fn connections_draw_different_offsets_and_sizes() {
        let firsts: std::collections::BTreeSet<u64> =
            (0..100).map(|id| Draws(id).below(1_000_000)).collect();
        assert!(firsts.len() > 90, "offsets collide: {firsts:?}");
    }
}
