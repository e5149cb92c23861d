//! `cargo xtask bench`: what the mesh costs. On the demo's cluster, measures cross-node
//! single-stream throughput, 1 KiB request/response latency and new connections per second,
//! first between two pods of the unenrolled `legacy` namespace with no agent running (the
//! baseline), then between two pods of the enrolled `shop` namespace with an agent per node;
//! [`ROUNDS`] times in turn, and prints the medians with their mesh/plain ratios.
//!
//! The servers run as separate processes in their pods (this binary, `bench serve`), the client
//! in this process, as real applications would: the baseline then includes the cross-process
//! wake-ups every real request pays, and the mesh figures are not flattered by a baseline
//! whose client and server share one thread.

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
/// `throughput`, `latency`, `connections`, `state`) — for quicker runs while working on one of them.
#[derive(Clone, Copy)]
struct Figures {
    throughput: bool,
    latency: bool,
    connections: bool,
    /// The state at scale: memory, start-to-ready and rebuild time, event-to-capture latency.
    state: bool,
}

impl Figures {
    fn from_env() -> Result<Self> {
        let Ok(list) = std::env::var("MESH_BENCH_ONLY") else {
            return Ok(Self {
                throughput: true,
                latency: true,
                connections: true,
                state: true,
            });
        };
        let mut figures = Self {
            throughput: false,
            latency: false,
            connections: false,
            state: false,
        };
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "throughput" => figures.throughput = true,
                "latency" => figures.latency = true,
                "connections" => figures.connections = true,
                "state" => figures.state = true,
                _ => anyhow::bail!(
                    "MESH_BENCH_ONLY: unknown figure {name:?} (throughput, latency, connections, state)"
                ),
            }
        }
        ensure!(
            figures.data_path() || figures.state,
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
    if std::env::args().nth(1).as_deref() == Some("serve") {
        return serve().await;
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
    println!("bench took {:.0} s", started.elapsed().as_secs_f64());
    Ok(complete)
}

/// The pod-to-pod figures, without and with the mesh, in alternating rounds.
async fn data_path(rounds: usize, figures: Figures) -> Result<bool> {
    print_wakeup_cost();
    let cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
    // Many short connections: widen the port range and reuse TIME_WAIT ports everywhere,
    // so the connection-rate phase measures setup cost rather than port exhaustion.
    let namespaces = cluster
        .pods()
        .iter()
        .map(|p| p.netns())
        .chain(cluster.nodes().iter().map(|n| n.netns()));
    for netns in namespaces {
        netns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        netns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let mut servers = Vec::new();
    for pod in cluster.pods() {
        let child = tokio::process::Command::from(pod.netns().command(&exe.to_string_lossy()))
            .arg("serve")
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the servers in {}", pod.id()))?;
        servers.push(child);
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

/// The state at scale (issue #10): the real agent binary reads a generated cluster of 10,000
/// pods, 5,000 Services (with EndpointSlices) and 1,000 AuthorizationPolicies from the test API
/// server, through its real kube-rs client, on node 0 of a simulated cluster. Measured there,
/// and on the cluster's own four pods for comparison: resident memory after the initial list,
/// start to ready, one rebuild, and a namespace label to the pod's capture.
mod state {
    use std::{net::SocketAddr, time::Duration};

    use anyhow::{Context, Result, bail, ensure};
    use mesh_tests::{
        Agent, AgentOptions, Cluster, ClusterSpec, MODE_AMBIENT, MODE_LABEL,
        apiserver::{ApiServer, ApiServerConfig},
        state_gen::{self, StateSpec},
    };
    use serde_json::{Value, json};
    use tokio::time::Instant;

    use super::median;

    /// The API server's port on node 0's link address.
    const API_PORT: u16 = 6443;
    /// Rebuilds and label-to-capture rounds measured per state.
    const ROUNDS: usize = 5;
    /// The ceilings.
    const MEMORY_TARGET_MIB: f64 = 64.0;
    const CAPTURE_TARGET: Duration = Duration::from_secs(1);
    /// Bounds on the waits: generous for a loaded 2-core machine, and free when things work.
    const READY_WITHIN: Duration = Duration::from_secs(180);
    const CHANGE_WITHIN: Duration = Duration::from_secs(30);
    const POLL: Duration = Duration::from_millis(10);

    /// What one state gave.
    #[derive(Default)]
    struct Figures {
        rss_kib: Option<u64>,
        peak_kib: Option<u64>,
        /// After the rebuilds and captures: what the agent settles at.
        rss_after_kib: Option<u64>,
        ready: Option<Duration>,
        /// The agent's own figure (its log's `since_start`), without process start and probes.
        listed: Option<String>,
        rebuilds: Vec<Duration>,
        captures: Vec<Duration>,
        releases: Vec<Duration>,
    }

    pub async fn run() -> Result<bool> {
        println!();
        println!("state at scale (issue #10): the agent on node 0 reading the test API server");
        let cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
        // The API server runs on a runtime of its own: the bench's thread blocks in CLI calls,
        // and serving the initial list must not wait for them.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the API server's runtime")?;
        let node = cluster.node(0);
        let addr = SocketAddr::from((node.link_ip, API_PORT));
        let listener = node
            .netns()
            .run(move || std::net::TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in {}", node.name))?;
        let config = ApiServerConfig {
            // The generated objects are applied before any agent lists; keeping a change
            // history of all of them would only cost the bench's memory.
            history_window: 1_000,
            ..ApiServerConfig::default()
        };
        let api = {
            let _on = runtime.enter();
            ApiServer::start_std(listener, config)?
        };
        for object in cluster_objects(&cluster) {
            api.apply(object)?;
        }

        println!("  small state: the cluster's own 2 namespaces and 4 pods");
        let small = measure(&cluster, &api, 4).await?;

        let scale = scale_factor()?;
        let own: Vec<String> = if local_pods()? {
            cluster.nodes().iter().map(|n| n.name.clone()).collect()
        } else {
            Vec::new()
        };
        let spec = StateSpec::at_scale(&own)
            .scaled(scale)
            .reserving(cluster.octet());
        let generated = state_gen::generate(&spec);
        let local = generated
            .pods
            .iter()
            .filter(|p| p["spec"]["nodeName"] == node.name.as_str())
            .count();
        println!(
            "  at scale: {} namespaces ({} enrolled), {} pods on {} nodes ({local} on {}), \
             {} Services with as many EndpointSlices, {} AuthorizationPolicies, {} \
             PeerAuthentications; {:.1} MB of JSON",
            generated.namespaces.len(),
            generated
                .namespaces
                .iter()
                .filter(|ns| ns["metadata"]["labels"][MODE_LABEL] == MODE_AMBIENT)
                .count(),
            generated.pods.len(),
            spec.nodes.len(),
            node.name,
            generated.services.len(),
            generated.authorization_policies.len(),
            generated.peer_authentications.len(),
            generated.json_bytes() as f64 / 1e6,
        );
        let workloads = generated.pods.len() + 4;
        for object in generated.objects() {
            api.apply(object.clone())?;
        }
        drop(generated);
        let large = measure(&cluster, &api, workloads).await?;

        print_table(&small, &large);
        drop(api);
        // Its tasks are aborted with the server; nothing is left to wait for.
        runtime.shutdown_background();
        Ok(large.rss_kib.is_some() && !large.rebuilds.is_empty() && !large.captures.is_empty())
    }

    /// `MESH_BENCH_STATE_SCALE`: the generated state's size against the (default 1).
    fn scale_factor() -> Result<f64> {
        match std::env::var("MESH_BENCH_STATE_SCALE") {
            Ok(v) => match v.parse::<f64>() {
                Ok(f) if f > 0.0 && f <= 2.0 => Ok(f),
                _ => bail!("MESH_BENCH_STATE_SCALE must be a number in (0, 2], not {v:?}"),
            },
            Err(_) => Ok(1.0),
        }
    }

    /// `MESH_BENCH_STATE_LOCAL=0`: no generated pod on the simulated nodes (to see what the
    /// agent's local pods without a veth, reported pending, cost).
    fn local_pods() -> Result<bool> {
        match std::env::var("MESH_BENCH_STATE_LOCAL").as_deref() {
            Err(_) | Ok("1") => Ok(true),
            Ok("0") => Ok(false),
            Ok(v) => bail!("MESH_BENCH_STATE_LOCAL must be 0 or 1, not {v:?}"),
        }
    }

    /// The simulated cluster's namespaces and pods as the API server would hold them.
    fn cluster_objects(cluster: &Cluster) -> Vec<Value> {
        let mut objects = vec![namespace("shop", true), namespace("legacy", false)];
        for pod in cluster.pods() {
            let node = cluster.node(pod.node);
            let app = pod.name.split('-').next().unwrap_or_default();
            objects.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                             "labels": {"app": app}},
                "spec": {"nodeName": node.name, "serviceAccountName": pod.service_account,
                         "containers": [{"name": "app", "image": "registry.invalid/app:latest"}]},
                "status": {"phase": "Running", "hostIP": node.link_ip.to_string(),
                           "podIP": pod.ip.to_string(), "podIPs": [{"ip": pod.ip.to_string()}]}
            }));
        }
        objects
    }

    fn namespace(name: &str, enrolled: bool) -> Value {
        let mut labels = json!({"kubernetes.io/metadata.name": name});
        if enrolled {
            labels[MODE_LABEL] = json!(MODE_AMBIENT);
        }
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "labels": labels}, "status": {"phase": "Active"}})
    }

    /// Starts the agent on node 0 against what the API server holds now and measures it.
    async fn measure(cluster: &Cluster, api: &ApiServer, workloads: usize) -> Result<Figures> {
        let mut figures = Figures::default();
        let options = AgentOptions::default()
            .kubeconfig(api.kubeconfig_path())
            .no_wait();
        let start = Instant::now();
        let mut agent = cluster.start_agent_with(0, options).await?;
        wait_ready(cluster, &mut agent).await?;
        figures.ready = Some(start.elapsed());
        figures.listed = agent
            .log()
            .lines()
            .find(|l| l.contains("state listed from the Kubernetes API"))
            .and_then(|l| l.split("since_start=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned);
        (figures.rss_kib, figures.peak_kib) = (agent.rss_kib(), agent.peak_rss_kib());
        println!(
            "    ready in {:.0} ms (agent: listed and built {}); RSS {}, peak {}",
            ms(start.elapsed()),
            figures.listed.as_deref().unwrap_or("?"),
            mib(figures.rss_kib),
            mib(figures.peak_kib)
        );
        check_state(cluster, workloads).await?;

        for round in 1..=ROUNDS {
            match rebuild(cluster, api, round).await {
                Ok(took) => figures.rebuilds.push(took),
                Err(e) => println!("    rebuild {round}: FAILED: {e:#}"),
            }
        }
        for round in 1..=ROUNDS {
            match label_to_capture(cluster, api).await {
                Ok((captured, released)) => {
                    figures.captures.push(captured);
                    figures.releases.push(released);
                }
                Err(e) => println!("    label to capture {round}: FAILED: {e:#}"),
            }
        }
        figures.rss_after_kib = agent.rss_kib();
        figures.peak_kib = agent.peak_rss_kib().or(figures.peak_kib);
        let show = |d: &[Duration]| {
            d.iter()
                .map(|d| format!("{:.0}", ms(*d)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("    rebuilds, ms: {}", show(&figures.rebuilds));
        println!(
            "    namespace label to capture, ms: {}",
            show(&figures.captures)
        );
        println!(
            "    label removed to release, ms: {}",
            show(&figures.releases)
        );
        println!(
            "    RSS after the rounds {}, peak {}",
            mib(figures.rss_after_kib),
            mib(figures.peak_kib)
        );
        if let Err(e) = agent.terminate().await {
            eprintln!("bench: {e:#}");
        }
        Ok(figures)
    }

    /// Polls readiness every [`POLL`] (the harness's own wait polls every 100 ms).
    async fn wait_ready(cluster: &Cluster, agent: &mut Agent) -> Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = agent.try_exit()? {
                bail!(
                    "the agent exited ({status}) before it was ready; log:\n{}",
                    agent.log_tail(50)
                );
            }
            if matches!(cluster.readiness(0).await, Ok(r) if r.status == 200) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent was not ready within {READY_WITHIN:?}; log:\n{}",
                    agent.log_tail(50)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn status(cluster: &Cluster) -> Result<Value> {
        let response = cluster.admin_get(0, "/status").await?;
        ensure!(
            response.status == 200,
            "GET /status: HTTP {}",
            response.status
        );
        serde_json::from_str(&response.body).context("GET /status is not JSON")
    }

    /// Every object accepted: every watch synced, no state error, every pod a workload.
    async fn check_state(cluster: &Cluster, workloads: usize) -> Result<()> {
        let status = status(cluster).await?;
        ensure!(
            mesh_tests::watches_synced(&status),
            "not every watch synced: {:#}",
            status["state"]["watches"]
        );
        let error = &status["state"]["status"]["last_error"];
        ensure!(error.is_null(), "the agent rejected objects: {error}");
        let view = cluster.cli_json(0, &["workloads", "-o", "json"])?;
        let seen = view.as_array().map_or(0, Vec::len);
        ensure!(
            seen == workloads,
            "{seen} workloads, {workloads} pods served"
        );
        let objects: Vec<String> = status["state"]["watches"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| format!("{} {}", w["objects"], w["kind"].as_str().unwrap_or("?")))
            .collect();
        println!(
            "    held: {}; {seen} workloads, no object rejected",
            objects.join(", ")
        );
        Ok(())
    }

    /// Changes one label of a pod on the other node and waits for the next state generation.
    async fn rebuild(cluster: &Cluster, api: &ApiServer, round: usize) -> Result<Duration> {
        let before = generation(cluster).await?;
        let mut pod = cluster_objects(cluster)
            .into_iter()
            .find(|o| o["kind"] == "Pod" && o["metadata"]["name"] == "batch-2")
            .context("no batch-2 pod")?;
        pod["metadata"]["labels"]["rollout"] = json!(round.to_string());
        let start = Instant::now();
        api.apply(pod)?;
        poll(CHANGE_WITHIN, "the next state generation", async || {
            Ok(generation(cluster).await? > before)
        })
        .await?;
        Ok(start.elapsed())
    }

    async fn generation(cluster: &Cluster) -> Result<u64> {
        status(cluster).await?["state"]["status"]["generation"]
            .as_u64()
            .context("no state generation in status")
    }

    /// Labels `legacy` through the API and times until `legacy/batch-1` (node 0) has the
    /// capture programs on its veth; then removes the label and times until they are gone.
    /// The kernel is asked directly (cheap enough to poll every 10 ms, where the workloads
    /// view of 10,000 pods is not); the agent's view is checked to agree once each way.
    async fn label_to_capture(cluster: &Cluster, api: &ApiServer) -> Result<(Duration, Duration)> {
        let veth = cluster.pod("legacy", "batch-1").host_veth.clone();
        let node = cluster.node(0).netns();
        let attached = || -> Result<bool> { Ok(!node.tcx_programs(&veth)?.is_empty()) };
        ensure!(
            !attached()?,
            "batch-1 captured before its namespace is labelled"
        );
        let start = Instant::now();
        api.apply(namespace("legacy", true))?;
        poll(CHANGE_WITHIN, "batch-1 captured", async || attached()).await?;
        let captured = start.elapsed();
        ensure!(
            capture_device(cluster)?.as_deref() == Some(veth.as_str()),
            "the kernel has batch-1's capture, the agent's view does not"
        );
        let start = Instant::now();
        api.apply(namespace("legacy", false))?;
        poll(CHANGE_WITHIN, "batch-1 released", async || Ok(!attached()?)).await?;
        let released = start.elapsed();
        poll(
            CHANGE_WITHIN,
            "batch-1 released in the agent's view",
            async || Ok(capture_device(cluster)?.is_none()),
        )
        .await?;
        Ok((captured, released))
    }

    fn capture_device(cluster: &Cluster) -> Result<Option<String>> {
        let workloads = cluster.cli_json(0, &["workloads", "-o", "json"])?;
        let w = workloads
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["namespace"] == "legacy" && w["name"] == "batch-1")
            .context("legacy/batch-1 not in workloads")?;
        Ok(w["capture_device"].as_str().map(str::to_owned))
    }

    async fn poll(
        within: Duration,
        what: &str,
        mut done: impl AsyncFnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if done().await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{what}: not within {within:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
    }

    fn mib(kib: Option<u64>) -> String {
        kib.map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
    }

    fn print_table(small: &Figures, large: &Figures) {
        let mib = |kib: Option<u64>| kib.map(|k| k as f64 / 1024.0);
        let med = |d: &[Duration]| median(d.iter().map(|d| ms(*d)).collect());
        let max = |d: &[Duration]| d.iter().max().map(|d| ms(*d));
        let rows: [(&str, Option<f64>, Option<f64>, String); 8] = [
            (
                "RSS after the initial list, MiB",
                mib(small.rss_kib),
                mib(large.rss_kib),
                format!("< {MEMORY_TARGET_MIB:.0}"),
            ),
            (
                "RSS after the rounds, MiB",
                mib(small.rss_after_kib),
                mib(large.rss_after_kib),
                format!("< {MEMORY_TARGET_MIB:.0}"),
            ),
            (
                "peak RSS (VmHWM), MiB",
                mib(small.peak_kib),
                mib(large.peak_kib),
                "-".into(),
            ),
            (
                "start to ready, ms",
                small.ready.map(ms),
                large.ready.map(ms),
                "-".into(),
            ),
            (
                "rebuild, ms (median)",
                med(&small.rebuilds),
                med(&large.rebuilds),
                "-".into(),
            ),
            (
                "label to capture, ms (median)",
                med(&small.captures),
                med(&large.captures),
                format!("< {:.0}", ms(CAPTURE_TARGET)),
            ),
            (
                "label to capture, ms (max)",
                max(&small.captures),
                max(&large.captures),
                format!("< {:.0}", ms(CAPTURE_TARGET)),
            ),
            (
                "label removed to release, ms (median)",
                med(&small.releases),
                med(&large.releases),
                "-".into(),
            ),
        ];
        println!();
        println!("state at scale, {ROUNDS} rounds each:");
        println!(
            "{:<38} {:>12} {:>12} {:>9}",
            "", "4 pods", "at scale", "target"
        );
        let show = |v: Option<f64>| v.map_or("failed".to_owned(), |v| format!("{v:.1}"));
        for (name, small, large, target) in rows {
            println!(
                "{name:<38} {:>12} {:>12} {target:>9}",
                show(small),
                show(large)
            );
        }
    }
}
