//! End to end, as root: stopping, killing and cleaning up the agent leaves nothing of ours in
//! the kernel, and pods talk directly again.

mod common;

use anyhow::{Context, Result, ensure};
use common::{PORT, eventually, mesh, wait_records};
use mesh_tests::Cluster;
use serde_json::Value;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_removes_everything_and_pods_talk_directly() -> Result<()> {
    let Some((cluster, mut agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    web1.send_and_verify(web2.addr(PORT), 4096).await?;
    wait_records(&cluster, 0, "outbound", web2.addr(PORT), 1).await?;
    let footprints = [
        footprint_while_running(&cluster, 0, &[&web1.host_veth])?,
        footprint_while_running(&cluster, 1, &[&web2.host_veth])?,
    ];

    // A connection open across the stop drains (it may finish) instead of hanging the agent.
    let open = web1.connect(web2.addr(PORT)).await?;
    for (node, agent) in agents.iter_mut().enumerate() {
        let status = agent.terminate().await?;
        ensure!(
            status.success(),
            "agent {node} exited with {status}: {}",
            agent.log_tail(20)
        );
        ensure!(
            agent.log().contains("capture removed"),
            "agent {node} log: {}",
            agent.log_tail(20)
        );
    }
    drop(open);
    assert_clean(&cluster, 0, &footprints[0], &[&web1.host_veth])?;
    assert_clean(&cluster, 1, &footprints[1], &[&web2.host_veth])?;

    let flow = web1.send_and_verify(web2.addr(PORT), 64 * 1024).await?;
    ensure!(flow.bytes_received == 64 * 1024);
    let _peer = web2.peer_server(PORT + 1).await?;
    let report = web1.ask_peer(web2.addr(PORT + 1)).await?;
    ensure!(
        report.seen_by_server == report.local,
        "without the mesh the server sees the client as is: {report:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_is_cleaned_up_and_pods_talk_directly() -> Result<()> {
    let Some((cluster, mut agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let footprints = [
        footprint_while_running(&cluster, 0, &[&web1.host_veth])?,
        footprint_while_running(&cluster, 1, &[&web2.host_veth])?,
    ];
    for agent in agents.iter_mut() {
        agent.kill()?;
    }
    // The kernel drops links and programs with the process; the route is ours to remove.
    for node in 0..2 {
        let rules = cluster.ip(node, &["rule", "show"])?;
        ensure!(
            rules.contains("lookup 2004"),
            "expected the policy rule to outlive kill -9:\n{rules}"
        );
        let report = cluster.cli_json(node, &["cleanup", "-o", "json"])?;
        ensure!(
            report["removed_capture_route"] == true,
            "cleanup report: {report}"
        );
        ensure!(
            report["restored_early_demux"] == true,
            "cleanup report: {report}"
        );
        ensure!(
            report["still_attached"]
                .as_array()
                .is_some_and(|a| a.is_empty()),
            "cleanup report: {report}"
        );
        let again = cluster.cli_json(node, &["cleanup", "-o", "json"])?;
        ensure!(
            again["removed_capture_route"] == false,
            "cleanup is not idempotent: {again}"
        );
    }
    // The kernel frees a dead process's programs and maps asynchronously.
    eventually(common::SETTLE, "programs and maps unloaded", || {
        Ok(footprints.iter().all(|f| {
            f.programs.iter().all(|id| {
                cluster
                    .bpftool(0, &["prog", "show", "id", &id.to_string()])
                    .is_err()
            }) && f.maps.iter().all(|id| {
                cluster
                    .bpftool(0, &["map", "show", "id", &id.to_string()])
                    .is_err()
            })
        }))
    })
    .await?;
    assert_clean(&cluster, 0, &footprints[0], &[&web1.host_veth])?;
    assert_clean(&cluster, 1, &footprints[1], &[&web2.host_veth])?;

    let _echo = web2.echo_server(PORT).await?;
    web1.send_and_verify(web2.addr(PORT), 64 * 1024).await?;
    Ok(())
}
