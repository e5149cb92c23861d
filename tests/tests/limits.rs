//! End to end, as root: an agent short of resources keeps capture as it is. Node 1's agent runs
//! with a low open-files limit and a peer holds enough connections to exhaust it; the agent can
//! then not even ask the kernel for a device's index, and must not take that for "the pod's veth
//! is gone": web-2's capture stays, plaintext stays refused under STRICT, and the agent serves
//! again once the connections are gone.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{
    Outcome, PORT, SETTLE, STRICT, apply, eventually, exchange, expect_echo, expect_reset,
};
use mesh_tests::{Cluster, ClusterSpec};

/// Node 1's agent's open-files limit, soft and hard (so raising it at start changes nothing).
const OPEN_FILES: u32 = 128;
/// More connections than that limit lets node 1 carry.
const HELD: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_out_of_file_descriptors_keeps_capture_and_recovers() -> Result<()> {
    if !mesh_tests::require_root() {
        return Ok(());
    }
    let mut cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
    cluster.write_state()?;
    if common::from_the_api() {
        cluster.serve_api().await?;
    }
    // The proxy's own connection limit is lifted: this test is about what happens when the
    // process, not the proxy's budget, runs out.
    let few_files = cluster
        .wrapped_agent(
            "agent-with-few-files",
            &format!("prlimit --nofile={OPEN_FILES}:{OPEN_FILES}"),
        )?
        .arg("--max-connections=100000")
        .arg("--max-connections-per-source=100000")
        .arg("--max-connections-per-destination=100000");
    let _agent0 = cluster.start_agent(0).await?;
    let mut agent1 = cluster.start_agent_with(1, few_files).await?;
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let batch1 = cluster.pod("legacy", "batch-1");
    apply(&cluster, "strict.yaml", STRICT).await?;
    let _echo = web2.echo_server(PORT).await?;
    expect_echo(web1, web2.addr(PORT)).await?;
    expect_reset(batch1, web2.addr(PORT)).await?;
    let status = cluster.cli_json(1, &["status", "-o", "json"])?;
    ensure!(
        status["limits"]["open_files"]["current"] == OPEN_FILES,
        "status shows the open-files limit: {}",
        status["limits"]
    );

    // Exhaust node 1's descriptors: each tunnelled connection costs it an upstream socket.
    let mut held = Vec::new();
    for _ in 0..HELD {
        if let Ok(stream) = web1.connect(web2.addr(PORT)).await {
            held.push(stream);
        }
    }
    agent1
        .wait_for_log("Too many open files", SETTLE)
        .await
        .context("node 1's agent never ran out of descriptors")?;
    // A few reconcile passes (one a second) while it is out of them.
    let mark = agent1.log_mark();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tcx = cluster.node(1).netns().tcx_programs(&web2.host_veth)?;
    ensure!(
        tcx.names() == ["capture_ingress", "capture_egress"],
        "out of descriptors, node 1 took web-2's capture away: its veth carries {tcx:?}; log: {}",
        agent1.log_tail(20)
    );
    ensure!(
        agent1.log_lines_since(mark, "capture disabled").is_empty(),
        "node 1 disabled a capture: {}",
        agent1.log_tail(20)
    );
    let plain = exchange(batch1, web2.addr(PORT)).await?;
    ensure!(
        plain.outcome != Outcome::Echoed,
        "plaintext reached the STRICT pod while its agent was out of descriptors"
    );

    // The peer goes away: the agent serves again, under the same policy.
    drop(held);
    eventually(SETTLE, "node 1 serves again", || Ok(true)).await?;
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let mesh = exchange(web1, web2.addr(PORT)).await?;
        if mesh.outcome == Outcome::Echoed {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "node 1 did not recover: {:?}; log: {}",
            mesh.outcome,
            agent1.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    expect_reset(batch1, web2.addr(PORT)).await?;
    Ok(())
}
