//! End to end, as root: the agents read the cluster from a Kubernetes API server (the test API
//! server of `mesh_tests::apiserver`, speaking the real protocol, reached by the agents' real
//! kube-rs client over HTTPS with a bearer token) instead of a directory of YAML.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{PORT, SETTLE, capture_device, eventually, expect_reset, wait_records};
use mesh_tests::{
    Agent, Cluster, ClusterSpec, MODE_AMBIENT, MODE_LABEL,
    apiserver::{ApiServerConfig, Verb},
};
use serde_json::{Value, json};

/// The demo cluster, its state served by an API server inside node 0's namespace
/// ([`Cluster::serve_api_with`]), and an agent per node reading it. `None` (after a loud skip
/// message) when not root.
async fn cluster_on_the_api(config: ApiServerConfig) -> Result<Option<(Cluster, Vec<Agent>)>> {
    if !mesh_tests::require_root() {
        return Ok(None);
    }
    let mut cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
    cluster.serve_api_with(config).await?;
    let mut agents = Vec::new();
    for index in 0..2 {
        agents.push(cluster.start_agent(index).await?);
    }
    Ok(Some((cluster, agents)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_source_serves_capture_tunnel_and_policy_and_follows_changes() -> Result<()> {
    let Some((cluster, _agents)) = cluster_on_the_api(ApiServerConfig::default()).await? else {
        return Ok(());
    };
    let api = cluster.api().context("the cluster serves no API")?;
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let (batch1, batch2) = (
        cluster.pod("legacy", "batch-1"),
        cluster.pod("legacy", "batch-2"),
    );
    let status = cluster.cli_json(0, &["status", "-o", "json"])?;
    ensure!(
        mesh_tests::watches_synced(&status),
        "every watch synced: {status:#}"
    );
    // The source names the API server it reads.
    let source = status["state"]["path"].as_str().unwrap_or_default();
    ensure!(
        source.starts_with("kubernetes ") && source.contains(&api.addr().to_string()),
        "status names the source {source:?}, not the API server at {}",
        api.addr()
    );

    // Capture and the tunnel, from state the API served.
    let _echo = web2.echo_server(PORT).await?;
    web1.send_and_verify(web2.addr(PORT), 64 * 1024).await?;
    wait_records(&cluster, 0, "outbound", web2.addr(PORT), 1).await?;
    let inbound = wait_records(&cluster, 1, "inbound", web2.addr(PORT), 1).await?;
    ensure!(
        inbound
            .iter()
            .any(|r| r["security"] == "mutual_tls" && r["source_workload"] == "shop/web-1"),
        "{inbound:#?}"
    );

    // Labelling a namespace through the API enrolls its pods live.
    ensure!(capture_device(&cluster, 0, "legacy", "batch-1")?.is_none());
    let start = tokio::time::Instant::now();
    // Written to the API server by the cluster's mirror; the agents read nothing else.
    cluster.set_namespace_labels("legacy", &[(MODE_LABEL, MODE_AMBIENT)])?;
    eventually(SETTLE, "batch-1 captured after the namespace label", || {
        Ok(capture_device(&cluster, 0, "legacy", "batch-1")?.as_deref()
            == Some(batch1.host_veth.as_str()))
    })
    .await?;
    eprintln!("namespace label to capture: {:?}", start.elapsed());

    // A policy from the API applies; a broken one denies what it selects, and is reported,
    // while the good one still applies elsewhere.
    let _batch_echo = batch2.echo_server(PORT).await?;
    api.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "broken", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.x"]}}]}]}
    }))?;
    eventually(SETTLE, "the broken policy reported", || {
        let status = cluster.cli_json(1, &["status", "-o", "json"])?;
        Ok(status["state"]["status"]["last_error"]
            .as_str()
            .is_some_and(|e| {
                e.contains("AuthorizationPolicy shop/broken") && e.contains("ipBlocks[0]")
            }))
    })
    .await?;
    expect_reset(web1, web2.addr(PORT)).await?;
    common::expect_echo(web1, batch2.addr(PORT)).await?;

    // Deleting a pod releases it: gone from the agent's view and its veth bare in the kernel.
    let node0 = cluster.node(0).netns();
    let batch1_programs = || node0.tcx_programs(&batch1.host_veth);
    ensure!(
        batch1_programs()?.names() == ["capture_ingress", "capture_egress"],
        "batch-1 not captured before its deletion"
    );
    let deleted = api.delete("Pod", "legacy", "batch-1")?;
    eventually(SETTLE, "batch-1 released after its deletion", || {
        let workloads = cluster.cli_json(0, &["workloads", "-o", "json"])?;
        Ok(!workloads
            .as_array()
            .into_iter()
            .flatten()
            .any(|w| w["namespace"] == "legacy" && w["name"] == "batch-1")
            && batch1_programs()?.is_empty())
    })
    .await?;

    // A new pod (a new object, with a new uid, for the same pod network) is captured, and its
    // traffic goes through the mesh.
    let mut created = deleted;
    if let Some(metadata) = created["metadata"].as_object_mut() {
        metadata.remove("resourceVersion");
        metadata.remove("creationTimestamp");
        metadata.insert("uid".into(), json!("batch-1-created-again"));
    }
    api.apply(created)?;
    eventually(SETTLE, "the new batch-1 captured", || {
        Ok(batch1_programs()?.names() == ["capture_ingress", "capture_egress"])
    })
    .await?;
    let before = common::records_to(&cluster, 0, "outbound", batch2.addr(PORT))?.len();
    common::expect_echo(batch1, batch2.addr(PORT)).await?;
    let records = wait_records(&cluster, 0, "outbound", batch2.addr(PORT), before + 1).await?;
    ensure!(
        records
            .iter()
            .any(|r| r["source_workload"] == "legacy/batch-1" && r["route"] == "tunnel"),
        "the new batch-1's connection was not tunnelled: {records:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_and_an_outage_keep_connections_and_enrollment() -> Result<()> {
    let Some((cluster, _agents)) = cluster_on_the_api(ApiServerConfig::default()).await? else {
        return Ok(());
    };
    let api = cluster.api().context("the cluster serves no API")?;
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    let mut open = web1.connect(web2.addr(PORT)).await?;
    ensure!(common::echoes(&mut open).await, "no echo before the relist");
    let generation = common::generation(&cluster, 0)?;

    // 410 Gone on every watch: the agents relist, the open connection carries on, and the
    // unchanged state is not published again (no release, no re-enrollment).
    let lists = api.requests(Verb::List, "/api/v1/pods");
    api.expire_watches();
    eventually(SETTLE, "the pods relisted", || {
        Ok(api.requests(Verb::List, "/api/v1/pods") >= lists + 2)
    })
    .await?;
    ensure!(
        common::echoes(&mut open).await,
        "the open connection broke on the relist"
    );
    ensure!(
        common::generation(&cluster, 0)? == generation,
        "a relist of an unchanged cluster published a new state"
    );
    ensure!(
        capture_device(&cluster, 0, "shop", "web-1")?.is_some(),
        "web-1 released by the relist"
    );

    // The API server goes away: traffic keeps flowing on the last state, and status says since when.
    api.down().await;
    let mut failing = Value::Null;
    eventually(SETTLE, "status shows the failing watches", || {
        let status = cluster.cli_json(0, &["status", "-o", "json"])?;
        failing = status["state"]["watches"].clone();
        Ok(failing
            .as_array()
            .is_some_and(|w| w.iter().any(|w| !w["failing_since"].is_null())))
    })
    .await?;
    ensure!(
        common::echoes(&mut open).await,
        "the open connection broke in the outage"
    );
    web1.send_and_verify(web2.addr(PORT), 4096).await?;
    ensure!(
        capture_device(&cluster, 0, "shop", "web-1")?.is_some(),
        "web-1 released in the outage"
    );

    // Back: the watches recover (kube's backoff) and a change applies again.
    api.up().await?;
    eventually(Duration::from_secs(60), "watches recovered", || {
        let status = cluster.cli_json(0, &["status", "-o", "json"])?;
        Ok(status["state"]["watches"]
            .as_array()
            .is_some_and(|w| w.iter().all(|w| w["failing_since"].is_null())))
    })
    .await?;
    drop(open);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_istio_kinds_the_agent_is_ready_and_enforces_no_policy() -> Result<()> {
    let config = ApiServerConfig {
        istio_installed: false,
        ..ApiServerConfig::default()
    };
    let Some((cluster, _agents)) = cluster_on_the_api(config).await? else {
        return Ok(());
    };
    let status = cluster.cli_json(1, &["status", "-o", "json"])?;
    let watches = status["state"]["watches"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for kind in [
        "AuthorizationPolicy",
        "PeerAuthentication",
        "Gateway",
        "HTTPRoute",
        "RequestAuthentication",
        "GRPCRoute",
    ] {
        ensure!(
            watches
                .iter()
                .any(|w| w["kind"] == kind && w["state"] == "not_installed"),
            "{kind} not reported as not installed: {status:#}"
        );
    }
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    common::expect_echo(web1, web2.addr(PORT)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_while_the_api_is_down_is_ready_once_it_answers() -> Result<()> {
    if !mesh_tests::require_root() {
        return Ok(());
    }
    let mut cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
    cluster.serve_api().await?;
    let api = cluster.api().context("the cluster serves no API")?;
    api.down().await;
    let mut agent = cluster
        .start_agent_with(0, mesh_tests::AgentOptions::default().no_wait())
        .await?;

    // Down: the agent runs and says why, but is not ready and captures nothing. Both are
    // observed from outside: the readiness port as the kubelet asks it, and the kernel for
    // the programs on web-1's veth (the agent's own views do not answer before it is ready).
    let web1_veth = cluster.pod("shop", "web-1").host_veth.clone();
    let node0 = cluster.node(0).netns();
    agent
        .wait_for_log("watch failing; the last state keeps serving", SETTLE)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        ensure!(
            agent.is_running(),
            "the agent exited: {}",
            agent.log_tail(20)
        );
        if let Ok(response) = cluster.readiness(0).await {
            ensure!(
                response.status != 200,
                "ready while the API server is down: {}",
                agent.log_tail(20)
            );
        }
        let attached = node0.tcx_programs(&web1_veth)?;
        ensure!(
            attached.is_empty(),
            "programs on web-1's veth before any state was listed: {:?}",
            attached.names()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Up: the lists complete (the library's backoff retries), the agent turns ready and
    // captures, and the mesh carries traffic to the other node.
    api.up().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cluster.readiness(0).await.is_ok_and(|r| r.status == 200) {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "not ready 60 s after the API server came back: {}",
            agent.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attached = node0.tcx_programs(&web1_veth)?;
    ensure!(
        attached.names().contains(&"capture_ingress"),
        "web-1's veth not captured once ready: {:?}",
        attached.names()
    );
    let _other = cluster.start_agent(1).await?;
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    common::expect_echo(web1, web2.addr(PORT)).await?;
    wait_records(&cluster, 0, "outbound", web2.addr(PORT), 1).await?;
    drop(agent);
    Ok(())
}

/// The agents' DaemonSet as the API server holds it (a valid object: kube-rs reads it typed).
fn daemonset() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "mesh-agent", "namespace": "mesh-system"},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "mesh-agent"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "mesh-agent"}},
                "spec": {"containers": [{"name": "mesh-agent", "image": "mesh-agent"}]}
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_daemonset_uninstalls_and_a_rollout_does_not() -> Result<()> {
    if !mesh_tests::require_root() {
        return Ok(());
    }
    let mut cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
    cluster.serve_api_with(ApiServerConfig::default()).await?;
    let api = cluster.api().context("the cluster serves no API")?;
    api.apply(daemonset())?;
    let options = || {
        mesh_tests::AgentOptions::default()
            .arg("--daemonset")
            .arg("mesh-system/mesh-agent")
    };
    let mut agents = Vec::new();
    for node in 0..2 {
        agents.push(cluster.start_agent_with(node, options()).await?);
    }
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    web1.send_and_verify(web2.addr(PORT), 4096).await?;
    let veths = [&web1.host_veth, &web2.host_veth];

    // A rollout (the DaemonSet stays): the stopped agent leaves capture in place.
    let status = agents[1].terminate().await?;
    ensure!(status.success(), "agent 1: {status}");
    ensure!(
        agents[1].log().contains("the DaemonSet stays"),
        "agent 1 did not ask about its DaemonSet: {}",
        agents[1].log_tail(20)
    );
    let tcx = cluster.node(1).netns().tcx_programs(veths[1])?;
    ensure!(
        tcx.names() == ["capture_ingress", "capture_egress"],
        "after a rollout's stop web-2's veth carries {tcx:?}"
    );
    agents[1] = cluster.start_agent_with(1, options()).await?;
    web1.send_and_verify(web2.addr(PORT), 4096).await?;

    // The DaemonSet deleted: each agent, told to stop, uninstalls.
    api.delete("DaemonSet", "mesh-system", "mesh-agent")?;
    for (node, agent) in agents.iter_mut().enumerate() {
        let status = agent.terminate().await?;
        ensure!(status.success(), "agent {node}: {status}");
        ensure!(
            agent.log().contains("data plane uninstalled"),
            "agent {node} did not uninstall: {}",
            agent.log_tail(20)
        );
        let tcx = cluster.node(node).netns().tcx_programs(veths[node])?;
        ensure!(
            tcx.is_empty(),
            "node {node}: {} still carries {tcx:?}",
            veths[node]
        );
        let uplink = cluster.node(node).netns().tcx_programs("eth0")?;
        ensure!(
            uplink.is_empty(),
            "node {node}: eth0 still carries {uplink:?}"
        );
        let rules = cluster.ip(node, &["rule", "show"])?;
        ensure!(
            !rules.contains("lookup 2004"),
            "node {node}: policy rule left:\n{rules}"
        );
        // Nothing left for a manual uninstall to remove.
        let report = cluster.uninstall(node)?;
        ensure!(
            report["pin_dir"].is_null() && report["removed_capture_route"] == false,
            "node {node}: uninstall found leftovers: {report}"
        );
    }
    // Direct now: the server sees the client's own connection (no proxy in between).
    common::expect_unproxied(web1, web2, PORT + 1).await
}
