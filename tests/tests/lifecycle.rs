//! End to end, as root: a stopped or killed agent leaves capture in place, failing closed; a
//! restarted agent adopts it; `mesh-agent uninstall` leaves nothing of ours in the kernel, and
//! pods then talk directly, without stalling on the proxy's leftover sockets.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{
    PORT, STRICT, apply, eventually, expect_echo, expect_reset, mesh, pcap, wait_records,
};
use mesh_tests::{Cluster, Pod};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a connection that fails closed is given to (wrongly) complete.
const FAIL_CLOSED_WAIT: Duration = Duration::from_secs(3);

/// What a running agent put into the kernel and its node's namespace, read from outside the
/// agent: bpftool (programs, their maps, links), the TCX query of each device, `ip`, `/proc`.
struct Footprint {
    programs: Vec<u64>,
    maps: Vec<u64>,
    links: Vec<u64>,
}

/// The program ids the agent reports must be the ones the kernel has loaded and attached:
/// capture_ingress/capture_egress on each enrolled pod's veth and capture_uplink on eth0 (TCX),
/// one link per attachment, the policy rule and route in place, and early demux off.
fn footprint_while_running(cluster: &Cluster, node: usize, veths: &[&str]) -> Result<Footprint> {
    let bpf = cluster.cli_json(node, &["bpf", "-o", "json"])?;
    let programs: Vec<u64> = bpf["programs"]
        .as_array()
        .context("no programs")?
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    ensure!(programs.len() == 4, "expected 4 programs, got {bpf}");
    let mut maps = Vec::new();
    for id in &programs {
        let shown: Value = serde_json::from_str(
            &cluster.bpftool(node, &["-j", "prog", "show", "id", &id.to_string()])?,
        )?;
        maps.extend(
            shown["map_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64),
        );
    }
    maps.sort_unstable();
    maps.dedup();
    ensure!(!maps.is_empty(), "node {node}: the programs use no map?");
    let links = links_of(cluster, node, &programs)?;
    // capture_ingress + capture_egress per enrolled veth, capture_uplink, sock_ops.
    ensure!(
        links.len() == 2 * veths.len() + 2,
        "node {node}: {} links to our programs, expected {}",
        links.len(),
        2 * veths.len() + 2
    );
    let netns = cluster.node(node).netns();
    for veth in veths {
        let tcx = netns.tcx_programs(veth)?;
        ensure!(
            tcx.names() == ["capture_ingress", "capture_egress"]
                && tcx
                    .ingress
                    .iter()
                    .chain(&tcx.egress)
                    .all(|p| programs.contains(&u64::from(p.id))),
            "node {node}: {veth} carries {tcx:?}, not this agent's capture programs"
        );
    }
    let uplink = netns.tcx_programs("eth0")?;
    ensure!(
        uplink.names() == ["capture_uplink"],
        "node {node}: eth0 carries {uplink:?}"
    );
    let rules = cluster.ip(node, &["rule", "show"])?;
    ensure!(
        rules.contains("fwmark 0x200/0xf00 lookup 2004"),
        "node {node}: no policy rule while running:\n{rules}"
    );
    let routes = capture_routes(cluster, node)?;
    ensure!(
        routes.iter().any(|r| r.starts_with("local default dev lo")),
        "node {node}: no capture route while running: {routes:?}"
    );
    let demux = cluster.node_exec(node, &["cat", "/proc/sys/net/ipv4/tcp_early_demux"])?;
    ensure!(
        demux.trim() == "0",
        "node {node}: tcp_early_demux is {demux} while running"
    );
    Ok(Footprint {
        programs,
        maps,
        links,
    })
}

/// Ids of the links (any kind: TCX, cgroup) that attach one of `programs`.
fn links_of(cluster: &Cluster, node: usize, programs: &[u64]) -> Result<Vec<u64>> {
    let links: Value = serde_json::from_str(&cluster.bpftool(node, &["-j", "link", "show"])?)?;
    Ok(links
        .as_array()
        .context("bpftool link show: not a list")?
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| programs.contains(&p)))
        .filter_map(|l| l["id"].as_u64())
        .collect())
}

/// Routes of table 2004, listed from every table: that listing works whether or not the table
/// exists, so an error fails the check instead of passing for "empty".
fn capture_routes(cluster: &Cluster, node: usize) -> Result<Vec<String>> {
    let all = cluster.ip(node, &["-4", "route", "show", "table", "all"])?;
    Ok(all
        .lines()
        .filter(|l| l.contains("table 2004"))
        .map(str::to_owned)
        .collect())
}

/// Nothing of ours is left in a node's namespace or the kernel.
fn assert_clean(
    cluster: &Cluster,
    node: usize,
    footprint: &Footprint,
    veths: &[&str],
) -> Result<()> {
    for id in &footprint.programs {
        let shown = cluster.bpftool(node, &["prog", "show", "id", &id.to_string()]);
        ensure!(shown.is_err(), "program {id} is still loaded: {shown:?}");
    }
    // A pinned map (or one a leftover program holds) stays loaded after its process is gone.
    for id in &footprint.maps {
        let shown = cluster.bpftool(node, &["map", "show", "id", &id.to_string()]);
        ensure!(shown.is_err(), "map {id} is still loaded: {shown:?}");
    }
    let left = links_of(cluster, node, &footprint.programs)?;
    ensure!(left.is_empty(), "links to our programs are left: {left:?}");
    let links = cluster.bpftool(node, &["-j", "link", "show"])?;
    for id in &footprint.links {
        ensure!(
            !links.contains(&format!("{{\"id\":{id},")),
            "link {id} is left: {links}"
        );
    }
    let netns = cluster.node(node).netns();
    for device in veths.iter().copied().chain(["eth0"]) {
        let tcx = netns.tcx_programs(device)?;
        ensure!(
            tcx.is_empty(),
            "node {node}: {device} still carries {tcx:?}"
        );
    }
    let rules = cluster.ip(node, &["rule", "show"])?;
    ensure!(
        !rules.contains("lookup 2004"),
        "policy rule left behind:\n{rules}"
    );
    let routes = capture_routes(cluster, node)?;
    ensure!(routes.is_empty(), "capture route left behind: {routes:?}");
    let demux = cluster.node_exec(node, &["cat", "/proc/sys/net/ipv4/tcp_early_demux"])?;
    ensure!(demux.trim() == "1", "tcp_early_demux not restored: {demux}");
    Ok(())
}

/// The node's pin directory, as its agent reports it.
fn pin_dir(cluster: &Cluster, node: usize) -> Result<String> {
    let status = cluster.cli_json(node, &["status", "-o", "json"])?;
    let dir = status["lifecycle"]["dataplane"]["pin_dir"]
        .as_str()
        .with_context(|| format!("node {node}: no pin directory in {status}"))?;
    ensure!(
        dir.starts_with("/sys/fs/bpf/mesh-agent/netns-"),
        "node {node}: pin directory {dir}"
    );
    Ok(format!("{dir}/"))
}

/// Links pinned under `dir`, seen by bpftool (which lists every pin of the host's bpffs,
/// other clusters' too): id → pin paths.
fn pinned_links(cluster: &Cluster, node: usize, dir: &str) -> Result<Vec<(u64, Vec<String>)>> {
    let links: Value =
        serde_json::from_str(&cluster.bpftool(node, &["-j", "-f", "link", "show"])?)?;
    Ok(links
        .as_array()
        .context("bpftool link show: not a list")?
        .iter()
        .filter_map(|l| {
            let paths: Vec<String> = l["pinned"]
                .as_array()?
                .iter()
                .filter_map(|p| p.as_str().map(str::to_owned))
                .filter(|p| p.starts_with(dir))
                .collect();
            (!paths.is_empty()).then(|| (l["id"].as_u64().unwrap_or(0), paths))
        })
        .collect())
}

/// A new connection from `pod` to `to` gets no answer at all: its SYN is dropped in the kernel
/// (not refused, not accepted by anything).
async fn expect_dropped(pod: &Pod, to: std::net::SocketAddr) -> Result<()> {
    let socket = tokio::net::TcpSocket::from_std_stream(pod.netns().tcp_socket()?.into());
    match tokio::time::timeout(FAIL_CLOSED_WAIT, socket.connect(to)).await {
        Err(_) => Ok(()),
        Ok(Ok(stream)) => anyhow::bail!(
            "{} -> {to}: connected ({:?}) although no agent serves the node",
            pod.id(),
            stream.local_addr()
        ),
        Ok(Err(e)) => anyhow::bail!("{} -> {to}: expected no answer, got {e}", pod.id()),
    }
}

/// Serial connect + 1-byte echo from `pod` to `to` for `window`: how many completed, and the
/// slowest (a connection still hanging at the end counts with its time so far).
async fn serial_echoes(
    pod: &Pod,
    to: std::net::SocketAddr,
    window: Duration,
) -> Result<(usize, Duration)> {
    let end = Instant::now() + window;
    let (mut done, mut slowest) = (0, Duration::ZERO);
    while Instant::now() < end {
        let start = Instant::now();
        let one = async {
            let socket = tokio::net::TcpSocket::from_std_stream(pod.netns().tcp_socket()?.into());
            let mut stream = socket.connect(to).await?;
            stream.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            anyhow::Ok(())
        };
        let left = end.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let finished = tokio::time::timeout(left, one).await;
        slowest = slowest.max(start.elapsed());
        match finished {
            Ok(result) => {
                result?;
                done += 1;
            }
            Err(_) => break,
        }
    }
    Ok((done, slowest))
}

/// TIME_WAIT (and other) TCP sockets of node `node` bound to `ip`, from `ss`.
fn sockets_on(cluster: &Cluster, node: usize, ip: std::net::Ipv4Addr) -> Result<usize> {
    let out = cluster.node_exec(node, &["ss", "-Htan", "src", &ip.to_string()])?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_leaves_capture_failing_closed_until_uninstall() -> Result<()> {
    let Some((cluster, mut agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let (batch1, batch2) = (
        cluster.pod("legacy", "batch-1"),
        cluster.pod("legacy", "batch-2"),
    );
    let _echo = web2.echo_server(PORT).await?;
    let _plain_echo = batch2.echo_server(PORT).await?;
    web1.send_and_verify(web2.addr(PORT), 4096).await?;
    wait_records(&cluster, 0, "outbound", web2.addr(PORT), 1).await?;
    // Many short proxied connections: node 1's proxy ends each to web-2 from web-1's address,
    // and the TIME_WAIT sockets it leaves are what a pod's direct connections would meet.
    let (proxied, _) = serial_echoes(web1, web2.addr(PORT), Duration::from_secs(2)).await?;
    ensure!(proxied > 100, "only {proxied} proxied connections in 2 s");
    let footprints = [
        footprint_while_running(&cluster, 0, &[&web1.host_veth])?,
        footprint_while_running(&cluster, 1, &[&web2.host_veth])?,
    ];
    let dirs = [pin_dir(&cluster, 0)?, pin_dir(&cluster, 1)?];
    for (node, footprint) in footprints.iter().enumerate() {
        let pinned = pinned_links(&cluster, node, &dirs[node])?;
        ensure!(
            footprint
                .links
                .iter()
                .all(|id| pinned.iter().any(|(p, _)| p == id)),
            "node {node}: not every link is pinned: links {:?}, pinned {pinned:?}",
            footprint.links
        );
    }

    for (node, agent) in agents.iter_mut().enumerate() {
        let status = agent.terminate().await?;
        ensure!(
            status.success(),
            "agent {node} exited with {status}: {}",
            agent.log_tail(20)
        );
        ensure!(
            agent.log().contains("capture stays in place"),
            "agent {node} log: {}",
            agent.log_tail(20)
        );
    }
    // Capture is still there, the same programs on the same links, seen by the kernel.
    for (node, (footprint, veth)) in footprints
        .iter()
        .zip([&web1.host_veth, &web2.host_veth])
        .enumerate()
    {
        let tcx = cluster.node(node).netns().tcx_programs(veth)?;
        ensure!(
            tcx.names() == ["capture_ingress", "capture_egress"]
                && tcx
                    .ingress
                    .iter()
                    .chain(&tcx.egress)
                    .all(|p| footprint.programs.contains(&u64::from(p.id))),
            "node {node}: {veth} carries {tcx:?} after the agent stopped"
        );
        let links = links_of(&cluster, node, &footprint.programs)?;
        ensure!(
            links.len() == footprint.links.len(),
            "node {node}: links {links:?}, were {:?}",
            footprint.links
        );
    }
    // Enrolled pods' new connections fail closed, both ways; plain pods are untouched.
    expect_dropped(web1, web2.addr(PORT)).await?;
    expect_dropped(batch1, web2.addr(PORT)).await?;
    expect_dropped(web2, batch1.addr(PORT)).await?;
    expect_echo(batch1, batch2.addr(PORT)).await?;
    let left = sockets_on(&cluster, 1, web1.ip)?;
    ensure!(
        left > 0,
        "node 1 holds no proxy socket on web-1's address: the stall check below would prove nothing"
    );

    for (node, footprint) in footprints.iter().enumerate() {
        let report = cluster.uninstall(node)?;
        ensure!(
            report["removed_links"].as_array().map(Vec::len) == Some(footprint.links.len())
                && report["removed_capture_route"] == true
                && report["restored_early_demux"] == "1"
                && report["still_attached"]
                    .as_array()
                    .is_some_and(Vec::is_empty),
            "node {node}: uninstall report {report}"
        );
    }
    ensure!(
        cluster.uninstall(1)?["closed_sockets"] == 0,
        "uninstall is not idempotent"
    );
    eventually(common::SETTLE, "programs and maps unloaded", || {
        Ok(footprints.iter().enumerate().all(|(node, f)| {
            f.programs.iter().all(|id| {
                cluster
                    .bpftool(node, &["prog", "show", "id", &id.to_string()])
                    .is_err()
            }) && f.maps.iter().all(|id| {
                cluster
                    .bpftool(node, &["map", "show", "id", &id.to_string()])
                    .is_err()
            })
        }))
    })
    .await?;
    assert_clean(&cluster, 0, &footprints[0], &[&web1.host_veth])?;
    assert_clean(&cluster, 1, &footprints[1], &[&web2.host_veth])?;
    for (node, dir) in dirs.iter().enumerate() {
        ensure!(
            pinned_links(&cluster, node, dir)?.is_empty(),
            "node {node}: pins left"
        );
        ensure!(
            !std::path::Path::new(dir).exists(),
            "node {node}: {dir} is still there"
        );
    }
    ensure!(
        sockets_on(&cluster, 1, web1.ip)? == 0,
        "the proxy's sockets on web-1's address were left"
    );

    // Direct now, and no connection stalls on what the proxy left behind.
    let (direct, slowest) = serial_echoes(web1, web2.addr(PORT), Duration::from_secs(3)).await?;
    ensure!(
        direct > 100 && slowest < Duration::from_secs(1),
        "after uninstall: {direct} direct connections in 3 s, the slowest took {slowest:?}"
    );
    common::expect_unproxied(web1, web2, PORT + 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_fails_closed_under_strict_and_its_successor_adopts_the_data_plane()
-> Result<()> {
    let Some((cluster, mut agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let batch1 = cluster.pod("legacy", "batch-1");
    apply(&cluster, "strict.yaml", STRICT).await?;
    let _echo = web2.echo_server(PORT).await?;
    let _plain_echo = batch1.echo_server(PORT).await?;
    expect_echo(web1, web2.addr(PORT)).await?;
    expect_reset(batch1, web2.addr(PORT)).await?;
    let footprint = footprint_while_running(&cluster, 1, &[&web2.host_veth])?;
    let dir = pin_dir(&cluster, 1)?;

    // Everything web-2 sends or receives on node 1's link, from before the kill to after the
    // restart: what web-2 sends must only ever leave inside a tunnel (port 15008).
    let pcap_file = cluster.temp_dir().join("node1-eth0.pcap");
    let capture = pcap::Capture::start(
        cluster.node(1).netns(),
        "eth0",
        &pcap_file,
        &format!("tcp and host {}", web2.ip),
    )?;
    agents[1].kill()?;
    expect_dropped(batch1, web2.addr(PORT)).await?;
    expect_dropped(web2, batch1.addr(PORT)).await?;
    let tcx = cluster.node(1).netns().tcx_programs(&web2.host_veth)?;
    ensure!(
        tcx.ingress
            .iter()
            .chain(&tcx.egress)
            .all(|p| footprint.programs.contains(&u64::from(p.id)))
            && tcx.names() == ["capture_ingress", "capture_egress"],
        "after kill -9, web-2's veth carries {tcx:?}"
    );

    let started = Instant::now();
    let mut successor = cluster.start_agent(1).await?;
    let took = started.elapsed();
    ensure!(
        took < Duration::from_secs(5),
        "the restarted agent took {took:?} to be ready"
    );
    let status = cluster.cli_json(1, &["status", "-o", "json"])?;
    let dataplane = &status["lifecycle"]["dataplane"];
    ensure!(
        dataplane["adopted"] == true
            && dataplane["layout"] == 1
            && dataplane["pinned_since"].as_u64().is_some_and(|t| t > 0),
        "status: {status}"
    );
    ensure!(
        cluster.cli(1, &["status"])?.contains("adopted"),
        "the status table does not say the data plane was adopted"
    );
    // The same links, now running the new agent's programs.
    let links = links_of(&cluster, 1, &footprint.programs)?;
    ensure!(
        links.is_empty(),
        "links still run the dead agent's programs: {links:?}"
    );
    let pinned = pinned_links(&cluster, 1, &dir)?;
    ensure!(
        footprint
            .links
            .iter()
            .filter(|id| pinned.iter().any(|(p, _)| p == *id))
            .count()
            == footprint.links.len() - 1,
        "the veth and uplink links were not kept (only sock_ops is replaced): before {:?}, pinned now {pinned:?}",
        footprint.links
    );
    expect_echo(web1, web2.addr(PORT)).await?;
    expect_reset(batch1, web2.addr(PORT)).await?;

    let segments = capture.finish()?;
    let plaintext: Vec<_> = segments
        .iter()
        .filter(|s| !s.payload.is_empty() && *s.source.ip() == web2.ip)
        .filter(|s| s.source.port() != 15008 && s.destination.port() != 15008)
        .map(|s| {
            format!(
                "{} -> {} ({} bytes)",
                s.source,
                s.destination,
                s.payload.len()
            )
        })
        .collect();
    ensure!(
        plaintext.is_empty() && !segments.is_empty(),
        "plaintext of web-2 on node 1's link ({} segments): {plaintext:?}",
        segments.len()
    );

    // A second crash leaves nothing the uninstall cannot take away.
    successor.kill()?;
    let report = cluster.uninstall(1)?;
    ensure!(
        report["removed_capture_route"] == true,
        "uninstall report {report}"
    );
    ensure!(
        pinned_links(&cluster, 1, &dir)?.is_empty() && !std::path::Path::new(&dir).exists(),
        "pins left after uninstall"
    );
    let tcx = cluster.node(1).netns().tcx_programs(&web2.host_veth)?;
    ensure!(tcx.is_empty(), "web-2's veth still carries {tcx:?}");
    Ok(())
}

/// Ids of the maps the program `id` uses, from bpftool.
fn maps_of(cluster: &Cluster, node: usize, id: u32) -> Result<Vec<u64>> {
    let shown: Value = serde_json::from_str(
        &cluster.bpftool(node, &["-j", "prog", "show", "id", &id.to_string()])?,
    )?;
    Ok(shown["map_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_of_another_layout_gets_fresh_maps_and_keeps_its_links() -> Result<()> {
    let Some((cluster, mut agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    expect_echo(web1, web2.addr(PORT)).await?;
    let dir = pin_dir(&cluster, 1)?;
    let links_before = pinned_links(&cluster, 1, &dir)?;
    let status = agents[1].terminate().await?;
    ensure!(status.success(), "agent 1: {status}");

    // As if an agent of another layout (0) had pinned these maps.
    let (ours, other) = (format!("{dir}v1"), format!("{dir}v0"));
    cluster.node_exec(1, &["mv", &ours, &other])?;
    let before = cluster.node(1).netns().tcx_programs(&web2.host_veth)?;
    let old_maps = maps_of(
        &cluster,
        1,
        before.ingress.first().context("no program")?.id,
    )?;

    agents[1] = cluster.start_agent(1).await?;
    ensure!(
        std::path::Path::new(&ours).is_dir() && !std::path::Path::new(&other).exists(),
        "after the take-over: {ours} should exist and {other} be gone"
    );
    let after = cluster.node(1).netns().tcx_programs(&web2.host_veth)?;
    ensure!(
        after.names() == ["capture_ingress", "capture_egress"],
        "web-2's veth carries {after:?}"
    );
    let new_maps = maps_of(&cluster, 1, after.ingress[0].id)?;
    ensure!(
        new_maps.iter().all(|m| !old_maps.contains(m)),
        "the programs still use the other layout's maps: {new_maps:?} (old {old_maps:?})"
    );
    // The links themselves were kept (only sock_ops is replaced).
    let links_after = pinned_links(&cluster, 1, &dir)?;
    let kept = links_before
        .iter()
        .filter(|(id, _)| links_after.iter().any(|(a, _)| a == id))
        .count();
    ensure!(
        kept == links_before.len() - 1,
        "links before {links_before:?}, after {links_after:?}"
    );
    expect_echo(web1, web2.addr(PORT)).await?;
    wait_records(&cluster, 1, "inbound", web2.addr(PORT), 1).await?;
    Ok(())
}
