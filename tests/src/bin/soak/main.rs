//! `cargo xtask soak`: many long-lived tunnelled connections for a long time. On a two-node
//! cluster with an agent per node, [`DEFAULT_CONNECTIONS`] connections from `shop/web-1`
//! (node 0) to an echo server in `shop/web-2` (node 1) — every one an HBONE stream across the
//! nodes — each send a chunk of their own byte stream every second for [`DEFAULT_SECS`] and
//! check every echoed byte, then close cleanly. Passes when no byte was lost or altered, no
//! connection failed, and neither agent's resident memory grew after the warm-up (see
//! [`samples::rule`]). `MESH_SOAK_SECS` and `MESH_SOAK_CONNECTIONS` set a shorter trial.

mod flows;
mod report;
mod samples;
mod server;

use std::{
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use mesh_tests::{Agent, Cluster, ClusterSpec, MODE_AMBIENT, MODE_LABEL, PodSpec, is_root};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinSet,
    time::Instant,
};

use flows::Tally;
use report::Report;
use samples::{AgentSample, Sample};
use server::EchoProcess;

const DEFAULT_SECS: u64 = 600;
const DEFAULT_CONNECTIONS: usize = 10_000;
const ECHO_PORT: u16 = 9100;
/// The open-files limit asked for this process and both agents, soft and hard: the agents
/// derive their connection budgets from it (20,000 would give one under 10,000).
const OPEN_FILES: u64 = 200_000;
/// Where the hard limit cannot be raised (no `CAP_SYS_RESOURCE`, as in some containers), the
/// agents keep the limit there is and are given budgets this much above the soak's connections
/// instead: a tunnelled connection costs each agent one descriptor, not the two the defaults
/// reckon with, so 10,000 of them fit in 20,000 descriptors.
const BUDGET_MARGIN: usize = 1000;
/// Time allowed beyond the run itself (building the cluster, opening, closing, the checks):
/// past it the soak gives up, and the cluster is torn down all the same.
const SPARE: Duration = Duration::from_secs(300);
/// How long the agents may take to forget the closed connections.
const SETTLE: Duration = Duration::from_secs(20);
/// How long connection tasks may run past the end: the last period, the close, and a stall.
const WIND_DOWN: Duration = Duration::from_secs(45);

/// What to run: the defaults, or a shorter trial from the environment.
#[derive(Clone, Copy, Debug)]
struct Settings {
    duration: Duration,
    connections: usize,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let secs = env_number("MESH_SOAK_SECS", DEFAULT_SECS)?;
        let connections = env_number("MESH_SOAK_CONNECTIONS", DEFAULT_CONNECTIONS as u64)?;
        ensure!(
            secs >= 60,
            "MESH_SOAK_SECS={secs}: the memory verdict needs a run of at least 60 s"
        );
        ensure!(connections > 0, "MESH_SOAK_CONNECTIONS must be positive");
        ensure!(
            connections <= 25_000,
            "MESH_SOAK_CONNECTIONS={connections}: one client address has about 28,000 ephemeral ports"
        );
        Ok(Self {
            duration: Duration::from_secs(secs),
            connections: connections as usize,
        })
    }
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name} must be a number, not {v:?}")),
        Err(_) => Ok(default),
    }
}

// One thread for 2 × 10,000 sockets at about one chunk a second each: a sliver of a core, and
// the rest of the machine stays with the agents.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        let _ = raise_open_files();
        return server::serve(args.get(2).map_or("", String::as_str)).await;
    }
    if !is_root() {
        eprintln!("soak: needs root (network namespaces, eBPF); run it as root or with sudo");
        return ExitCode::FAILURE;
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soak: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let open_files = match raise_open_files() {
        Ok(limit) => limit,
        Err(e) => {
            eprintln!("soak: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Dropping `run` on a signal or at the deadline drops its Cluster, which kills the agents
    // and removes the namespaces and the pinned data plane.
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(settings.duration + SPARE, run(settings, open_files)) => outcome,
        name = interrupted() => {
            eprintln!("soak: {name}: stopped, the cluster is torn down");
            return ExitCode::from(130);
        }
    };
    match outcome {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::FAILURE,
        Ok(Err(e)) => {
            eprintln!("soak: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "soak: FAIL: did not finish within {:?}",
                settings.duration + SPARE
            );
            ExitCode::FAILURE
        }
    }
}

/// The first SIGINT or SIGTERM, by name.
async fn interrupted() -> &'static str {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("soak: cannot watch for signals; Ctrl-C will leave the cluster behind");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Sets this process's open-files limit to [`OPEN_FILES`], soft and hard; where the hard limit
/// cannot be raised (EPERM), the soft one goes up to the hard one. Returns the limit in force.
fn raise_open_files() -> Result<u64> {
    let set = |value: u64| {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit only reads the struct, which outlives the call.
        match unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    match set(OPEN_FILES) {
        Ok(()) => return Ok(OPEN_FILES),
        Err(e) if e.raw_os_error() != Some(libc::EPERM) => {
            return Err(e).with_context(|| format!("setting the open-files limit to {OPEN_FILES}"));
        }
        Err(_) => {}
    }
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed; it outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the open-files limit");
    }
    set(now.rlim_max).context("raising the soft open-files limit to the hard one")?;
    Ok(now.rlim_max)
}

/// How the agents are started: under `prlimit` with `open_files`, and, when that is below
/// [`OPEN_FILES`], with connection budgets sized for the soak (see [`BUDGET_MARGIN`]).
fn agent_options(
    cluster: &Cluster,
    open_files: u64,
    connections: usize,
) -> Result<mesh_tests::AgentOptions> {
    let options = cluster.wrapped_agent(
        "agent-with-many-files",
        &format!("prlimit --nofile={open_files}:{open_files}"),
    )?;
    if open_files >= OPEN_FILES {
        return Ok(options);
    }
    let budget = connections + BUDGET_MARGIN;
    println!(
        "soak: the hard open-files limit is {open_files} and cannot be raised to {OPEN_FILES} here (no CAP_SYS_RESOURCE): agents run with {open_files} and --max-connections{{,-per-source,-per-destination}}={budget}"
    );
    Ok(options
        .arg(format!("--max-connections={budget}"))
        .arg(format!("--max-connections-per-source={budget}"))
        .arg(format!("--max-connections-per-destination={budget}")))
}

async fn run(settings: Settings, open_files: u64) -> Result<bool> {
    let started = std::time::Instant::now();
    let n = settings.connections;
    println!(
        "soak: {n} connections web-1 (node 0) -> web-2 (node 1) through the tunnel for {} s, a chunk of {}-{} bytes per connection every {:?}",
        settings.duration.as_secs(),
        flows::CHUNK_MIN,
        flows::CHUNK_MAX,
        flows::PERIOD
    );
    let cluster = Cluster::new(
        ClusterSpec::new()
            .namespace("shop", &[(MODE_LABEL, MODE_AMBIENT)])
            .pod(PodSpec::new("shop", "web-1", 0).service_account("web"))
            .pod(PodSpec::new("shop", "web-2", 1).service_account("web")),
    )?;
    let options = agent_options(&cluster, open_files, n)?;
    let mut agents = [
        cluster.start_agent_with(0, options.clone()).await?,
        cluster.start_agent_with(1, options).await?,
    ];
    for agent in &agents {
        check_agent(&cluster, agent, open_files, n)?;
    }

    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let mut server = EchoProcess::start(web2, ECHO_PORT).await?;
    web1.send_and_verify(web2.addr(ECHO_PORT), 1024)
        .await
        .context("one echo through the mesh before the soak")?;
    let (probe, _) = server.report().await?;
    // Counted from here: the probe's record closed, the soak's not yet opened.
    let before = [
        settled_status(&cluster, 0).await?,
        settled_status(&cluster, 1).await?,
    ];
    let idle = agent_samples(&agents);

    let tally = Arc::new(Tally::default());
    let opening = Instant::now();
    let streams = flows::open_all(web1, web2.addr(ECHO_PORT), n, &tally).await;
    println!(
        "opened {} of {n} connections in {:.1} s ({} failed); agents' RSS idle {} / {} MiB",
        streams.len(),
        opening.elapsed().as_secs_f64(),
        tally.connect_failed.load(Ordering::SeqCst),
        mib(idle[0].rss_kib),
        mib(idle[1].rss_kib),
    );
    wait_accepted(&mut server, probe.accepted + streams.len()).await?;

    let start = Instant::now() + Duration::from_millis(100);
    let end = start + settings.duration;
    let mut holders = JoinSet::new();
    for (id, stream) in streams {
        holders.spawn(flows::hold(id, stream, start, end, tally.clone()));
    }
    let table = watch(&mut agents, &tally, start, end).await?;
    wind_down(&mut holders).await;

    // Best effort from here: an agent that died still gets its report, as a failed check.
    let after = [
        final_status(&cluster, 0).await,
        final_status(&cluster, 1).await,
    ];
    let (carried, server_errors) = server.report().await?;
    let routes = recent_routes(&cluster, web2.addr(ECHO_PORT))
        .await
        .unwrap_or_else(|e| {
            println!("cannot read node 0's connections: {e:#}");
            Default::default()
        });
    let end_of_run = Report {
        settings,
        tally: &tally,
        server: carried.since(probe),
        server_errors,
        routes,
        agents_running: agents.iter_mut().map(Agent::is_running).collect(),
        before: &before,
        after: &after,
        table: &table,
    };
    let pass = end_of_run.print();
    println!("soak took {:.0} s", started.elapsed().as_secs_f64());
    Ok(pass)
}

/// Before any traffic: the pid is the agent itself (prlimit execs it), and its status shows
/// the raised open-files limit and budgets room for every connection of the soak.
fn check_agent(
    cluster: &Cluster,
    agent: &Agent,
    open_files: u64,
    connections: usize,
) -> Result<()> {
    let node = agent.node_index();
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", agent.pid())).unwrap_or_default();
    ensure!(
        comm.trim() == "mesh-agent",
        "node {node}: pid {} is {:?}, not the agent: its memory would not be the agent's",
        agent.pid(),
        comm.trim()
    );
    let status = cluster.cli_json(node, &["status", "-o", "json"])?;
    let files = &status["limits"]["open_files"];
    ensure!(
        files["current"] == open_files && files["hard"] == open_files,
        "node {node}: status shows open files {files}, expected {open_files} soft and hard"
    );
    let budget = &status["limits"]["proxy"]["settings"];
    for bound in [
        "connections",
        "connections_per_source",
        "connections_per_destination",
    ] {
        let allowed = budget[bound].as_u64().unwrap_or(0);
        ensure!(
            allowed >= connections as u64,
            "node {node}: the proxy allows {allowed} {bound}, fewer than the soak's {connections}"
        );
    }
    println!(
        "node {node}: agent pid {}, open files {} (soft and hard), budget {} connections, {} per source, {} per destination",
        agent.pid(),
        files["current"],
        budget["connections"],
        budget["connections_per_source"],
        budget["connections_per_destination"]
    );
    Ok(())
}

/// The agent's `/status` view.
async fn status(cluster: &Cluster, node: usize) -> Result<serde_json::Value> {
    cluster
        .admin_get(node, "/status")
        .await?
        .json()
        .with_context(|| format!("node {node}'s status"))
}

/// The status once the agent holds no connection, or after [`SETTLE`] as it is then.
async fn settled_status(cluster: &Cluster, node: usize) -> Result<serde_json::Value> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = status(cluster, node).await?;
        if now["connections"]["open"] == 0 || Instant::now() >= deadline {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// [`settled_status`] at the end of the run; `null` (printed) when the agent cannot answer.
async fn final_status(cluster: &Cluster, node: usize) -> serde_json::Value {
    settled_status(cluster, node).await.unwrap_or_else(|e| {
        println!("no status from node {node}'s agent: {e:#}");
        serde_json::Value::Null
    })
}

/// How node 0's agent routed the connections to `server` among its most recent closed ones
/// (the admin view keeps the last 512): each route and how many took it.
async fn recent_routes(
    cluster: &Cluster,
    server: std::net::SocketAddr,
) -> Result<std::collections::BTreeMap<String, usize>> {
    let view = cluster.admin_get(0, "/connections").await?.json()?;
    let mut routes = std::collections::BTreeMap::new();
    for record in view["recent"].as_array().into_iter().flatten() {
        if record["original_destination"] == server.to_string() {
            let route = record["route"].as_str().unwrap_or("?").to_owned();
            *routes.entry(route).or_default() += 1;
        }
    }
    Ok(routes)
}

/// Waits until the server has accepted every connection opened, before any data: each has
/// reached the other node. A shortfall after 30 s is printed and left to the final checks.
async fn wait_accepted(server: &mut EchoProcess, expected: usize) -> Result<()> {
    let since = Instant::now();
    let deadline = since + Duration::from_secs(30);
    loop {
        let accepted = server.report().await?.0.accepted;
        if accepted >= expected {
            println!(
                "the server accepted every connection {:.1} s after they were opened",
                since.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            println!(
                "the server accepted {accepted} of {expected} connections (the probe's included) within 30 s"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn agent_samples(agents: &[Agent; 2]) -> [AgentSample; 2] {
    [AgentSample::of(&agents[0]), AgentSample::of(&agents[1])]
}

/// Samples and prints every [`samples::EVERY`] from `start` to `end`; stops early if an agent
/// exits or every connection has ended.
async fn watch(
    agents: &mut [Agent; 2],
    tally: &Tally,
    start: Instant,
    end: Instant,
) -> Result<Vec<Sample>> {
    let mut table: Vec<Sample> = Vec::new();
    let mut ticks = tokio::time::interval_at(start, samples::EVERY);
    samples::print_header();
    loop {
        let at = ticks.tick().await.min(end);
        let sample = Sample {
            elapsed: at - start,
            agents: agent_samples(agents),
            open: tally.open.load(Ordering::SeqCst),
            echoed: tally.echoed.load(Ordering::SeqCst),
            failures: tally.failures(),
        };
        samples::print_row(&sample, table.last());
        table.push(sample);
        if let Some(agent) = agents
            .iter_mut()
            .find_map(|a| (!a.is_running()).then_some(a))
        {
            println!(
                "the agent on node {} exited; log tail:\n{}",
                agent.node_index(),
                agent.log_tail(10)
            );
            break;
        }
        if at >= end || (at > start && tally.open.load(Ordering::SeqCst) == 0) {
            break;
        }
        if end - at < samples::EVERY {
            // The last row at the end itself, so the final window covers the run's close.
            tokio::time::sleep_until(end).await;
            ticks.reset_immediately();
        }
    }
    Ok(table)
}

/// Waits for every connection task to finish its close, up to [`WIND_DOWN`]; the rest are
/// aborted (and show in the tally as neither failed nor closed clean).
async fn wind_down(holders: &mut JoinSet<()>) {
    let all = async { while holders.join_next().await.is_some() {} };
    if tokio::time::timeout(WIND_DOWN, all).await.is_err() {
        println!(
            "{} connections still running {WIND_DOWN:?} after the end: aborted",
            holders.len()
        );
        holders.abort_all();
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}
