//! End to end, as root: enrolled pods' TCP is captured into the node proxies and carried intact;
//! everything else flows as before. Two simulated nodes, real eBPF, real agents.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{
    PORT, capture_device, connections, counter, eventually, mesh, records_to, wait_records,
};

const SIZES: [usize; 3] = [1, 64 * 1024, 16 * 1024 * 1024];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_to_enrolled_across_nodes_goes_through_both_proxies() -> Result<()> {
    let Some((cluster, _agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    for len in SIZES {
        // Echo with half-close: the client shuts its write side and still reads everything back.
        let flow = web1.send_and_verify(web2.addr(PORT), len).await?;
        ensure!(
            flow.bytes_received == len,
            "echo of {len} bytes came back short: {flow:?}"
        );
    }

    let outbound = wait_records(&cluster, 0, "outbound", web2.addr(PORT), SIZES.len()).await?;
    let inbound = wait_records(&cluster, 1, "inbound", web2.addr(PORT), SIZES.len()).await?;
    for (records, node) in [
        (&outbound, "node 0 (outbound)"),
        (&inbound, "node 1 (inbound)"),
    ] {
        let mut sent: Vec<u64> = records
            .iter()
            .filter_map(|r| r["bytes_sent"].as_u64())
            .collect();
        sent.sort_unstable();
        ensure!(
            sent == SIZES.map(|s| s as u64),
            "{node}: bytes carried {sent:?}, want {SIZES:?}"
        );
        for r in records.iter() {
            ensure!(r["error"].is_null(), "{node}: connection failed: {r}");
            ensure!(
                r["source_workload"] == "shop/web-1",
                "{node}: wrong source: {r}"
            );
            ensure!(
                r["destination_workload"] == "shop/web-2",
                "{node}: wrong destination: {r}"
            );
            let source = r["source"].as_str().unwrap_or_default();
            ensure!(
                source.starts_with(&format!("{}:", web1.ip)),
                "{node}: source {source} is not web-1"
            );
        }
    }
    ensure!(counter(&cluster, 0, "outbound_captured")? >= SIZES.len() as u64);
    // Inbound, the streams arrive inside one pooled tunnel connection: one captured SYN.
    ensure!(counter(&cluster, 1, "inbound_captured")? >= 1);
    ensure!(counter(&cluster, 0, "sockops_established")? >= SIZES.len() as u64);
    // Traffic from the other node reaches the proxy at the uplink, not via the pod's veth.
    for node in 0..2 {
        let bpf = cluster.cli_json(node, &["bpf", "-o", "json"])?;
        let uplink = bpf["programs"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "capture_uplink"))
            .map(|p| p["attached_to"].clone());
        ensure!(
            uplink == Some(serde_json::json!(["eth0"])),
            "node {node}: uplink program on {uplink:?}"
        );
        ensure!(
            counter(&cluster, node, "inbound_redirected")? == 0,
            "node {node} took the detour: {bpf}"
        );
    }
    // The node 1 proxy's own connections to web-2 pass the capture untouched (SO_MARK).
    ensure!(counter(&cluster, 1, "proxy_own")? > 0);

    // The application sees the real client address.
    let _peer = web2.peer_server(PORT + 1).await?;
    let report = web1.ask_peer(web2.addr(PORT + 1)).await?;
    ensure!(
        report.seen_by_server.ip() == web1.ip,
        "server saw {report:?}, not web-1's address"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_pods_are_never_touched() -> Result<()> {
    let Some((cluster, _agents)) = mesh().await? else {
        return Ok(());
    };
    let (batch1, batch2) = (
        cluster.pod("legacy", "batch-1"),
        cluster.pod("legacy", "batch-2"),
    );
    let _echo = batch2.echo_server(PORT).await?;
    let _peer = batch2.peer_server(PORT + 1).await?;
    let before = [
        counter(&cluster, 0, "passed")?,
        counter(&cluster, 1, "passed")?,
    ];
    batch1.send_and_verify(batch2.addr(PORT), 64 * 1024).await?;
    let report = batch1.ask_peer(batch2.addr(PORT + 1)).await?;
    ensure!(
        report.seen_by_server == report.local,
        "address changed on the way: {report:?}"
    );

    for node in 0..2 {
        let seen: Vec<_> = connections(&cluster, node)?
            .into_iter()
            .filter(|c| {
                let s = c.to_string();
                s.contains(&batch1.ip.to_string()) || s.contains(&batch2.ip.to_string())
            })
            .collect();
        ensure!(
            seen.is_empty(),
            "node {node}'s proxy saw plain traffic: {seen:#?}"
        );
        // No program on a non-enrolled pod's device.
        let bpf = cluster.cli_json(node, &["bpf", "-o", "json"])?;
        for pod in [batch1, batch2] {
            ensure!(
                !bpf.to_string().contains(&pod.host_veth),
                "node {node} attached to {}'s veth: {bpf}",
                pod.id()
            );
        }
    }
    let after = [
        counter(&cluster, 0, "passed")?,
        counter(&cluster, 1, "passed")?,
    ];
    ensure!(
        before == after,
        "capture programs looked at plain traffic: passed {before:?} -> {after:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_and_plain_pods_reach_each_other_both_ways() -> Result<()> {
    let Some((cluster, _agents)) = mesh().await? else {
        return Ok(());
    };
    let web1 = cluster.pod("shop", "web-1");
    let web2 = cluster.pod("shop", "web-2");
    let batch1 = cluster.pod("legacy", "batch-1");
    let batch2 = cluster.pod("legacy", "batch-2");
    let _servers = (
        web1.peer_server(PORT).await?,
        web2.peer_server(PORT).await?,
        batch1.peer_server(PORT).await?,
        batch2.peer_server(PORT).await?,
    );
    // (client, server, node whose proxy must carry it, direction there)
    let cases = [
        (web1, batch2, 0, "outbound"), // enrolled -> plain, across nodes
        (batch1, web2, 1, "inbound"),  // plain -> enrolled, across nodes
        (web1, batch1, 0, "outbound"), // enrolled -> plain, same node
        (batch1, web1, 0, "inbound"),  // plain -> enrolled, same node
    ];
    for (client, server, node, direction) in cases {
        let report = client.ask_peer(server.addr(PORT)).await?;
        ensure!(
            report.seen_by_server.ip() == client.ip,
            "{} -> {}: server saw {report:?}",
            client.id(),
            server.id()
        );
        let records = wait_records(&cluster, node, direction, server.addr(PORT), 1).await?;
        ensure!(
            records
                .iter()
                .any(|r| r["source_workload"] == client.id().as_str() && r["error"].is_null()),
            "{} -> {}: node {node} has no {direction} record: {records:#?}",
            client.id(),
            server.id()
        );
        let other = 1 - node;
        if client.node != server.node {
            ensure!(
                records_to(
                    &cluster,
                    other,
                    if direction == "inbound" {
                        "outbound"
                    } else {
                        "inbound"
                    },
                    server.addr(PORT)
                )?
                .is_empty(),
                "{} -> {}: node {other}'s proxy should not carry a flow with a plain end there",
                client.id(),
                server.id()
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_edit_enrolls_and_releases_a_pod_live() -> Result<()> {
    let Some((cluster, _agents)) = mesh().await? else {
        return Ok(());
    };
    let (batch1, batch2) = (
        cluster.pod("legacy", "batch-1"),
        cluster.pod("legacy", "batch-2"),
    );
    let _server = batch2.peer_server(PORT).await?;
    ensure!(capture_device(&cluster, 0, "legacy", "batch-1")?.is_none());

    // Enroll the whole namespace: both batch pods are captured without any restart.
    cluster.set_namespace_labels(
        "legacy",
        &[(mesh_tests::MODE_LABEL, mesh_tests::MODE_AMBIENT)],
    )?;
    eventually(Duration::from_secs(3), "batch-1 captured", || {
        Ok(capture_device(&cluster, 0, "legacy", "batch-1")?.as_deref()
            == Some(batch1.host_veth.as_str()))
    })
    .await?;
    eventually(Duration::from_secs(3), "batch-2 captured", || {
        Ok(capture_device(&cluster, 1, "legacy", "batch-2")?.is_some())
    })
    .await?;
    batch1.ask_peer(batch2.addr(PORT)).await?;
    wait_records(&cluster, 0, "outbound", batch2.addr(PORT), 1).await?;
    wait_records(&cluster, 1, "inbound", batch2.addr(PORT), 1).await?;

    // Opt one pod out with its own label: its next connection bypasses its node's proxy.
    cluster.set_pod_labels(
        "legacy",
        "batch-1",
        &[("app", "batch"), (mesh_tests::MODE_LABEL, "none")],
    )?;
    eventually(Duration::from_secs(3), "batch-1 released", || {
        Ok(capture_device(&cluster, 0, "legacy", "batch-1")?.is_none())
    })
    .await?;
    let report = batch1.ask_peer(batch2.addr(PORT)).await?;
    ensure!(report.seen_by_server.ip() == batch1.ip);
    wait_records(&cluster, 1, "inbound", batch2.addr(PORT), 2).await?;
    let outbound = records_to(&cluster, 0, "outbound", batch2.addr(PORT))?;
    ensure!(
        outbound.len() == 1,
        "released pod's connection still went through node 0's proxy: {outbound:#?}"
    );
    Ok(())
}
