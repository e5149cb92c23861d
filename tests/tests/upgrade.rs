//! End to end, as root: a new agent process takes over a node from a running one under load,
//! and no client notices. 50 long-lived cross-node connections stream and check every byte,
//! new connections keep coming, and a DENY policy keeps resetting what it denies, while on each
//! node in turn a second agent starts, takes the listeners over, and the first is told to stop.

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use common::{Outcome, PORT, apply, exchange, expect_reset, mesh_with};
use mesh_tests::Pod;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG_LIVED: usize = 50;
/// Concurrent serial clients opening new connections.
const OPENERS: usize = 4;
const CHUNK: usize = 1024;
/// Longer than the test: no connection may be cut by the drain deadline here.
const DRAIN_SECONDS: &str = "60";

/// AuthorizationPolicy: deny every connection to the shop pods' port `PORT + 1`.
fn deny_port() -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-port\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"{}\"]\n",
        PORT + 1
    )
}

/// What the new-connection clients saw.
#[derive(Default)]
struct Openings {
    echoed: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// When each echo completed, to find the longest gap.
    times: Mutex<Vec<Instant>>,
}

/// Streams numbered chunks through an echo server and checks each one coming back, until
/// `stop`; then half-closes and expects a clean end. Returns the bytes checked.
async fn stream_until(
    pod: &Pod,
    to: std::net::SocketAddr,
    id: usize,
    stop: Arc<AtomicBool>,
) -> Result<u64> {
    let mut stream = pod.connect(to).await?;
    let (mut sent, mut seq) = (0u64, 0u64);
    let mut back = vec![0u8; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        let chunk: Vec<u8> = (0..CHUNK)
            .map(|i| (id as u64 * 31 + seq * 7 + i as u64) as u8)
            .collect();
        stream
            .write_all(&chunk)
            .await
            .with_context(|| format!("stream {id}: write of chunk {seq}"))?;
        stream
            .read_exact(&mut back)
            .await
            .with_context(|| format!("stream {id}: echo of chunk {seq}"))?;
        ensure!(back == chunk, "stream {id}: chunk {seq} came back altered");
        sent += CHUNK as u64;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stream
        .shutdown()
        .await
        .with_context(|| format!("stream {id}: shutdown"))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .await
        .with_context(|| format!("stream {id}: the end"))?;
    ensure!(
        rest.is_empty(),
        "stream {id}: {} unexpected bytes at the end",
        rest.len()
    );
    Ok(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_under_load_fails_no_connection_and_resets_none() -> Result<()> {
    let Some((cluster, mut agents)) = mesh_with(&["--drain-timeout", DRAIN_SECONDS]).await? else {
        return Ok(());
    };
    // Shared with the client tasks, which outlive no borrow.
    let cluster = Arc::new(cluster);
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    let _denied_echo = web2.echo_server(PORT + 1).await?;
    apply(&cluster, "deny-port.yaml", &deny_port()).await?;
    expect_reset(web1, web2.addr(PORT + 1)).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut streams = Vec::new();
    for id in 0..LONG_LIVED {
        let (cluster, stop) = (cluster.clone(), stop.clone());
        let to = web2.addr(PORT);
        streams.push(tokio::spawn(async move {
            stream_until(cluster.pod("shop", "web-1"), to, id, stop).await
        }));
    }
    let openings = Arc::new(Openings::default());
    let mut openers = Vec::new();
    for _ in 0..OPENERS {
        let (cluster, stop, openings) = (cluster.clone(), stop.clone(), openings.clone());
        let to = web2.addr(PORT);
        openers.push(tokio::spawn(async move {
            let pod = cluster.pod("shop", "web-1");
            while !stop.load(Ordering::Relaxed) {
                match exchange(pod, to).await {
                    Ok(e) if e.outcome == Outcome::Echoed => {
                        openings.echoed.fetch_add(1, Ordering::Relaxed);
                        openings.times.lock().unwrap().push(Instant::now());
                    }
                    Ok(e) => openings.failures.lock().unwrap().push(format!(
                        "{:?} after {:?} from {} at {:?}",
                        e.outcome,
                        e.took,
                        e.local,
                        started.elapsed()
                    )),
                    Err(e) => openings.failures.lock().unwrap().push(format!("{e:#}")),
                }
            }
        }));
    }
    let denials = Arc::new(AtomicU64::new(0));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let denier = {
        let (cluster, stop, denials, violations) = (
            cluster.clone(),
            stop.clone(),
            denials.clone(),
            violations.clone(),
        );
        let to = web2.addr(PORT + 1);
        tokio::spawn(async move {
            let pod = cluster.pod("shop", "web-1");
            while !stop.load(Ordering::Relaxed) {
                match exchange(pod, to).await {
                    Ok(e) if e.outcome == Outcome::Reset => {
                        denials.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(e) => violations
                        .lock()
                        .unwrap()
                        .push(format!("{:?} after {:?}", e.outcome, e.took)),
                    Err(e) => violations.lock().unwrap().push(format!("{e:#}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Each node in turn: a second agent takes over, then the first is told to stop.
    let mut successors = Vec::new();
    for (node, old) in agents.iter_mut().enumerate() {
        let old_pid = old.pid();
        let options = mesh_tests::AgentOptions::default()
            .arg("--drain-timeout")
            .arg(DRAIN_SECONDS);
        let mut successor = cluster.start_agent_with(node, options).await?;
        successor
            .wait_for_log("took the listeners over", common::SETTLE)
            .await?;
        old.wait_for_log("handed the listeners over", common::SETTLE)
            .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        old.signal(Signal::SIGTERM)?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let status = cluster.cli_json(node, &["status", "-o", "json"])?;
        let previous = &status["lifecycle"]["previous"];
        ensure!(
            previous["pid"] == old_pid && previous["state"] == "draining",
            "node {node}: the new agent's status says of its predecessor: {previous} (expected pid {old_pid}, draining: it still carries the long-lived connections)"
        );
        ensure!(
            old.is_running(),
            "node {node}: the old agent exited while its connections were open: {}",
            old.log_tail(20)
        );
        successors.push(successor);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();

    let mut checked = 0;
    for (id, stream) in streams.into_iter().enumerate() {
        checked += stream
            .await
            .context("stream task")?
            .with_context(|| format!("long-lived connection {id} did not survive the takeovers"))?;
    }
    for opener in openers {
        opener.await.context("opener task")?;
    }
    denier.await.context("denier task")?;
    let failures = openings.failures.lock().unwrap().clone();
    let echoed = openings.echoed.load(Ordering::Relaxed);
    let rate = echoed as f64 / elapsed.as_secs_f64();
    let mut times = openings.times.lock().unwrap().clone();
    times.sort();
    let gap = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "upgrade under load: {echoed} new connections in {elapsed:?} ({rate:.0}/s), longest gap {gap:?}; {checked} bytes checked on {LONG_LIVED} long-lived; {} denials",
        denials.load(Ordering::Relaxed)
    );
    ensure!(
        failures.is_empty(),
        "{} new connections failed: {failures:?}",
        failures.len()
    );
    ensure!(rate >= 200.0, "only {rate:.0} new connections/s");
    ensure!(
        checked >= (LONG_LIVED * CHUNK * 50) as u64,
        "only {checked} bytes streamed"
    );
    let violations = violations.lock().unwrap().clone();
    ensure!(
        violations.is_empty() && denials.load(Ordering::Relaxed) > 20,
        "the DENY policy did not hold throughout: {violations:?}"
    );

    // Their connections closed, the old agents finish draining and exit on their own (they
    // were told to stop), leaving the data plane to their successors.
    for (node, agent) in agents.iter_mut().enumerate() {
        let status = agent.wait_exit(common::SETTLE).await?;
        ensure!(
            status.success(),
            "old agent on node {node}: {status}: {}",
            agent.log_tail(20)
        );
    }
    for node in 0..2 {
        let status = cluster.cli_json(node, &["status", "-o", "json"])?;
        ensure!(
            status["lifecycle"]["previous"]["state"] == "exited",
            "node {node}: {}",
            status["lifecycle"]
        );
    }
    common::expect_echo(web1, web2.addr(PORT)).await?;
    drop(successors);
    Ok(())
}

/// Two agent pods of a DaemonSet share the node's network namespace but not a pid namespace:
/// the running agent cannot see its successor's pid (SO_PEERCRED says 0) nor read its /proc, and
/// the token from the pinned data plane has to vouch for it. Here the first agent runs in a pid
/// namespace of its own (`unshare --pid`), its successor in the host's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_across_pid_namespaces_is_vouched_for_by_the_token() -> Result<()> {
    let Some((cluster, mut agents)) = common::mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    let status = agents[1].terminate().await?;
    ensure!(status.success(), "agent 1: {status}");

    let isolated = cluster.wrapped_agent(
        "agent-in-its-own-pid-namespace",
        "unshare --pid --kill-child=SIGTERM",
    )?;
    let mut old = cluster.start_agent_with(1, isolated).await?;
    common::expect_echo(web1, web2.addr(PORT)).await?;

    let mut successor = cluster.start_agent(1).await?;
    successor
        .wait_for_log("took the listeners over", common::SETTLE)
        .await?;
    old.wait_for_log("handed the listeners over", common::SETTLE)
        .await?;
    common::expect_echo(web1, web2.addr(PORT)).await?;
    let served = common::wait_records(&cluster, 1, "inbound", web2.addr(PORT), 1).await?;
    ensure!(!served.is_empty(), "the successor serves nothing");
    old.signal(Signal::SIGTERM)?;
    Ok(())
}
