//! `cargo xtask bench`: what the mesh costs. On the demo's cluster, measures cross-node
//! single-stream throughput, 1 KiB request/response latency and new connections per second,
//! first between two pods of the unenrolled `legacy` namespace with no agent running (the
//! baseline), then between two pods of the enrolled `shop` namespace with an agent per node;
//! [`ROUNDS`] times in turn, and prints the medians with their mesh/plain ratios.
//!
//! `MESH_BENCH_ONLY=l7` (also part of the default run) measures the waypoint at L7 against no
//! proxy and against haproxy: see [`l7`].
//!
//! The servers run as separate processes in their pods (this binary, `bench serve`), the client
//! in this process, as real applications would: the baseline then includes the cross-process
//! wake-ups every real request pays, and the mesh figures are not flattered by a baseline
//! whose client and server share one thread.

mod l7;
mod state;
mod upgrade;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use mesh_tests::{AgentOptions, Cluster, ClusterSpec, Pod, Server, cputime, is_root, wakeup};
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

const COUNTER_PORT: u16 = 9000;
const ECHO_PORT: u16 = 9001;
const THROUGHPUT_FOR: Duration = Duration::from_secs(5);
const ROUND_TRIPS: usize = 5000;
const WARMUP_ROUND_TRIPS: usize = 200;
const MESSAGE: usize = 1024;
const CONNECTIONS_FOR: Duration = Duration::from_secs(3);
/// Plain and mesh measured in turn this many times; the table shows the medians.
const ROUNDS: usize = 3;

/// One figure of a [`Results`].
type Pick = fn(&Results) -> Option<f64>;

#[derive(Default, Clone, Copy)]
struct Results {
    gbit_per_s: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    conns_per_s: Option<f64>,
    /// Busy CPU time of the whole machine per connection, in the connection-rate phase.
    cpu_us_per_conn: Option<f64>,
}

/// Which figures to measure: all, or those `MESH_BENCH_ONLY` names (comma-separated:
/// `throughput`, `latency`, `connections`, `state`, `upgrade`, `l7`) — for quicker runs while
/// working on one of them.
#[derive(Clone, Copy)]
struct Figures {
    throughput: bool,
    latency: bool,
    connections: bool,
    /// The state at scale: memory, start-to-ready and rebuild time, event-to-capture latency.
    state: bool,
    /// An agent replaced under load: by a takeover, and by a restart for comparison.
    upgrade: bool,
    /// HTTP through the waypoint, against no proxy and against haproxy.
    l7: bool,
}

impl Figures {
    fn from_env() -> Result<Self> {
        let Ok(list) = std::env::var("MESH_BENCH_ONLY") else {
            return Ok(Self {
                throughput: true,
                latency: true,
                connections: true,
                state: true,
                upgrade: true,
                l7: true,
            });
        };
        let mut figures = Self {
            throughput: false,
            latency: false,
            connections: false,
            state: false,
            upgrade: false,
            l7: false,
        };
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "throughput" => figures.throughput = true,
                "latency" => figures.latency = true,
                "connections" => figures.connections = true,
                "state" => figures.state = true,
                "upgrade" => figures.upgrade = true,
                "l7" => figures.l7 = true,
                _ => anyhow::bail!(
                    "MESH_BENCH_ONLY: unknown figure {name:?} (throughput, latency, connections, state, upgrade, l7)"
                ),
            }
        }
        ensure!(
            figures.data_path() || figures.state || figures.upgrade || figures.l7,
            "MESH_BENCH_ONLY names no figure"
        );
        Ok(figures)
    }

    /// Whether any figure of the pod-to-pod path is asked for.
    fn data_path(&self) -> bool {
        self.throughput || self.latency || self.connections
    }
}

// One thread runs both clients and servers: no cross-thread wake-ups in the latency numbers,
// and the second core stays free for the agents and the kernel's softirq work.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("serve") => return serve().await,
        Some("serve-http") => return l7::serve_http(std::env::args().nth(2)).await,
        _ => {}
    }
    if !is_root() {
        eprintln!("bench: needs root (network namespaces, eBPF); run it as root or with sudo");
        return ExitCode::FAILURE;
    }
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<bool> {
    let started = Instant::now();
    let rounds = rounds()?;
    let figures = Figures::from_env()?;
    let mut complete = true;
    if figures.data_path() {
        complete &= data_path(rounds, figures).await?;
    }
    if figures.state {
        complete &= state::run().await?;
    }
    if figures.upgrade {
        complete &= upgrade::run(rounds).await?;
    }
    if figures.l7 {
        complete &= l7::run(rounds).await?;
    }
    println!("bench took {:.0} s", started.elapsed().as_secs_f64());
    Ok(complete)
}

/// The pod-to-pod figures, without and with the mesh, in alternating rounds.
async fn data_path(rounds: usize, figures: Figures) -> Result<bool> {
    print_wakeup_cost();
    let cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
    widen_port_range(&cluster)?;
    let mut servers = Vec::new();
    for pod in cluster.pods() {
        servers.push(start_servers(pod)?);
    }
    for pod in cluster.pods() {
        wait_listening(pod).await?;
    }

    let (batch1, batch2) = (
        cluster.pod("legacy", "batch-1"),
        cluster.pod("legacy", "batch-2"),
    );
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let variants = agent_variants()?;
    let mut plain = Vec::new();
    let mut mesh: Vec<Vec<Results>> = vec![Vec::new(); variants.len()];
    let mut rss: Vec<(String, Option<u64>, Option<u64>)> = Vec::new();
    // Alternate: a slow or fast spell of this shared machine then touches both sides, and the
    // medians below are not decided by one noisy run.
    for round in 1..=rounds {
        println!("round {round}/{rounds}");
        println!(
            "  no mesh: {} -> {} (cross-node, no agent running)",
            batch1.id(),
            batch2.id()
        );
        plain.push(measure(batch1, batch2, figures).await);

        // Each variant takes its turn first: a phase runs a little slower after another one
        // (the TIME_WAIT sockets of the previous phase fill the kernel's connection table).
        let mut order: Vec<usize> = (0..variants.len()).collect();
        order.rotate_left((round - 1) % variants.len());
        for index in order {
            let (variant, results) = (&variants[index], &mut mesh[index]);
            let mut agents = Vec::new();
            for node in cluster.nodes() {
                let options = AgentOptions {
                    binary: variant.clone(),
                    ..AgentOptions::default()
                };
                agents.push(
                    cluster
                        .start_agent_with(node.index, options)
                        .await
                        .with_context(|| format!("starting the agent on {}", node.name))?,
                );
            }
            println!(
                "  mesh:    {} -> {} (cross-node, agents on both nodes{})",
                web1.id(),
                web2.id(),
                label(variant)
            );
            results.push(measure(web1, web2, figures).await);
            for agent in &mut agents {
                let name = match variant {
                    Some(path) => format!("{} [{}]", agent.node_name(), path.display()),
                    None => agent.node_name().to_owned(),
                };
                let (now, peak) = (agent.rss_kib(), agent.peak_rss_kib());
                match rss.iter_mut().find(|(seen, ..)| *seen == name) {
                    Some(seen) => {
                        seen.1 = seen.1.max(now);
                        seen.2 = seen.2.max(peak);
                    }
                    None => rss.push((name, now, peak)),
                }
                if let Err(e) = agent.terminate().await {
                    eprintln!("bench: {e:#}");
                }
                // A stopped agent leaves capture failing closed; the next phase starts bare.
                if let Err(e) = cluster.uninstall(agent.node_index()) {
                    eprintln!("bench: {e:#}");
                }
            }
        }
    }

    let median_of = |runs: &[Results], pick: Pick| median(runs.iter().filter_map(pick).collect());
    let rows: [(&str, Pick, usize); 5] = [
        ("throughput, Gbit/s", |r| r.gbit_per_s, 2),
        ("latency p50, µs (1 KiB)", |r| r.p50_us, 1),
        ("latency p99, µs (1 KiB)", |r| r.p99_us, 1),
        ("new connections/s", |r| r.conns_per_s, 0),
        ("CPU µs per connection", |r| r.cpu_us_per_conn, 0),
    ];
    for (variant, mesh) in variants.iter().zip(&mesh) {
        println!();
        println!("median of {rounds} rounds{}:", label(variant));
        println!(
            "{:<28} {:>12} {:>12} {:>11}",
            "", "no mesh", "mesh", "mesh/plain"
        );
        for (name, pick, decimals) in rows {
            row(
                name,
                median_of(&plain, pick),
                median_of(mesh, pick),
                decimals,
            );
        }
        let per_round: Vec<String> = plain
            .iter()
            .zip(mesh)
            .map(|(p, m)| match (p.conns_per_s, m.conns_per_s) {
                (Some(p), Some(m)) => format!("{m:.0}/{p:.0} = {:.2}", m / p),
                _ => "failed".to_owned(),
            })
            .collect();
        println!(
            "new connections/s by round (mesh/plain): {}",
            per_round.join(", ")
        );
    }
    let mib =
        |kib: Option<u64>| kib.map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    let rss: Vec<String> = rss
        .iter()
        .map(|(node, now, peak)| format!("{node} {} (peak {})", mib(*now), mib(*peak)))
        .collect();
    println!("agent RSS (highest of the rounds): {}", rss.join(", "));

    let complete = plain.iter().chain(mesh.iter().flatten()).all(|r| {
        (!figures.throughput || r.gbit_per_s.is_some())
            && (!figures.latency || r.p50_us.is_some())
            && (!figures.connections || r.conns_per_s.is_some())
    });
    Ok(complete)
}

/// A proxied connection is a chain of process wake-ups (six before the client has its echo,
/// against two without the mesh), so what one costs here explains much of the ratios.
fn print_wakeup_cost() {
    const ROUND_TRIPS: u32 = 5000;
    let show = |r: anyhow::Result<Duration>| match r {
        Ok(d) => format!("{:.1} µs", d.as_secs_f64() * 1e6),
        Err(e) => format!("failed ({e:#})"),
    };
    let cpus = wakeup::allowed_cpus();
    let Some(&first) = cpus.first() else { return };
    let one = show(wakeup::round_trip(first, first, ROUND_TRIPS));
    let across = match cpus.get(1) {
        Some(&other) => show(wakeup::round_trip(first, other, ROUND_TRIPS)),
        None => "- (one CPU)".to_owned(),
    };
    println!("wake-up round trip between two threads: {one} on one CPU, {across} across two CPUs");
}

/// The agent binaries to compare: the usual one, or those listed in `MESH_BENCH_AGENTS`
/// (comma-separated paths), each measured in every round right after the same baseline. On a
/// noisy machine that is the way to tell whether a change to the agent moved a figure.
fn agent_variants() -> Result<Vec<Option<PathBuf>>> {
    let Ok(list) = std::env::var("MESH_BENCH_AGENTS") else {
        return Ok(vec![None]);
    };
    let paths: Vec<PathBuf> = list
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| PathBuf::from(p.trim()))
        .collect();
    ensure!(
        !paths.is_empty(),
        "MESH_BENCH_AGENTS lists no binary: give comma-separated paths"
    );
    for path in &paths {
        ensure!(
            path.is_file(),
            "MESH_BENCH_AGENTS: {} is not a file",
            path.display()
        );
    }
    Ok(paths.into_iter().map(Some).collect())
}

/// How results of an agent binary given in `MESH_BENCH_AGENTS` are labelled.
fn label(variant: &Option<PathBuf>) -> String {
    variant
        .as_ref()
        .map(|path| format!(", agent {}", path.display()))
        .unwrap_or_default()
}

/// Rounds to run: [`ROUNDS`], or `MESH_BENCH_ROUNDS`.
fn rounds() -> Result<usize> {
    match std::env::var("MESH_BENCH_ROUNDS") {
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => anyhow::bail!("MESH_BENCH_ROUNDS must be a positive number, not {v:?}"),
        },
        Err(_) => Ok(ROUNDS),
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

fn row(name: &str, plain: Option<f64>, mesh: Option<f64>, decimals: usize) {
    let show = |v: Option<f64>| v.map_or("failed".to_owned(), |v| format!("{v:.decimals$}"));
    let ratio = match (plain, mesh) {
        (Some(p), Some(m)) if p > 0.0 => format!("{:.2}", m / p),
        _ => "-".to_owned(),
    };
    println!(
        "{name:<28} {:>12} {:>12} {ratio:>11}",
        show(plain),
        show(mesh)
    );
}

/// Runs the chosen measurements from `client` to `server`; a failed one is reported and skipped.
async fn measure(client: &Pod, server: &Pod, figures: Figures) -> Results {
    let mut results = Results::default();
    if figures.throughput {
        match throughput(client, server).await {
            Ok(gbit) => {
                println!("  throughput: {gbit:.2} Gbit/s");
                results.gbit_per_s = Some(gbit);
            }
            Err(e) => println!("  throughput: FAILED: {e:#}"),
        }
    }
    if figures.latency {
        match latency(client, server).await {
            Ok((p50, p99)) => {
                println!("  latency:    p50 {p50:.1} µs, p99 {p99:.1} µs");
                (results.p50_us, results.p99_us) = (Some(p50), Some(p99));
            }
            Err(e) => println!("  latency:    FAILED: {e:#}"),
        }
    }
    if figures.connections {
        match connection_rate(client, server).await {
            Ok((rate, cpu)) => {
                println!("  connections: {rate:.0}/s, {cpu:.0} µs of CPU each (whole machine)");
                results.conns_per_s = Some(rate);
                results.cpu_us_per_conn = Some(cpu);
            }
            Err(e) => println!("  connections: FAILED: {e:#}"),
        }
    }
    results
}

/// One stream for [`THROUGHPUT_FOR`] into a counting sink; the sink's count must match.
async fn throughput(client: &Pod, server: &Pod) -> Result<f64> {
    let mut stream = client.connect(server.addr(COUNTER_PORT)).await?;
    let chunk = mesh_tests::traffic::pattern(1, 256 * 1024);
    let run = async {
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < THROUGHPUT_FOR {
            stream.write_all(&chunk).await?;
            sent += chunk.len() as u64;
        }
        stream.shutdown().await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        anyhow::Ok((sent, reply, start.elapsed()))
    };
    let (sent, reply, elapsed) =
        tokio::time::timeout(THROUGHPUT_FOR + Duration::from_secs(20), run)
            .await
            .context("throughput run timed out")??;
    ensure!(
        reply.trim() == sent.to_string(),
        "sent {sent} bytes, the sink counted {:?}",
        reply.trim()
    );
    Ok(sent as f64 * 8.0 / elapsed.as_secs_f64() / 1e9)
}

/// [`ROUND_TRIPS`] 1 KiB echoes over one connection; returns (p50, p99) in µs.
async fn latency(client: &Pod, server: &Pod) -> Result<(f64, f64)> {
    let mut stream = client.connect(server.addr(ECHO_PORT)).await?;
    stream.set_nodelay(true)?;
    let request = mesh_tests::traffic::pattern(2, MESSAGE);
    let mut reply = vec![0u8; MESSAGE];
    let run = async {
        let mut samples = Vec::with_capacity(ROUND_TRIPS);
        for i in 0..WARMUP_ROUND_TRIPS + ROUND_TRIPS {
            let start = Instant::now();
            stream.write_all(&request).await?;
            stream.read_exact(&mut reply).await?;
            if i >= WARMUP_ROUND_TRIPS {
                samples.push(start.elapsed());
            }
            ensure!(reply == request, "echo {i} came back different");
        }
        anyhow::Ok(samples)
    };
    let mut samples = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .context("latency run timed out")??;
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Ok((at(0.50), at(0.99)))
}

/// Sequential connect + 1-byte echo + close for [`CONNECTIONS_FOR`]; returns connections/s and
/// the machine's busy CPU time per connection in µs (client, server, agents and kernel). The
/// sockets are created on this thread inside the client's namespace, as an application
/// creates its own, so no harness thread hop is part of the per-connection cost.
async fn connection_rate(client: &Pod, server: &Pod) -> Result<(f64, f64)> {
    let to = server.addr(ECHO_PORT);
    let _inside = client.netns().enter()?;
    let busy_before = cputime::machine_busy()?;
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < CONNECTIONS_FOR {
        let socket = Socket::new(Domain::IPV4, Type::STREAM.nonblocking(), None)
            .context("creating a client socket")?;
        let exchange = async {
            let mut stream = TcpSocket::from_std_stream(socket.into())
                .connect(to)
                .await?;
            stream.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            anyhow::Ok(byte)
        };
        let byte = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .with_context(|| format!("connection {done}: no echo within 5 s"))??;
        ensure!(&byte == b"x", "connection {done}: wrong echo");
        done += 1;
    }
    let elapsed = start.elapsed();
    let busy = cputime::machine_busy()?.saturating_sub(busy_before);
    let done = done.max(1) as f64;
    Ok((
        done / elapsed.as_secs_f64(),
        busy.as_secs_f64() * 1e6 / done,
    ))
}

/// Many short connections: widen the port range and reuse TIME_WAIT ports in every namespace
/// of the cluster, so connection-rate phases measure setup cost rather than port exhaustion.
fn widen_port_range(cluster: &Cluster) -> Result<()> {
    let namespaces = cluster
        .pods()
        .iter()
        .map(|p| p.netns())
        .chain(cluster.nodes().iter().map(|n| n.netns()));
    for netns in namespaces {
        netns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        netns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    Ok(())
}

/// Starts `bench serve` in `pod`; dropping the handle kills it.
fn start_servers(pod: &Pod) -> Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    tokio::process::Command::from(pod.netns().command(&exe.to_string_lossy()))
        .arg("serve")
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the servers in {}", pod.id()))
}

/// `bench serve`: the counting sink and the echo server, in the pod this process was started in.
async fn serve() -> ExitCode {
    let (Ok(counter), Ok(echo)) = (
        tokio::net::TcpListener::bind(("0.0.0.0", COUNTER_PORT)).await,
        tokio::net::TcpListener::bind(("0.0.0.0", ECHO_PORT)).await,
    ) else {
        eprintln!("bench serve: cannot bind the server ports");
        return ExitCode::FAILURE;
    };
    let _counter = Server::counter(counter);
    let _echo = Server::echo(echo);
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}

/// Waits until a pod's servers accept connections.
async fn wait_listening(pod: &Pod) -> Result<()> {
    for _ in 0..100 {
        if pod.connect(pod.addr(ECHO_PORT)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the servers in {} did not start", pod.id())
}
