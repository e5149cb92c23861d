//! The hitless upgrade: on node 1 (web-2's, the inbound side of every connection) a second
//! agent takes the listeners over under load and the first is told to stop; against the
//! baseline of a restart (stop the agent, then start a fresh one: a DaemonSet rollout with
//! `maxSurge: 0`). The load runs from `shop/web-1` (node 0) to an echo server in `shop/web-2`:
//! long-lived connections that echo a small chunk every 20 ms, and serial clients opening new
//! connections as fast as they can. Per phase: the new connections that failed, the longest
//! time without one completing, the long-lived connections broken.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow, ensure};
use mesh_tests::{Agent, AgentOptions, Cluster, ClusterSpec, Netns};
use nix::sys::signal::Signal;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    task::JoinHandle,
    time::Instant,
};

use super::{ECHO_PORT, median, start_servers, wait_listening, widen_port_range};

/// The node whose agent is replaced.
const NODE: usize = 1;
const LONG_LIVED: usize = 20;
/// Serial clients opening new connections.
const OPENERS: usize = 2;
const CHUNK: usize = 64;
const CHUNK_EVERY: Duration = Duration::from_millis(20);
/// The openers' deadline for the connect, and again for the echo: a SYN retransmitted
/// once (after 1 s) still makes it, one dropped twice does not.
const OPENER_TIMEOUT: Duration = Duration::from_secs(2);
/// A long-lived connection whose echo takes longer counts as broken (stalled).
const STALL: Duration = Duration::from_secs(2);
/// When in the phase the agent is replaced, and how long the load runs at least.
const EVENT_AT: Duration = Duration::from_secs(1);
const LOAD_FOR: Duration = Duration::from_secs(4);
/// The load goes on at least this long after the replacement, to see the node serve again.
const AFTER_EVENT: Duration = Duration::from_secs(1);
/// At most this many rounds of `MESH_BENCH_ROUNDS`: each starts five agents.
const MAX_ROUNDS: usize = 3;
/// Bound on the waits for an agent's log line or exit: free when things work.
const SETTLE: Duration = Duration::from_secs(20);
/// How long a stopped agent gets to exit after a phase before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Takeover,
    Restart,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Takeover => "takeover",
            Kind::Restart => "restart",
        }
    }

    /// `--drain-timeout`: longer than the phase for the takeover, so no long-lived
    /// connection is cut by it; 1 s for the restart, whose stopped agent resets them then
    /// (with 30 s the rollout would only wait longer to break them the same way).
    fn drain_seconds(self) -> &'static str {
        match self {
            Kind::Takeover => "30",
            Kind::Restart => "1",
        }
    }

    fn options(self) -> AgentOptions {
        AgentOptions::default()
            .arg("--drain-timeout")
            .arg(self.drain_seconds())
    }
}

/// What a new connection came to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Opened {
    Echoed,
    Refused,
    Reset,
    /// No connect, or no echo, within [`OPENER_TIMEOUT`].
    TimedOut,
    /// A clean end (FIN) before the echo.
    Closed,
    Other(String),
}

impl Opened {
    fn of(e: &io::Error) -> Opened {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Opened::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Opened::Reset,
            io::ErrorKind::UnexpectedEof => Opened::Closed,
            io::ErrorKind::TimedOut => Opened::TimedOut,
            _ => Opened::Other(e.to_string()),
        }
    }
}

/// How a long-lived connection broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Break {
    Reset,
    Closed,
    Stalled,
    Altered,
    Other,
}

impl Break {
    fn of(e: &io::Error) -> Break {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Break::Reset,
            io::ErrorKind::UnexpectedEof => Break::Closed,
            _ => Break::Other,
        }
    }
}

/// A long-lived connection's end: the bytes it verified, and how it broke if it did.
struct LongLived {
    verified: u64,
    broke: Option<(Break, String)>,
}

/// What the clients saw in one phase.
#[derive(Clone, Default)]
struct Observed {
    attempted: u64,
    echoed: u64,
    refused: u64,
    reset: u64,
    timed_out: u64,
    closed: u64,
    other: u64,
    /// The longest time without a new connection completing, from the first one to the
    /// end of the load (so a node that never serves again does not look fine).
    longest_gap: Duration,
    long_lived_broken: usize,
    long_lived_verified: u64,
    /// A few of the failures, to tell what they were.
    examples: Vec<String>,
}

impl Observed {
    fn failed(&self) -> u64 {
        self.attempted - self.echoed
    }
}

pub async fn run(asked: usize) -> Result<bool> {
    let rounds = asked.min(MAX_ROUNDS);
    println!();
    println!(
        "upgrade: node 1's agent replaced under load, shop/web-1 -> shop/web-2: {LONG_LIVED} \
         long-lived connections ({CHUNK} B echoed every {} ms), {OPENERS} serial clients \
         opening new ones ({} s timeouts); {rounds} round(s) of the {asked} asked (at most \
         {MAX_ROUNDS})",
        CHUNK_EVERY.as_millis(),
        OPENER_TIMEOUT.as_secs(),
    );
    println!(
        "  takeover: a second agent takes the listeners over, then the first gets SIGTERM \
         (--drain-timeout {}); restart: SIGTERM, exit, then a fresh agent (--drain-timeout {}: \
         the stopped agent resets the long-lived connections after 1 s rather than 30)",
        Kind::Takeover.drain_seconds(),
        Kind::Restart.drain_seconds(),
    );
    // Shared with the client tasks.
    let cluster = Arc::new(Cluster::new(ClusterSpec::shop_and_legacy())?);
    widen_port_range(&cluster)?;
    let web2 = cluster.pod("shop", "web-2");
    let _servers = start_servers(web2)?;
    wait_listening(web2).await?;
    let to = web2.addr(ECHO_PORT);

    let mut takeover = Vec::new();
    let mut restart = Vec::new();
    let mut complete = true;
    for round in 1..=rounds {
        println!("  round {round}/{rounds}");
        for kind in [Kind::Takeover, Kind::Restart] {
            let mut agents = Vec::new();
            let result = phase(&cluster, kind, to, &mut agents).await;
            // A stopped agent leaves the data plane failing closed; the next phase starts bare.
            stop_agents(&mut agents).await;
            for node in 0..cluster.nodes().len() {
                if let Err(e) = cluster.uninstall(node) {
                    eprintln!("bench: {e:#}");
                }
            }
            match result {
                Ok(observed) => match kind {
                    Kind::Takeover => takeover.push(observed),
                    Kind::Restart => restart.push(observed),
                },
                Err(e) => {
                    println!("    {}: FAILED: {e:#}", kind.name());
                    complete = false;
                }
            }
        }
    }
    print_table(&takeover, &restart);
    Ok(complete)
}

/// Agents on both nodes, the load, and node 1's agent replaced at [`EVENT_AT`]. Every agent
/// started is left in `agents` for the caller to stop.
async fn phase(
    cluster: &Arc<Cluster>,
    kind: Kind,
    to: SocketAddr,
    agents: &mut Vec<Agent>,
) -> Result<Observed> {
    for node in cluster.nodes() {
        agents.push(
            cluster
                .start_agent_with(node.index, kind.options())
                .await
                .with_context(|| format!("starting the agent on {}", node.name))?,
        );
    }
    let load = Load::start(cluster, to).await?;
    tokio::time::sleep_until(load.started + EVENT_AT).await;
    let event = match kind {
        Kind::Takeover => take_over(cluster, agents, load.started).await,
        Kind::Restart => restart(cluster, agents, load.started).await,
    };
    if event.is_ok() {
        let until = (load.started + LOAD_FOR).max(Instant::now() + AFTER_EVENT);
        tokio::time::sleep_until(until).await;
    }
    let (observed, took) = load.stop().await?;
    println!("    {}: {}", kind.name(), event?);
    if kind == Kind::Takeover {
        // Its connections closed by the clients, the first agent has drained and exits.
        let ended = Instant::now();
        match agents[NODE].wait_exit(SETTLE).await {
            Ok(status) => println!(
                "      the first agent exited ({status}) {:.0} ms after the load ended",
                ms(ended.elapsed())
            ),
            Err(_) => println!(
                "      the first agent was still running {} s after the load ended:\n{}",
                SETTLE.as_secs(),
                agents[NODE].log_tail(10)
            ),
        }
    }
    print_observed(&observed, took);
    Ok(observed)
}

/// A second agent on [`NODE`] takes the listeners over; once it serves, the first is told
/// to stop (it drains meanwhile and is not waited for).
async fn take_over(cluster: &Cluster, agents: &mut Vec<Agent>, started: Instant) -> Result<String> {
    let begun = started.elapsed();
    let mut successor = cluster
        .start_agent_with(NODE, Kind::Takeover.options())
        .await
        .context("starting the second agent")?;
    // The readiness port is handed over too, so the probe may have reached the first agent:
    // the second's own log says when it serves.
    successor.wait_for_log("mesh-agent ready", SETTLE).await?;
    let log = successor.log();
    ensure!(
        log.contains("took the listeners over"),
        "the second agent did not take the listeners over:\n{}",
        successor.log_tail(20)
    );
    agents[NODE]
        .wait_for_log("handed the listeners over", SETTLE)
        .await?;
    let serving = started.elapsed();
    agents[NODE].signal(Signal::SIGTERM)?;
    agents.push(successor);
    Ok(format!(
        "second agent started at {:.2} s, serving at {:.2} s; the first told to stop then",
        begun.as_secs_f64(),
        serving.as_secs_f64()
    ))
}

/// [`NODE`]'s agent is told to stop and exits; then a fresh one starts.
async fn restart(cluster: &Cluster, agents: &mut Vec<Agent>, started: Instant) -> Result<String> {
    let begun = started.elapsed();
    agents[NODE].signal(Signal::SIGTERM)?;
    let status = agents[NODE].wait_exit(SETTLE).await?;
    let exited = started.elapsed();
    let fresh = cluster
        .start_agent_with(NODE, Kind::Restart.options())
        .await
        .context("starting the fresh agent")?;
    let ready = started.elapsed();
    agents.push(fresh);
    Ok(format!(
        "agent told to stop at {:.2} s, exited ({status}) at {:.2} s; a fresh one ready at {:.2} s",
        begun.as_secs_f64(),
        exited.as_secs_f64(),
        ready.as_secs_f64()
    ))
}

/// SIGTERM to every agent still running, then each reaped; one that ignores it is killed.
async fn stop_agents(agents: &mut [Agent]) {
    for agent in agents.iter_mut() {
        if agent.is_running()
            && let Err(e) = agent.signal(Signal::SIGTERM)
        {
            eprintln!("bench: {e:#}");
        }
    }
    for agent in agents.iter_mut() {
        if agent.wait_exit(STOP_WITHIN).await.is_err() {
            eprintln!(
                "bench: agent {} on {} ignored SIGTERM for {STOP_WITHIN:?}; killing it",
                agent.pid(),
                agent.node_name()
            );
            if let Err(e) = agent.kill() {
                eprintln!("bench: {e:#}");
            }
        }
    }
}

/// The clients of one phase, running until [`Load::stop`].
struct Load {
    started: Instant,
    stop: Arc<AtomicBool>,
    long_lived: Vec<JoinHandle<LongLived>>,
    openers: Vec<JoinHandle<Vec<(Instant, Opened)>>>,
}

impl Load {
    /// Opens the long-lived connections (each echoes once before the clock starts), then
    /// starts them and the openers.
    async fn start(cluster: &Arc<Cluster>, to: SocketAddr) -> Result<Load> {
        let web1 = cluster.pod("shop", "web-1");
        let mut streams = Vec::with_capacity(LONG_LIVED);
        for id in 0..LONG_LIVED {
            let mut stream = web1
                .connect(to)
                .await
                .with_context(|| format!("opening long-lived connection {id}"))?;
            echo_chunk(&mut stream, id, 0)
                .await
                .map_err(|(_, e)| anyhow!("long-lived connection {id}: {e}"))?;
            streams.push(stream);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let long_lived = streams
            .into_iter()
            .enumerate()
            .map(|(id, stream)| tokio::spawn(stream_until(stream, id, stop.clone())))
            .collect();
        let openers = (0..OPENERS)
            .map(|_| {
                let (cluster, stop) = (cluster.clone(), stop.clone());
                tokio::spawn(async move {
                    let web1 = cluster.pod("shop", "web-1").netns();
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let opened = open_once(web1, to).await;
                        seen.push((Instant::now(), opened));
                    }
                    seen
                })
            })
            .collect();
        Ok(Load {
            started,
            stop,
            long_lived,
            openers,
        })
    }

    /// Stops the clients and tallies what they saw; also returns how long the load ran.
    async fn stop(self) -> Result<(Observed, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        let stopped = Instant::now();
        let mut observed = Observed::default();
        let mut outcomes = Vec::new();
        for opener in self.openers {
            outcomes.extend(opener.await.context("opener task")?);
        }
        outcomes.sort_by_key(|(at, _)| *at);
        let mut completed = Vec::new();
        for (at, opened) in outcomes {
            observed.attempted += 1;
            let count = match &opened {
                Opened::Echoed => {
                    completed.push(at);
                    &mut observed.echoed
                }
                Opened::Refused => &mut observed.refused,
                Opened::Reset => &mut observed.reset,
                Opened::TimedOut => &mut observed.timed_out,
                Opened::Closed => &mut observed.closed,
                Opened::Other(_) => &mut observed.other,
            };
            *count += 1;
            if opened != Opened::Echoed && observed.examples.len() < 3 {
                let at = secs(at, self.started);
                observed
                    .examples
                    .push(format!("new connection at {at:.2} s: {opened:?}"));
            }
        }
        observed.longest_gap = longest_gap(completed, stopped);
        for (id, task) in self.long_lived.into_iter().enumerate() {
            let LongLived { verified, broke } = task.await.context("long-lived task")?;
            observed.long_lived_verified += verified;
            if let Some((how, what)) = broke {
                observed.long_lived_broken += 1;
                if observed.examples.len() < 6 {
                    observed
                        .examples
                        .push(format!("long-lived {id}: {how:?}: {what}"));
                }
            }
        }
        Ok((observed, stopped - self.started))
    }
}

/// The longest time between two completed connections, or from the last one to `end`.
fn longest_gap(mut completed: Vec<Instant>, end: Instant) -> Duration {
    completed.sort();
    let Some(&first) = completed.first() else {
        return Duration::ZERO;
    };
    let last = completed.last().copied().unwrap_or(first);
    let tail = end.saturating_duration_since(last);
    completed
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
        .max(tail)
}

/// Connects from `netns` to the echo server at `to`, sends a line, expects it back, closes.
async fn open_once(netns: &Netns, to: SocketAddr) -> Opened {
    let socket = match netns.tcp_socket() {
        Ok(socket) => TcpSocket::from_std_stream(socket.into()),
        Err(e) => return Opened::Other(format!("{e:#}")),
    };
    let mut stream = match tokio::time::timeout(OPENER_TIMEOUT, socket.connect(to)).await {
        Err(_) => return Opened::TimedOut,
        Ok(Err(e)) => return Opened::of(&e),
        Ok(Ok(stream)) => stream,
    };
    let echo = async {
        stream.write_all(b"ping\n").await?;
        let mut back = [0u8; 5];
        stream.read_exact(&mut back).await?;
        io::Result::Ok(&back == b"ping\n")
    };
    match tokio::time::timeout(OPENER_TIMEOUT, echo).await {
        Err(_) => Opened::TimedOut,
        Ok(Err(e)) => Opened::of(&e),
        Ok(Ok(true)) => Opened::Echoed,
        Ok(Ok(false)) => Opened::Other("the echo differs".to_owned()),
    }
}

/// Echoes chunk `seq` of connection `id` (a pattern of both) and checks it; the bytes
/// verified, or how the connection broke.
async fn echo_chunk(stream: &mut TcpStream, id: usize, seq: u64) -> Result<u64, (Break, String)> {
    let chunk: Vec<u8> = (0..CHUNK)
        .map(|i| (id as u64 * 31 + seq * 7 + i as u64) as u8)
        .collect();
    let exchange = async {
        stream.write_all(&chunk).await?;
        let mut back = vec![0u8; CHUNK];
        stream.read_exact(&mut back).await?;
        io::Result::Ok(back == chunk)
    };
    match tokio::time::timeout(STALL, exchange).await {
        Err(_) => Err((
            Break::Stalled,
            format!("chunk {seq}: no echo within {STALL:?}"),
        )),
        Ok(Err(e)) => Err((Break::of(&e), format!("chunk {seq}: {e}"))),
        Ok(Ok(true)) => Ok(CHUNK as u64),
        Ok(Ok(false)) => Err((Break::Altered, format!("chunk {seq} came back altered"))),
    }
}

/// Echoes a chunk every [`CHUNK_EVERY`] until `stop`, then half-closes and expects the
/// echo server's clean end.
async fn stream_until(mut stream: TcpStream, id: usize, stop: Arc<AtomicBool>) -> LongLived {
    let mut verified = 0;
    for seq in 1.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match echo_chunk(&mut stream, id, seq).await {
            Ok(bytes) => verified += bytes,
            Err(broke) => {
                return LongLived {
                    verified,
                    broke: Some(broke),
                };
            }
        }
        tokio::time::sleep(CHUNK_EVERY).await;
    }
    let end = async {
        stream.shutdown().await?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await?;
        io::Result::Ok(rest.len())
    };
    let broke = match tokio::time::timeout(STALL, end).await {
        Err(_) => Some((Break::Stalled, format!("no end within {STALL:?}"))),
        Ok(Err(e)) => Some((Break::of(&e), format!("at the end: {e}"))),
        Ok(Ok(0)) => None,
        Ok(Ok(n)) => Some((Break::Altered, format!("{n} unexpected bytes at the end"))),
    };
    LongLived { verified, broke }
}

fn print_observed(o: &Observed, took: Duration) {
    println!(
        "      new connections: {} in {:.1} s, {} failed (refused {}, reset {}, timed out {}, \
         closed {}, other {}); longest gap {:.0} ms",
        o.attempted,
        took.as_secs_f64(),
        o.failed(),
        o.refused,
        o.reset,
        o.timed_out,
        o.closed,
        o.other,
        ms(o.longest_gap)
    );
    println!(
        "      long-lived: {} of {LONG_LIVED} reset or broken, {} bytes verified",
        o.long_lived_broken, o.long_lived_verified
    );
    for example in &o.examples {
        println!("      e.g. {example}");
    }
}

fn print_table(takeover: &[Observed], restart: &[Observed]) {
    type Pick = fn(&Observed) -> f64;
    let rows: [(&str, Pick, usize); 11] = [
        ("new connections attempted", |o| o.attempted as f64, 0),
        ("  echoed", |o| o.echoed as f64, 0),
        ("  failed", |o| o.failed() as f64, 0),
        ("    refused", |o| o.refused as f64, 0),
        ("    reset", |o| o.reset as f64, 0),
        ("    timed out", |o| o.timed_out as f64, 0),
        ("    closed without the echo", |o| o.closed as f64, 0),
        ("    other", |o| o.other as f64, 0),
        ("longest gap, ms", |o| ms(o.longest_gap), 0),
        (
            "long-lived reset or broken (of 20)",
            |o| o.long_lived_broken as f64,
            0,
        ),
        (
            "long-lived bytes verified",
            |o| o.long_lived_verified as f64,
            0,
        ),
    ];
    let median_of = |runs: &[Observed], pick: Pick| median(runs.iter().map(pick).collect());
    let show = |v: Option<f64>, decimals: usize| {
        v.map_or("failed".to_owned(), |v| format!("{v:.decimals$}"))
    };
    println!();
    println!(
        "upgrade, median of {} takeover and {} restart phase(s):",
        takeover.len(),
        restart.len()
    );
    println!("{:<36} {:>12} {:>12}", "", "takeover", "restart");
    for (name, pick, decimals) in rows {
        println!(
            "{name:<36} {:>12} {:>12}",
            show(median_of(takeover, pick), decimals),
            show(median_of(restart, pick), decimals)
        );
    }
    let gap = |runs: &[Observed]| median_of(runs, |o| ms(o.longest_gap));
    if let (Some(t), Some(r)) = (gap(takeover), gap(restart))
        && t > 0.0
        && r > 0.0
    {
        println!("longest gap, restart/takeover: {:.1}", r / t);
    }
    if !takeover.is_empty() {
        let failed: u64 = takeover.iter().map(Observed::failed).sum();
        let broken: usize = takeover.iter().map(|o| o.long_lived_broken).sum();
        let gap = takeover
            .iter()
            .map(|o| o.longest_gap)
            .max()
            .unwrap_or_default();
        println!(
            "takeover: {failed} refused/failed (goal 0), longest gap {:.0} ms, {broken} \
             long-lived reset (goal 0) [{} phase(s): failures summed, the longest gap]",
            ms(gap),
            takeover.len()
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn secs(at: Instant, since: Instant) -> f64 {
    at.saturating_duration_since(since).as_secs_f64()
}
