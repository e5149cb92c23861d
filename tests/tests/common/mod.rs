//! Shared pieces of the end-to-end tests: a running two-node mesh and queries of the agents.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use mesh_tests::{Agent, Cluster, ClusterSpec};
use serde_json::Value;

pub const PORT: u16 = 8080;

/// The ceiling for waits on something the agents do by themselves (accept a state change,
/// record a connection, log a line): generous, because CI is a loaded 2-core machine, and
/// free, because every wait returns as soon as its condition holds.
pub const SETTLE: Duration = Duration::from_secs(20);

/// PeerAuthentication: STRICT for the whole `shop` namespace.
pub const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n";

/// Expects `client` to reach `server` directly, with no proxy in between: a peer server on
/// `port` sees the client's own address and port.
pub async fn expect_unproxied(
    client: &mesh_tests::Pod,
    server: &mesh_tests::Pod,
    port: u16,
) -> Result<()> {
    let _peer = server.peer_server(port).await?;
    let report = client.ask_peer(server.addr(port)).await?;
    anyhow::ensure!(
        report.seen_by_server == report.local,
        "{} -> {}: the server sees {} for a client at {}: something is in between",
        client.id(),
        server.id(),
        report.seen_by_server,
        report.local
    );
    Ok(())
}

/// The demo cluster (`shop` enrolled, `legacy` not; `web-N`, `batch-N` on node N-1) with an
/// agent on each node. `None` (after a loud skip message) when not root.
pub async fn mesh() -> Result<Option<(Cluster, Vec<Agent>)>> {
    mesh_with(&[]).await
}

/// [`mesh`] with extra `mesh-agent run` arguments for both agents.
pub async fn mesh_with(args: &[&str]) -> Result<Option<(Cluster, Vec<Agent>)>> {
    mesh_of(ClusterSpec::shop_and_legacy(), args).await
}

/// The cluster of `spec` with an agent on each node, each run with `args`; `None` (after a
/// loud skip message) when not root.
pub async fn mesh_of(spec: ClusterSpec, args: &[&str]) -> Result<Option<(Cluster, Vec<Agent>)>> {
    if !mesh_tests::require_root() {
        return Ok(None);
    }
    let mut cluster = Cluster::new(spec)?;
    cluster.write_state()?;
    if from_the_api() {
        cluster.serve_api().await?;
    }
    let options = || {
        args.iter()
            .fold(mesh_tests::AgentOptions::default(), |o, a| o.arg(*a))
    };
    let agents = vec![
        cluster.start_agent_with(0, options()).await?,
        cluster.start_agent_with(1, options()).await?,
    ];
    Ok(Some((cluster, agents)))
}

/// Whether this run serves the clusters' state from a test API server (`MESH_TESTS_SOURCE=kubernetes`,
/// set by `cargo xtask test` for a second pass of the capture, tunnel, policy, Service and waypoint tests)
/// instead of the state directory: the same scenarios must hold whichever source feeds them.
pub fn from_the_api() -> bool {
    std::env::var("MESH_TESTS_SOURCE").is_ok_and(|v| v == "kubernetes")
}

/// Every connection record (open and recently closed) of a node's proxy.
pub fn connections(cluster: &Cluster, node: usize) -> Result<Vec<Value>> {
    let view = cluster.cli_json(node, &["connections", "-o", "json"])?;
    let mut all = Vec::new();
    for list in ["open", "recent"] {
        all.extend(view[list].as_array().cloned().unwrap_or_default());
    }
    Ok(all)
}

/// Closed connection records of `direction` to `destination` on a node.
pub fn records_to(
    cluster: &Cluster,
    node: usize,
    direction: &str,
    destination: SocketAddr,
) -> Result<Vec<Value>> {
    Ok(connections(cluster, node)?
        .into_iter()
        .filter(|c| {
            c["direction"] == direction && c["original_destination"] == destination.to_string()
        })
        .filter(|c| !c["duration_ms"].is_null())
        .collect())
}

/// Waits until the node has recorded `count` finished `direction` connections to `destination`.
pub async fn wait_records(
    cluster: &Cluster,
    node: usize,
    direction: &str,
    destination: SocketAddr,
    count: usize,
) -> Result<Vec<Value>> {
    let mut last = Vec::new();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while tokio::time::Instant::now() < deadline {
        last = records_to(cluster, node, direction, destination)?;
        if last.len() >= count {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "node {node}: expected {count} {direction} connection(s) to {destination}, found {}: {last:#?}",
        last.len()
    )
}

/// The established TCP sockets in node `node`'s own namespace that join `client_ip` (any port)
/// and `server`, as `ss` lists them. Pods have namespaces of their own, so these are the node
/// proxy's sockets for that flow: an accepted client connection, or its upstream one.
pub fn proxy_sockets(
    cluster: &Cluster,
    node: usize,
    client_ip: std::net::Ipv4Addr,
    server: SocketAddr,
) -> Result<Vec<String>> {
    let out = cluster.node_exec(node, &["ss", "-tnH", "state", "established"])?;
    Ok(out
        .lines()
        .filter(|line| {
            let ends: Vec<SocketAddr> = line
                .split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect();
            ends.len() == 2
                && ends.contains(&server)
                && ends
                    .iter()
                    .any(|a| *a != server && a.ip() == std::net::IpAddr::V4(client_ip))
        })
        .map(str::to_owned)
        .collect())
}

/// A kernel counter of a node's capture programs.
pub fn counter(cluster: &Cluster, node: usize, name: &str) -> Result<u64> {
    let bpf = cluster.cli_json(node, &["bpf", "-o", "json"])?;
    bpf["counters"][name]
        .as_u64()
        .with_context(|| format!("counter {name} missing in {bpf}"))
}

/// The capture device the agent reports for a pod, `None` when it is not captured.
pub fn capture_device(
    cluster: &Cluster,
    node: usize,
    namespace: &str,
    name: &str,
) -> Result<Option<String>> {
    let workloads = cluster.cli_json(node, &["workloads", "-o", "json"])?;
    let w = workloads
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["namespace"] == namespace && w["name"] == name)
        .with_context(|| format!("{namespace}/{name} not in workloads: {workloads}"))?;
    Ok(w["capture_device"].as_str().map(str::to_string))
}

/// Polls `f` every 100 ms for up to `timeout` until it returns true.
pub async fn eventually<F: FnMut() -> Result<bool>>(
    timeout: Duration,
    what: &str,
    mut f: F,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub mod certs;
pub mod conformance;
pub mod pcap;

/// What became of a connection that sent a line to an echo server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The line came back.
    Echoed,
    /// The connection was established, then reset (a policy denial looks like this).
    Reset,
    /// The connect itself was refused (RST to the SYN).
    Refused,
    /// A clean end (FIN) without the echo.
    Closed,
    /// Nothing happened within [`EXCHANGE_TIMEOUT`]: a hang, never a verdict.
    Hung,
    /// Anything else (another error, a wrong echo).
    Other(String),
}

/// How long [`exchange`] waits for any answer, echo or reset.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// A denial must reset the client within this (it is decided without any waiting).
pub const DENIAL_DEADLINE: Duration = Duration::from_secs(3);

/// What [`exchange`] saw: the outcome, the client's address and how long it took.
#[derive(Clone, Debug)]
pub struct Exchanged {
    pub outcome: Outcome,
    pub local: SocketAddr,
    pub took: Duration,
}

/// Connects from `pod` to an echo server at `to`, sends a line and says what happened. The
/// socket is bound first, so its address is known even when a reset beats the connect.
pub async fn exchange(pod: &mesh_tests::Pod, to: SocketAddr) -> Result<Exchanged> {
    let socket = pod.netns().tcp_socket()?;
    socket.bind(&SocketAddr::from((pod.ip, 0)).into())?;
    let local = socket
        .local_addr()?
        .as_socket()
        .context("the client socket has no IP address")?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    let start = tokio::time::Instant::now();
    let outcome = match tokio::time::timeout(EXCHANGE_TIMEOUT, socket.connect(to)).await {
        Err(_) => Outcome::Hung,
        Ok(Ok(mut stream)) => echo_outcome(&mut stream).await,
        Ok(Err(e)) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
            // The proxy accepts at once and may reset before the connect is seen complete.
            std::io::ErrorKind::ConnectionReset => Outcome::Reset,
            _ => Outcome::Other(format!("connect: {e}")),
        },
    };
    Ok(Exchanged {
        outcome,
        local,
        took: start.elapsed(),
    })
}

/// Expects `pod` -> `to` to be denied: reset within [`DENIAL_DEADLINE`].
pub async fn expect_reset(pod: &mesh_tests::Pod, to: SocketAddr) -> Result<()> {
    let Exchanged { outcome, took, .. } = exchange(pod, to).await?;
    anyhow::ensure!(
        outcome == Outcome::Reset && took <= DENIAL_DEADLINE,
        "{} -> {to}: expected a reset within {DENIAL_DEADLINE:?}, got {outcome:?} after {took:?}",
        pod.id()
    );
    Ok(())
}

/// Expects `pod` -> `to` to carry a line to an echo server and back.
pub async fn expect_echo(pod: &mesh_tests::Pod, to: SocketAddr) -> Result<()> {
    let Exchanged { outcome, took, .. } = exchange(pod, to).await?;
    anyhow::ensure!(
        outcome == Outcome::Echoed,
        "{} -> {to}: expected the echo, got {outcome:?} after {took:?}",
        pod.id()
    );
    Ok(())
}

/// Whether a line written to `stream` comes back within [`EXCHANGE_TIMEOUT`].
pub async fn echoes(stream: &mut tokio::net::TcpStream) -> bool {
    echo_outcome(stream).await == Outcome::Echoed
}

async fn echo_outcome(stream: &mut tokio::net::TcpStream) -> Outcome {
    use std::io::ErrorKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        stream.write_all(b"ping\n").await?;
        let mut buf = [0u8; 5];
        let mut got = 0;
        while got < buf.len() {
            match stream.read(&mut buf[got..]).await? {
                0 => return std::io::Result::Ok(Outcome::Closed),
                n => got += n,
            }
        }
        Ok(if &buf == b"ping\n" {
            Outcome::Echoed
        } else {
            Outcome::Other(format!("echo differs: {buf:?}"))
        })
    };
    match tokio::time::timeout(EXCHANGE_TIMEOUT, attempt).await {
        Err(_) => Outcome::Hung,
        Ok(Ok(outcome)) => outcome,
        // A write after the peer's RST reports it as EPIPE once the reset was taken.
        Ok(Err(e)) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
            Outcome::Reset
        }
        Ok(Err(e)) => Outcome::Other(e.to_string()),
    }
}

/// Every sample of `family` in Prometheus text: its labels and value.
pub fn samples(text: &str, family: &str) -> Vec<(std::collections::BTreeMap<String, String>, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(family)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => {
                    let (labels, value) = rest.rsplit_once('}')?;
                    (parse_labels(labels)?, value)
                }
                None if rest.starts_with(' ') => (Default::default(), rest),
                None => return None,
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// `a="x",b="y\"z"` as a map; `None` when malformed.
fn parse_labels(mut text: &str) -> Option<std::collections::BTreeMap<String, String>> {
    let mut labels = std::collections::BTreeMap::new();
    while !text.is_empty() {
        let (name, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.trim_start_matches(',').to_owned(), value);
        text = rest[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

/// The sum of every sample of a counter family in Prometheus text (0 when it has none yet).
pub fn metric_sum(text: &str, family: &str) -> f64 {
    samples(text, family).iter().map(|(_, v)| v).sum()
}

/// Every denial a node's agent counted (`mesh_agent_connections_denied_total`, all policies).
pub async fn denied_total(cluster: &Cluster, node: usize) -> Result<u64> {
    let text = metrics(cluster, node).await?;
    Ok(metric_sum(&text, "mesh_agent_connections_denied_total") as u64)
}

/// The agent's current state generation (bumps on every accepted state change).
pub fn generation(cluster: &Cluster, node: usize) -> Result<u64> {
    let status = cluster.cli_json(node, &["status", "-o", "json"])?;
    status["state"]["status"]["generation"]
        .as_u64()
        .context("no state generation in status")
}

/// Writes a state file and waits until both agents have accepted it.
pub async fn apply(cluster: &Cluster, file: &str, contents: &str) -> Result<()> {
    let before = [generation(cluster, 0)?, generation(cluster, 1)?];
    cluster.write_state_file(file, contents)?;
    eventually(SETTLE, &format!("agents to accept {file}"), || {
        Ok(generation(cluster, 0)? > before[0] && generation(cluster, 1)? > before[1])
    })
    .await?;
    for node in 0..2 {
        let status = cluster.cli_json(node, &["status", "-o", "json"])?;
        let error = &status["state"]["status"]["last_error"];
        anyhow::ensure!(error.is_null(), "node {node} rejected {file}: {error}");
    }
    Ok(())
}

/// A node agent's Prometheus text from `:15020/metrics` (which must answer 200).
pub async fn metrics(cluster: &Cluster, node: usize) -> Result<String> {
    let response = cluster
        .node(node)
        .netns()
        .http_get("127.0.0.1:15020".parse()?, "/metrics")
        .await?;
    anyhow::ensure!(
        response.status == 200,
        "metrics on node {node}: HTTP {}",
        response.status
    );
    Ok(response.body)
}
