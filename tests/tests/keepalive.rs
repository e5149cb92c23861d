//! End to end, as root: the proxy finds peers that are gone and lets go of what they held.
//! A tunnel whose other agent stops answering HTTP/2 PINGs is closed with its streams; a plain
//! client that vanished from the network is cut by TCP keepalive; a connection that carries
//! nothing for the idle timeout is reset on both legs while a busy one lives on.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{PORT, eventually, expect_echo, mesh_with};
use mesh_tests::{Cluster, Pod};
use nix::sys::signal::Signal;
use tokio::{io::AsyncReadExt, net::TcpStream};

/// Ceiling for the agent to notice: the configured detection time plus a margin.
const NOTICE: Duration = Duration::from_secs(10);

/// Established TCP connections in node `node`'s namespace from `source` to `destination`.
fn established(cluster: &Cluster, node: usize, source: &Pod, destination: &Pod) -> Result<usize> {
    let (src, dst) = (source.ip.to_string(), destination.addr(PORT).to_string());
    let args = [
        "ss",
        "-tnH",
        "state",
        "established",
        "src",
        &src,
        "dst",
        &dst,
    ];
    Ok(cluster.node_exec(node, &args)?.lines().count())
}

/// An open connection from `pod` to the echo server at `to` that has carried one line.
async fn open_echoing(pod: &Pod, to: std::net::SocketAddr) -> Result<TcpStream> {
    let mut stream = pod.connect(to).await?;
    ensure!(
        common::echoes(&mut stream).await,
        "{} -> {to}: no echo",
        pod.id()
    );
    Ok(stream)
}

/// Waits up to `within` for `stream` to be reset.
async fn expect_reset_within(stream: &mut TcpStream, within: Duration, what: &str) -> Result<()> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(within, stream.read(&mut byte)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Ok(other) => anyhow::bail!("{what}: expected a reset, got {other:?}"),
        Err(_) => anyhow::bail!("{what}: not reset within {within:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_peer_stops_answering_pings_is_closed() -> Result<()> {
    let Some((cluster, agents)) = mesh_with(&[
        "--http2-keepalive-interval=1",
        "--http2-keepalive-timeout=1",
    ])
    .await?
    else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    let mut client = open_echoing(web1, web2.addr(PORT)).await?;
    ensure!(
        established(&cluster, 1, web1, web2)? == 1,
        "node 1 holds no upstream for web-1"
    );

    // Node 0's agent freezes: its kernel still acknowledges every segment, but no PONG comes.
    let mark = agents[1].log_mark();
    agents[0].signal(Signal::SIGSTOP)?;
    let noticed = eventually(
        NOTICE,
        "node 1 closes the tunnel and its stream's upstream",
        || Ok(established(&cluster, 1, web1, web2)? == 0),
    )
    .await;
    agents[0].signal(Signal::SIGCONT)?;
    noticed?;
    ensure!(
        !agents[1]
            .log_lines_since(mark, "tunnel peer left a PING unanswered")
            .is_empty(),
        "node 1 closed the upstream without saying the tunnel's peer stopped answering: {}",
        agents[1].log_tail(10)
    );
    // Back, node 0 finds its tunnel gone and resets the client; a new connection works.
    expect_reset_within(
        &mut client,
        NOTICE,
        "web-1's connection over the closed tunnel",
    )
    .await?;
    expect_echo(web1, web2.addr(PORT)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_from_the_network_is_cut_by_tcp_keepalive() -> Result<()> {
    let Some((cluster, _agents)) = mesh_with(&[
        "--tcp-keepalive-time=1",
        "--tcp-keepalive-interval=1",
        "--tcp-keepalive-probes=2",
    ])
    .await?
    else {
        return Ok(());
    };
    // A plain pod on node 0 to an enrolled pod on node 1: node 1's inbound listener holds it.
    let (batch1, web2) = (
        cluster.pod("legacy", "batch-1"),
        cluster.pod("shop", "web-2"),
    );
    let _echo = web2.echo_server(PORT).await?;
    let _client = open_echoing(batch1, web2.addr(PORT)).await?;
    ensure!(
        established(&cluster, 1, batch1, web2)? == 1,
        "node 1 holds no upstream for batch-1"
    );

    // batch-1 drops off the network without a word: node 0 discards everything sent to it.
    let address = format!("{}/32", batch1.ip);
    cluster.ip(0, &["route", "replace", "blackhole", &address])?;
    eventually(
        NOTICE,
        "node 1 cuts the silent client and its upstream",
        || Ok(established(&cluster, 1, batch1, web2)? == 0),
    )
    .await?;
    // Seen from the destination pod too: its side of the upstream is gone.
    let src = batch1.ip.to_string();
    let at_destination = web2.exec(&["ss", "-tnH", "state", "established", "src", &src])?;
    ensure!(
        at_destination.trim().is_empty(),
        "web-2 still holds the upstream: {at_destination}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_cut_and_a_busy_one_lives_on() -> Result<()> {
    let Some((cluster, _agents)) = mesh_with(&["--idle-timeout=2"]).await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    let mut idle = open_echoing(web1, web2.addr(PORT)).await?;
    let mut busy = open_echoing(web1, web2.addr(PORT)).await?;
    let busy_side = async {
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            ensure!(
                common::echoes(&mut busy).await,
                "the busy connection stopped echoing"
            );
        }
        anyhow::Ok(())
    };
    let idle_side = expect_reset_within(&mut idle, NOTICE, "the idle connection");
    let (busy_result, idle_result) = tokio::join!(busy_side, idle_side);
    idle_result?;
    busy_result?;
    // Both legs of the idle one are gone on node 1; the busy one's are there.
    ensure!(
        established(&cluster, 1, web1, web2)? == 1,
        "node 1 should hold only the busy connection's upstream"
    );
    Ok(())
}
