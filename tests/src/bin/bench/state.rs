//! The state at scale (issue #10): the real agent binary reads a generated cluster of 10,000
//! pods, 5,000 Services (with EndpointSlices) and 1,000 AuthorizationPolicies from the test API
//! server, through its real kube-rs client, on node 0 of a simulated cluster. Measured there,
//! and on the cluster's own four pods for comparison: resident memory after the initial list,
//! start to ready, one rebuild, and a namespace label to the pod's capture.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{
    Agent, AgentOptions, Cluster, ClusterSpec, MODE_AMBIENT, MODE_LABEL,
    apiserver::{ApiServer, ApiServerConfig},
    state_gen::{self, StateSpec},
};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::median;

/// The API server's port on node 0's link address.
const API_PORT: u16 = 6443;
/// Rebuilds and label-to-capture rounds measured per state.
const ROUNDS: usize = 5;
/// The ceilings.
const MEMORY_TARGET_MIB: f64 = 64.0;
const CAPTURE_TARGET: Duration = Duration::from_secs(1);
/// Bounds on the waits: generous for a loaded 2-core machine, and free when things work.
const READY_WITHIN: Duration = Duration::from_secs(180);
const CHANGE_WITHIN: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// What one state gave.
#[derive(Default)]
struct Figures {
    rss_kib: Option<u64>,
    peak_kib: Option<u64>,
    /// After the rebuilds and captures: what the agent settles at.
    rss_after_kib: Option<u64>,
    ready: Option<Duration>,
    /// The agent's own figure (its log's `since_start`), without process start and probes.
    listed: Option<String>,
    rebuilds: Vec<Duration>,
    captures: Vec<Duration>,
    releases: Vec<Duration>,
}

pub async fn run() -> Result<bool> {
    println!();
    println!("state at scale (issue #10): the agent on node 0 reading the test API server");
    let cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
    // The API server runs on a runtime of its own: the bench's thread blocks in CLI calls,
    // and serving the initial list must not wait for them.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the API server's runtime")?;
    let node = cluster.node(0);
    let addr = SocketAddr::from((node.link_ip, API_PORT));
    let listener = node
        .netns()
        .run(move || std::net::TcpListener::bind(addr))?
        .with_context(|| format!("binding {addr} in {}", node.name))?;
    let config = ApiServerConfig {
        // The generated objects are applied before any agent lists; keeping a change
        // history of all of them would only cost the bench's memory.
        history_window: 1_000,
        ..ApiServerConfig::default()
    };
    let api = {
        let _on = runtime.enter();
        ApiServer::start_std(listener, config)?
    };
    for object in cluster_objects(&cluster) {
        api.apply(object)?;
    }

    println!("  small state: the cluster's own 2 namespaces and 4 pods");
    let small = measure(&cluster, &api, 4).await?;

    let scale = scale_factor()?;
    let own: Vec<String> = if local_pods()? {
        cluster.nodes().iter().map(|n| n.name.clone()).collect()
    } else {
        Vec::new()
    };
    let spec = StateSpec::at_scale(&own)
        .scaled(scale)
        .reserving(cluster.octet());
    let generated = state_gen::generate(&spec);
    let local = generated
        .pods
        .iter()
        .filter(|p| p["spec"]["nodeName"] == node.name.as_str())
        .count();
    println!(
        "  at scale: {} namespaces ({} enrolled), {} pods on {} nodes ({local} on {}), \
         {} Services with as many EndpointSlices, {} AuthorizationPolicies, {} \
         PeerAuthentications; {:.1} MB of JSON",
        generated.namespaces.len(),
        generated
            .namespaces
            .iter()
            .filter(|ns| ns["metadata"]["labels"][MODE_LABEL] == MODE_AMBIENT)
            .count(),
        generated.pods.len(),
        spec.nodes.len(),
        node.name,
        generated.services.len(),
        generated.authorization_policies.len(),
        generated.peer_authentications.len(),
        generated.json_bytes() as f64 / 1e6,
    );
    let workloads = generated.pods.len() + 4;
    for object in generated.objects() {
        api.apply(object.clone())?;
    }
    drop(generated);
    let large = measure(&cluster, &api, workloads).await?;

    print_table(&small, &large);
    drop(api);
    // Its tasks are aborted with the server; nothing is left to wait for.
    runtime.shutdown_background();
    Ok(large.rss_kib.is_some() && !large.rebuilds.is_empty() && !large.captures.is_empty())
}

/// `MESH_BENCH_STATE_SCALE`: the generated state's size against the (default 1).
fn scale_factor() -> Result<f64> {
    match std::env::var("MESH_BENCH_STATE_SCALE") {
        Ok(v) => match v.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 2.0 => Ok(f),
            _ => bail!("MESH_BENCH_STATE_SCALE must be a number in (0, 2], not {v:?}"),
        },
        Err(_) => Ok(1.0),
    }
}

/// `MESH_BENCH_STATE_LOCAL=0`: no generated pod on the simulated nodes (to see what the
/// agent's local pods without a veth, reported pending, cost).
fn local_pods() -> Result<bool> {
    match std::env::var("MESH_BENCH_STATE_LOCAL").as_deref() {
        Err(_) | Ok("1") => Ok(true),
        Ok("0") => Ok(false),
        Ok(v) => bail!("MESH_BENCH_STATE_LOCAL must be 0 or 1, not {v:?}"),
    }
}

/// The simulated cluster's namespaces and pods as the API server would hold them.
fn cluster_objects(cluster: &Cluster) -> Vec<Value> {
    let mut objects = vec![namespace("shop", true), namespace("legacy", false)];
    for pod in cluster.pods() {
        let node = cluster.node(pod.node);
        let app = pod.name.split('-').next().unwrap_or_default();
        objects.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
                         "labels": {"app": app}},
            "spec": {"nodeName": node.name, "serviceAccountName": pod.service_account,
                     "containers": [{"name": "app", "image": "registry.invalid/app:latest"}]},
            "status": {"phase": "Running", "hostIP": node.link_ip.to_string(),
                       "podIP": pod.ip.to_string(), "podIPs": [{"ip": pod.ip.to_string()}]}
        }));
    }
    objects
}

fn namespace(name: &str, enrolled: bool) -> Value {
    let mut labels = json!({"kubernetes.io/metadata.name": name});
    if enrolled {
        labels[MODE_LABEL] = json!(MODE_AMBIENT);
    }
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels}, "status": {"phase": "Active"}})
}

/// Starts the agent on node 0 against what the API server holds now and measures it.
async fn measure(cluster: &Cluster, api: &ApiServer, workloads: usize) -> Result<Figures> {
    let mut figures = Figures::default();
    let options = AgentOptions::default()
        .kubeconfig(api.kubeconfig_path())
        .no_wait();
    let start = Instant::now();
    let mut agent = cluster.start_agent_with(0, options).await?;
    wait_ready(cluster, &mut agent).await?;
    figures.ready = Some(start.elapsed());
    figures.listed = agent
        .log()
        .lines()
        .find(|l| l.contains("state listed from the Kubernetes API"))
        .and_then(|l| l.split("since_start=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned);
    (figures.rss_kib, figures.peak_kib) = (agent.rss_kib(), agent.peak_rss_kib());
    println!(
        "    ready in {:.0} ms (agent: listed and built {}); RSS {}, peak {}",
        ms(start.elapsed()),
        figures.listed.as_deref().unwrap_or("?"),
        mib(figures.rss_kib),
        mib(figures.peak_kib)
    );
    check_state(cluster, workloads).await?;

    for round in 1..=ROUNDS {
        match rebuild(cluster, api, round).await {
            Ok(took) => figures.rebuilds.push(took),
            Err(e) => println!("    rebuild {round}: FAILED: {e:#}"),
        }
    }
    for round in 1..=ROUNDS {
        match label_to_capture(cluster, api).await {
            Ok((captured, released)) => {
                figures.captures.push(captured);
                figures.releases.push(released);
            }
            Err(e) => println!("    label to capture {round}: FAILED: {e:#}"),
        }
    }
    figures.rss_after_kib = agent.rss_kib();
    figures.peak_kib = agent.peak_rss_kib().or(figures.peak_kib);
    let show = |d: &[Duration]| {
        d.iter()
            .map(|d| format!("{:.0}", ms(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("    rebuilds, ms: {}", show(&figures.rebuilds));
    println!(
        "    namespace label to capture, ms: {}",
        show(&figures.captures)
    );
    println!(
        "    label removed to release, ms: {}",
        show(&figures.releases)
    );
    println!(
        "    RSS after the rounds {}, peak {}",
        mib(figures.rss_after_kib),
        mib(figures.peak_kib)
    );
    if let Err(e) = agent.terminate().await {
        eprintln!("bench: {e:#}");
    }
    Ok(figures)
}

/// Polls readiness every [`POLL`] (the harness's own wait polls every 100 ms).
async fn wait_ready(cluster: &Cluster, agent: &mut Agent) -> Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = agent.try_exit()? {
            bail!(
                "the agent exited ({status}) before it was ready; log:\n{}",
                agent.log_tail(50)
            );
        }
        if matches!(cluster.readiness(0).await, Ok(r) if r.status == 200) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the agent was not ready within {READY_WITHIN:?}; log:\n{}",
                agent.log_tail(50)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn status(cluster: &Cluster) -> Result<Value> {
    let response = cluster.admin_get(0, "/status").await?;
    ensure!(
        response.status == 200,
        "GET /status: HTTP {}",
        response.status
    );
    serde_json::from_str(&response.body).context("GET /status is not JSON")
}

/// Every object accepted: every watch synced, no state error, every pod a workload.
async fn check_state(cluster: &Cluster, workloads: usize) -> Result<()> {
    let status = status(cluster).await?;
    ensure!(
        mesh_tests::watches_synced(&status),
        "not every watch synced: {:#}",
        status["state"]["watches"]
    );
    let error = &status["state"]["status"]["last_error"];
    ensure!(error.is_null(), "the agent rejected objects: {error}");
    let view = cluster.cli_json(0, &["workloads", "-o", "json"])?;
    let seen = view.as_array().map_or(0, Vec::len);
    ensure!(
        seen == workloads,
        "{seen} workloads, {workloads} pods served"
    );
    let objects: Vec<String> = status["state"]["watches"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| format!("{} {}", w["objects"], w["kind"].as_str().unwrap_or("?")))
        .collect();
    println!(
        "    held: {}; {seen} workloads, no object rejected",
        objects.join(", ")
    );
    Ok(())
}

/// Changes one label of a pod on the other node and waits for the next state generation.
async fn rebuild(cluster: &Cluster, api: &ApiServer, round: usize) -> Result<Duration> {
    let before = generation(cluster).await?;
    let mut pod = cluster_objects(cluster)
        .into_iter()
        .find(|o| o["kind"] == "Pod" && o["metadata"]["name"] == "batch-2")
        .context("no batch-2 pod")?;
    pod["metadata"]["labels"]["rollout"] = json!(round.to_string());
    let start = Instant::now();
    api.apply(pod)?;
    poll(CHANGE_WITHIN, "the next state generation", async || {
        Ok(generation(cluster).await? > before)
    })
    .await?;
    Ok(start.elapsed())
}

async fn generation(cluster: &Cluster) -> Result<u64> {
    status(cluster).await?["state"]["status"]["generation"]
        .as_u64()
        .context("no state generation in status")
}

/// Labels `legacy` through the API and times until `legacy/batch-1` (node 0) has the
/// capture programs on its veth; then removes the label and times until they are gone.
/// The kernel is asked directly (cheap enough to poll every 10 ms, where the workloads
/// view of 10,000 pods is not); the agent's view is checked to agree once each way.
async fn label_to_capture(cluster: &Cluster, api: &ApiServer) -> Result<(Duration, Duration)> {
    let veth = cluster.pod("legacy", "batch-1").host_veth.clone();
    let node = cluster.node(0).netns();
    let attached = || -> Result<bool> { Ok(!node.tcx_programs(&veth)?.is_empty()) };
    ensure!(
        !attached()?,
        "batch-1 captured before its namespace is labelled"
    );
    let start = Instant::now();
    api.apply(namespace("legacy", true))?;
    poll(CHANGE_WITHIN, "batch-1 captured", async || attached()).await?;
    let captured = start.elapsed();
    ensure!(
        capture_device(cluster)?.as_deref() == Some(veth.as_str()),
        "the kernel has batch-1's capture, the agent's view does not"
    );
    let start = Instant::now();
    api.apply(namespace("legacy", false))?;
    poll(CHANGE_WITHIN, "batch-1 released", async || Ok(!attached()?)).await?;
    let released = start.elapsed();
    poll(
        CHANGE_WITHIN,
        "batch-1 released in the agent's view",
        async || Ok(capture_device(cluster)?.is_none()),
    )
    .await?;
    Ok((captured, released))
}

fn capture_device(cluster: &Cluster) -> Result<Option<String>> {
    let workloads = cluster.cli_json(0, &["workloads", "-o", "json"])?;
    let w = workloads
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["namespace"] == "legacy" && w["name"] == "batch-1")
        .context("legacy/batch-1 not in workloads")?;
    Ok(w["capture_device"].as_str().map(str::to_owned))
}

async fn poll(
    within: Duration,
    what: &str,
    mut done: impl AsyncFnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if done().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn print_table(small: &Figures, large: &Figures) {
    let mib = |kib: Option<u64>| kib.map(|k| k as f64 / 1024.0);
    let med = |d: &[Duration]| median(d.iter().map(|d| ms(*d)).collect());
    let max = |d: &[Duration]| d.iter().max().map(|d| ms(*d));
    let rows: [(&str, Option<f64>, Option<f64>, String); 8] = [
        (
            "RSS after the initial list, MiB",
            mib(small.rss_kib),
            mib(large.rss_kib),
            format!("< {MEMORY_TARGET_MIB:.0}"),
        ),
        (
            "RSS after the rounds, MiB",
            mib(small.rss_after_kib),
            mib(large.rss_after_kib),
            format!("< {MEMORY_TARGET_MIB:.0}"),
        ),
        (
            "peak RSS (VmHWM), MiB",
            mib(small.peak_kib),
            mib(large.peak_kib),
            "-".into(),
        ),
        (
            "start to ready, ms",
            small.ready.map(ms),
            large.ready.map(ms),
            "-".into(),
        ),
        (
            "rebuild, ms (median)",
            med(&small.rebuilds),
            med(&large.rebuilds),
            "-".into(),
        ),
        (
            "label to capture, ms (median)",
            med(&small.captures),
            med(&large.captures),
            format!("< {:.0}", ms(CAPTURE_TARGET)),
        ),
        (
            "label to capture, ms (max)",
            max(&small.captures),
            max(&large.captures),
            format!("< {:.0}", ms(CAPTURE_TARGET)),
        ),
        (
            "label removed to release, ms (median)",
            med(&small.releases),
            med(&large.releases),
            "-".into(),
        ),
    ];
    println!();
    println!("state at scale, {ROUNDS} rounds each:");
    println!(
        "{:<38} {:>12} {:>12} {:>9}",
        "", "4 pods", "at scale", "target"
    );
    let show = |v: Option<f64>| v.map_or("failed".to_owned(), |v| format!("{v:.1}"));
    for (name, small, large, target) in rows {
        println!(
            "{name:<38} {:>12} {:>12} {target:>9}",
            show(small),
            show(large)
        );
    }
}
