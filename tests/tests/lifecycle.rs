//! End to end, as root: stopping, killing and cleaning up the agent leaves nothing of ours in
//! the kernel, and pods talk directly again.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{PORT, eventually, mesh, wait_records};
use mesh_tests::Cluster;

/// Program ids the agent reports for a node.
fn program_ids(cluster: &Cluster, node: usize) -> Result<Vec<u64>> {
    let bpf = cluster.cli_json(node, &["bpf", "-o", "json"])?;
    let ids: Vec<u64> = bpf["programs"]
        .as_array()
        .context("no programs")?
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    ensure!(ids.len() == 4, "expected 4 programs, got {bpf}");
    Ok(ids)
}

/// Nothing of ours is left in a node's namespace or the kernel.
fn assert_clean(cluster: &Cluster, node: usize, ids: &[u64], veths: &[&str]) -> Result<()> {
    for id in ids {
        let shown = cluster.bpftool(node, &["prog", "show", "id", &id.to_string()]);
        ensure!(shown.is_err(), "program {id} is still loaded: {shown:?}");
    }
    let links = cluster.bpftool(node, &["-j", "link", "show"])?;
    for id in ids {
        ensure!(
            !links.contains(&format!("\"prog_id\":{id},")),
            "a link to program {id} is left: {links}"
        );
    }
    let rules = cluster.ip(node, &["rule", "show"])?;
    ensure!(
        !rules.contains("lookup 2004"),
        "policy rule left behind:\n{rules}"
    );
    let table = cluster
        .ip(node, &["route", "show", "table", "2004"])
        .unwrap_or_default();
    ensure!(
        table.trim().is_empty(),
        "capture route left behind:\n{table}"
    );
    for veth in veths {
        let qdisc = cluster.node_exec(node, &["tc", "qdisc", "show", "dev", veth])?;
        ensure!(!qdisc.contains("clsact"), "qdisc left on {veth}: {qdisc}");
        for hook in ["ingress", "egress"] {
            let filters = cluster.node_exec(node, &["tc", "filter", "show", "dev", veth, hook])?;
            ensure!(
                filters.trim().is_empty(),
                "tc filter left on {veth} {hook}: {filters}"
            );
        }
    }
    let demux = cluster.node_exec(node, &["cat", "/proc/sys/net/ipv4/tcp_early_demux"])?;
    ensure!(demux.trim() == "1", "tcp_early_demux not restored: {demux}");
    ensure!(
        !std::path::Path::new("/sys/fs/bpf/mesh-agent").exists(),
        "pins left under /sys/fs/bpf/mesh-agent"
    );
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
    let ids = [program_ids(&cluster, 0)?, program_ids(&cluster, 1)?];

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
    assert_clean(&cluster, 0, &ids[0], &[&web1.host_veth])?;
    assert_clean(&cluster, 1, &ids[1], &[&web2.host_veth])?;

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
    let ids = [program_ids(&cluster, 0)?, program_ids(&cluster, 1)?];
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
    eventually(Duration::from_secs(3), "programs unloaded", || {
        Ok(ids.iter().flatten().all(|id| {
            cluster
                .bpftool(0, &["prog", "show", "id", &id.to_string()])
                .is_err()
        }))
    })
    .await?;
    assert_clean(&cluster, 0, &ids[0], &[&web1.host_veth])?;
    assert_clean(&cluster, 1, &ids[1], &[&web2.host_veth])?;

    let _echo = web2.echo_server(PORT).await?;
    web1.send_and_verify(web2.addr(PORT), 64 * 1024).await?;
    Ok(())
}
