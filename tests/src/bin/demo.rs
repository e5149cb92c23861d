//! `cargo xtask demo`: a two-node cluster with one enrolled namespace (`shop`) and one not
//! (`legacy`), an agent per node, a few flows, what the agents' CLI shows, then teardown.

use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result};
use mesh_tests::{Agent, Cluster, ClusterSpec, Pod, is_root};

const ECHO_PORT: u16 = 8080;
const PEER_PORT: u16 = 8081;
const FLOW_BYTES: usize = 64 * 1024;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    if !is_root() {
        eprintln!("demo: needs root (network namespaces, eBPF); run it as root or with sudo");
        return ExitCode::FAILURE;
    }
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            println!("\ndemo: some flows failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn header(title: &str) {
    println!(
        "\n==== {title} {}",
        "=".repeat(70usize.saturating_sub(title.len()))
    );
}

async fn run() -> Result<bool> {
    header("cluster");
    let cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
    for node in cluster.nodes() {
        println!(
            "node {}: link {}/24, pods {}",
            node.name, node.link_ip, node.pod_cidr
        );
    }
    println!("namespace shop:   mesh-agent.dev/mode=ambient (enrolled)");
    println!("namespace legacy: no label (not enrolled)");
    for pod in cluster.pods() {
        let enrolled = if pod.namespace == "shop" {
            "enrolled"
        } else {
            "not enrolled"
        };
        println!(
            "pod {:<15} {:<13} on {} via {} ({enrolled})",
            pod.id(),
            pod.ip,
            cluster.node(pod.node).name,
            pod.host_veth
        );
    }
    println!("state dir: {}", cluster.state_dir().display());

    header("agents");
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let agent = cluster
            .start_agent(node.index)
            .await
            .with_context(|| format!("starting the agent on {}", node.name))?;
        println!(
            "{}: mesh-agent pid {} ready (log {})",
            node.name,
            agent.pid(),
            agent.log_path().display()
        );
        agents.push(agent);
    }

    header("flows");
    let mut servers = Vec::new();
    for pod in cluster.pods() {
        servers.push(pod.echo_server(ECHO_PORT).await?);
        servers.push(pod.peer_server(PEER_PORT).await?);
    }
    let flows = [
        (("shop", "web-1"), ("shop", "web-2")),
        (("legacy", "batch-1"), ("legacy", "batch-2")),
        (("legacy", "batch-1"), ("shop", "web-2")),
        (("shop", "web-1"), ("legacy", "batch-2")),
    ];
    let mut all_ok = true;
    for ((from_ns, from), (to_ns, to)) in flows {
        let (from, to) = (cluster.pod(from_ns, from), cluster.pod(to_ns, to));
        all_ok &= flow(from, to).await;
    }

    for node in cluster.nodes() {
        header(&format!("node {}", node.name));
        for args in [
            &["status"][..],
            &["workloads"],
            &["connections"],
            &["certs"],
            &["policies"],
            &["bpf"],
        ] {
            println!("---- mesh-agent {} ----", args.join(" "));
            match cluster.cli(node.index, args) {
                Ok(out) => print!("{}", ensure_newline(out)),
                Err(e) => println!("(failed: {e:#})"),
            }
        }
    }

    header("explain: why a connection is allowed or denied");
    let web2 = cluster.pod("shop", "web-2");
    let target = web2.addr(ECHO_PORT).to_string();
    for from in ["shop/web-1", "legacy/batch-1"] {
        let args = ["explain", "--from", from, "--to", &target];
        println!("---- mesh-agent {} ----", args.join(" "));
        match cluster.cli(web2.node, &args) {
            Ok(out) => print!("{}", ensure_newline(out)),
            Err(e) => println!("(failed: {e:#})"),
        }
    }

    header("teardown");
    drop(servers);
    for agent in &mut agents {
        stop(agent).await;
    }
    // A stopped agent leaves capture pinned and failing closed for the next one; uninstall is
    // what takes it away.
    for node in 0..cluster.nodes().len() {
        println!("---- mesh-agent uninstall (node {node}) ----");
        match cluster.cli(node, &["uninstall"]) {
            Ok(out) => print!("{}", ensure_newline(out)),
            Err(e) => println!("(failed: {e:#})"),
        }
    }
    let names = cluster.netns_names();
    drop(agents);
    drop(cluster);
    let left: Vec<&String> = names
        .iter()
        .filter(|n| Path::new(mesh_tests::netns::NETNS_DIR).join(n).exists())
        .collect();
    if left.is_empty() {
        println!("cleanup done: {} network namespaces removed", names.len());
    } else {
        println!("cleanup incomplete: still present: {left:?}");
    }
    Ok(all_ok)
}

async fn flow(from: &Pod, to: &Pod) -> bool {
    let placement = if from.node == to.node {
        "same node"
    } else {
        "cross-node"
    };
    let label = format!("{} -> {} ({placement})", from.id(), to.id());
    match from.send_and_verify(to.addr(ECHO_PORT), FLOW_BYTES).await {
        Ok(report) => {
            let seen = match from.ask_peer(to.addr(PEER_PORT)).await {
                Ok(p) => format!("server saw {}", p.seen_by_server.ip()),
                Err(e) => format!("peer check failed: {e:#}"),
            };
            println!(
                "{label:<50} ok: {} bytes echoed intact in {:.1} ms, {seen}",
                report.bytes_received,
                report.elapsed.as_secs_f64() * 1e3
            );
            true
        }
        Err(e) => {
            println!("{label:<50} FAILED: {e:#}");
            false
        }
    }
}

async fn stop(agent: &mut Agent) {
    match agent.terminate().await {
        Ok(status) => println!("{}: agent stopped on SIGTERM ({status})", agent.node_name()),
        Err(e) => println!("{}: agent did not stop cleanly: {e:#}", agent.node_name()),
    }
}

fn ensure_newline(mut s: String) -> String {
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}
