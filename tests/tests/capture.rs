//! End to end, as root: enrolled pods' TCP is captured into the node proxies and carried intact;
//! everything else flows as before. Two simulated nodes, real eBPF, real agents.

mod common;

use anyhow::{Result, ensure};
use common::{
    PORT, capture_device, connections, counter, eventually, mesh, proxy_sockets, records_to,
    wait_records,
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
    batch1.send_and_verify(batch2.addr(PORT), 64 * 1024).await?;
    let report = batch1.ask_peer(batch2.addr(PORT + 1)).await?;
    ensure!(
        report.seen_by_server == report.local,
        "address changed on the way: {report:?}"
    );

    // While a plain connection is open, neither node's namespace holds a socket of it: no
    // proxy carries it (seen from outside the agents, with ss).
    let mut open = batch1.connect(batch2.addr(PORT)).await?;
    ensure!(common::echoes(&mut open).await, "plain echo failed");
    for node in 0..2 {
        let sockets = proxy_sockets(&cluster, node, batch1.ip, batch2.addr(PORT))?;
        ensure!(
            sockets.is_empty(),
            "node {node}'s namespace holds sockets of a plain flow: {sockets:#?}"
        );
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
    }
    drop(open);

    // The kernel's view of each veth (TCX, queried directly): the capture programs sit on the
    // enrolled pod's device — the query sees them — and nothing at all on the plain pods'.
    for (node, web) in [(0, "web-1"), (1, "web-2")] {
        let web = cluster.pod("shop", web);
        let netns = cluster.node(node).netns();
        let enrolled = netns.tcx_programs(&web.host_veth)?;
        ensure!(
            enrolled.names() == ["capture_ingress", "capture_egress"],
            "node {node}: {}'s veth carries {enrolled:?}",
            web.id()
        );
        let plain = if node == 0 { batch1 } else { batch2 };
        let attached = netns.tcx_programs(&plain.host_veth)?;
        ensure!(
            attached.is_empty(),
            "node {node}: a program sits on {}'s veth: {attached:?}",
            plain.id()
        );
        let tc = cluster.node_exec(
            node,
            &["tc", "filter", "show", "dev", &plain.host_veth, "ingress"],
        )?;
        ensure!(
            tc.trim().is_empty(),
            "node {node}: tc filter on {}'s veth: {tc}",
            plain.id()
        );
    }
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
    let mut servers = Vec::new();
    for pod in [web1, web2, batch1, batch2] {
        servers.push(pod.peer_server(PORT).await?);
        servers.push(pod.echo_server(PORT + 1).await?);
    }
    // (client, server, node whose proxy must carry it, direction there)
    let cases = [
        (web1, batch2, 0, "outbound"), // enrolled -> plain, across nodes
        (batch1, web2, 1, "inbound"),  // plain -> enrolled, across nodes
        (web1, batch1, 0, "outbound"), // enrolled -> plain, same node
        (batch1, web1, 0, "inbound"),  // plain -> enrolled, same node
    ];
    for (client, server, node, direction) in cases {
        let what = format!("{} -> {}", client.id(), server.id());
        let report = client.ask_peer(server.addr(PORT)).await?;
        ensure!(
            report.seen_by_server.ip() == client.ip,
            "{what}: server saw {report:?}"
        );
        let records = wait_records(&cluster, node, direction, server.addr(PORT), 1).await?;
        ensure!(
            records
                .iter()
                .any(|r| r["source_workload"] == client.id().as_str() && r["error"].is_null()),
            "{what}: node {node} has no {direction} record: {records:#?}"
        );

        // An open connection, seen from outside: the carrying node's namespace holds the
        // proxy's sockets of it; across nodes, the other node's holds none, and its proxy has
        // no record of it, open or closed.
        let to = server.addr(PORT + 1);
        let mut open = client.connect(to).await?;
        ensure!(common::echoes(&mut open).await, "{what}: no echo");
        let carried = proxy_sockets(&cluster, node, client.ip, to)?;
        ensure!(
            !carried.is_empty(),
            "{what}: node {node}'s namespace has no proxy socket for the open connection"
        );
        if client.node != server.node {
            let other = 1 - node;
            let sockets = proxy_sockets(&cluster, other, client.ip, to)?;
            ensure!(
                sockets.is_empty(),
                "{what}: node {other}'s namespace holds sockets of it: {sockets:#?}"
            );
            let seen: Vec<_> = connections(&cluster, other)?
                .into_iter()
                .filter(|c| {
                    [server.addr(PORT), to]
                        .iter()
                        .any(|a| c["original_destination"] == a.to_string())
                })
                .collect();
            ensure!(
                seen.is_empty(),
                "{what}: node {other}'s proxy should not carry a flow with a plain end there: {seen:#?}"
            );
        }
        drop(open);
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
    let _echo = batch2.echo_server(PORT + 1).await?;
    ensure!(capture_device(&cluster, 0, "legacy", "batch-1")?.is_none());

    // Enroll the whole namespace: both batch pods are captured without any restart.
    cluster.set_namespace_labels(
        "legacy",
        &[(mesh_tests::MODE_LABEL, mesh_tests::MODE_AMBIENT)],
    )?;
    eventually(common::SETTLE, "batch-1 captured", || {
        Ok(capture_device(&cluster, 0, "legacy", "batch-1")?.as_deref()
            == Some(batch1.host_veth.as_str()))
    })
    .await?;
    eventually(common::SETTLE, "batch-2 captured", || {
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
    eventually(common::SETTLE, "batch-1 released", || {
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
    // An open connection of the released pod: node 0's namespace holds no socket of it and its
    // proxy no record, while batch-2 (still enrolled) is served by node 1's proxy.
    let to = batch2.addr(PORT + 1);
    let mut open = batch1.connect(to).await?;
    ensure!(common::echoes(&mut open).await, "no echo after release");
    let sockets = proxy_sockets(&cluster, 0, batch1.ip, to)?;
    ensure!(
        sockets.is_empty(),
        "the released pod's open connection has proxy sockets on node 0: {sockets:#?}"
    );
    ensure!(
        !proxy_sockets(&cluster, 1, batch1.ip, to)?.is_empty(),
        "node 1's proxy does not serve the enrolled end"
    );
    let seen: Vec<_> = connections(&cluster, 0)?
        .into_iter()
        .filter(|c| c["original_destination"] == to.to_string())
        .collect();
    ensure!(
        seen.is_empty(),
        "node 0's proxy carries the released pod's open connection: {seen:#?}"
    );
    drop(open);
    Ok(())
}

/// A host-network service on the pod's own node (a node-local DNS cache, the kubelet, a host
/// port), as Istio ambient lets an ambient pod reach it: the enrolled pod's connection to its
/// node's address is captured and carried, as is a plain pod's and the other node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_pod_reaches_its_own_node() -> Result<()> {
    let Some((cluster, _agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, batch1) = (
        cluster.pod("shop", "web-1"),
        cluster.pod("legacy", "batch-1"),
    );
    let mut servers = Vec::new();
    for node in cluster.nodes() {
        let address = std::net::SocketAddr::from((node.link_ip, PORT));
        servers.push(mesh_tests::Server::echo(
            node.netns().listen_on(address).await?,
        ));
    }
    for node in cluster.nodes() {
        let address = std::net::SocketAddr::from((node.link_ip, PORT));
        common::expect_echo(web1, address).await?;
        common::expect_echo(batch1, address).await?;
    }
    // The enrolled pod's connection to its own node went through node 0's proxy.
    let own = std::net::SocketAddr::from((cluster.node(0).link_ip, PORT));
    let records = wait_records(&cluster, 0, "outbound", own, 1).await?;
    ensure!(
        records.iter().all(|r| r["route"] == "direct"),
        "to its own node: {records:#?}"
    );
    Ok(())
}
