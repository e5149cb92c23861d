//! The `mesh-agent` binary: runs the node agent, or inspects/cleans the one on this node.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use mesh_agent::{
    app,
    cli::{self, HttpQuestion, Output, View},
    config::Config,
    identity::IdentityConfig,
    lifecycle::uninstall,
    proxy::{
        MeshConfig, hbone::pool::PoolSettings, keepalive::KeepaliveSettings, limits::LimitOverrides,
    },
    source::{
        StateSource,
        kube::{Connection, daemonset::DaemonSetRef},
    },
    waypoint::{self, app::WaypointConfig},
};

/// jemalloc, as ztunnel: a node agent holds the whole cluster's state between bursts of
/// short-lived allocations (API pages, connections), which glibc's malloc fragments.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`malloc_conf`, under the prefix tikv-jemalloc-sys
/// gives its symbols). A background thread purges freed pages on jemalloc's decay schedule
/// (~10 s) even while the process is idle: without it pages are only returned when an arena
/// allocates again, and an agent that served a burst kept 4.6x its idle resident memory
/// (`tests/flood.rs`); with it, it is back under 2x within about 10 s.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 23] = b"background_thread:true\0";

#[derive(Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Sidecarless service mesh node agent"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

// `Run` is much larger than the inspection commands; the value is parsed once and dropped.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the agent for this node.
    Run {
        /// Kubernetes node name this agent serves.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// `NAMESPACE/NAME` of the agent's own DaemonSet. On SIGTERM the agent asks the API server
        /// about it: when it is gone or being deleted, the agent uninstalls the data plane after
        /// its drain; otherwise (a rollout, a restart) it leaves capture in place, failing closed.
        #[arg(long, env = "MESH_AGENT_DAEMONSET")]
        daemonset: Option<DaemonSetRef>,
        #[command(flatten)]
        limits: LimitOverrides,
        #[command(flatten)]
        common: Common,
    },
    /// Run a waypoint: the L7 proxy of the Services (or pods) that use its Gateway, as one of
    /// that Gateway's pods. Its Gateway, identity and address come from its own pod in the state.
    Waypoint {
        /// This pod's namespace.
        #[arg(long, env = "POD_NAMESPACE")]
        pod_namespace: String,
        /// This pod's name.
        #[arg(long, env = "POD_NAME")]
        pod_name: String,
        /// Where HBONE is accepted.
        #[arg(long, default_value = "0.0.0.0:15008")]
        tunnel_addr: SocketAddr,
        /// One line per request on standard output, in Istio's default access-log format
        /// (`--access-log false` turns it off).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        access_log: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Agent summary: readiness, state source, capture, connections.
    Status(Inspect),
    /// Workloads known to the agent, with enrollment and capture.
    Workloads(Inspect),
    /// Open and recently closed proxied connections.
    Connections(Inspect),
    /// Workload certificates held by this node: identity, serial, validity, chain.
    Certs(Inspect),
    /// Authorization and PeerAuthentication policies of each enrolled workload of this node.
    Policies(Inspect),
    /// What would happen to a connection, and which policy (and rule) decides it.
    Explain {
        /// Source pod (`namespace/name`) or IP address.
        #[arg(long)]
        from: String,
        /// Destination `ip:port` (a pod or a Service address).
        #[arg(long)]
        to: String,
        /// Explain an HTTP request too, at the waypoint in front of the destination: its
        /// method (GET when only other request flags are given).
        #[arg(long)]
        method: Option<String>,
        /// The request's path and query.
        #[arg(long)]
        path: Option<String>,
        /// A request header, `name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// A JWT the request carries as `authorization: Bearer`.
        #[arg(long)]
        token: Option<String>,
        #[command(flatten)]
        inspect: Inspect,
    },
    /// eBPF programs, attachments, map contents and counters.
    Bpf(Inspect),
    /// Print CustomResourceDefinitions of the Istio kinds the agent reads (AuthorizationPolicy,
    /// PeerAuthentication), for clusters without Istio: `mesh-agent crds | kubectl apply -f -`.
    Crds,
    /// Take this node's data plane away (pinned programs, links and maps, policy route,
    /// sysctl, the proxy's leftover sockets), so its pods talk directly again. Refused while an
    /// agent serves the node. A stopped or crashed agent leaves capture in place (enrolled pods'
    /// new connections are dropped until an agent is back): this is the only way to remove it.
    #[command(alias = "cleanup")]
    Uninstall {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// What the agent and the waypoint are both given: the state source, identities, the admin
/// listeners, tunnels and keepalive.
#[derive(clap::Args)]
struct Common {
    /// Directory or file of Kubernetes YAML (Namespace, Pod, Service, …): run without a
    /// cluster. Without it the agent reads the Kubernetes API: with `--kubeconfig`, or with
    /// the pod's service account when it runs in a pod (`KUBERNETES_SERVICE_HOST`).
    #[arg(long, conflicts_with = "kubeconfig")]
    state: Option<PathBuf>,
    /// Read the cluster from the Kubernetes API with this kubeconfig (its current context).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// CA directory: Istio plug-in CA files (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem), or where a generated root is kept for every agent to share.
    #[arg(long, default_value = "/var/lib/mesh-agent/ca")]
    ca_dir: PathBuf,
    /// Lifetime of workload certificates, in seconds; they are renewed at about half of it.
    #[arg(long, default_value_t = 86400.0)]
    cert_ttl: f64,
    /// Namespace whose policies apply mesh-wide (Istio's root namespace).
    #[arg(long, default_value = mesh_agent::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Streams one pooled tunnel connection carries before another is opened.
    #[arg(long, default_value_t = 100)]
    pool_max_streams: usize,
    /// Seconds an unused tunnel connection stays open.
    #[arg(long, default_value_t = 60.0)]
    pool_idle_timeout: f64,
    /// Seconds open connections get to finish on SIGTERM.
    #[arg(long, default_value_t = 5.0)]
    drain_timeout: f64,
    /// Data-plane worker threads. One (a single-threaded runtime) is fastest when the node's
    /// cores are busy with the workloads themselves (measured: 1 KiB echo p50 39 µs with 1
    /// thread, 243 µs with 2, on 2 cores shared with the applications).
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Seconds a proxied socket is quiet before TCP keepalive probes start.
    #[arg(long, default_value_t = 60.0)]
    tcp_keepalive_time: f64,
    /// Seconds between TCP keepalive probes.
    #[arg(long, default_value_t = 10.0)]
    tcp_keepalive_interval: f64,
    /// Unanswered TCP keepalive probes before the connection is reset.
    #[arg(long, default_value_t = 6)]
    tcp_keepalive_probes: u32,
    /// Seconds between HTTP/2 PINGs on a tunnel (0: none).
    #[arg(long, default_value_t = 30.0)]
    http2_keepalive_interval: f64,
    /// Seconds a tunnel waits for a PONG before it is closed with its streams.
    #[arg(long, default_value_t = 10.0)]
    http2_keepalive_timeout: f64,
    /// Seconds a connection may carry nothing either way before it is closed (0: never).
    #[arg(long, default_value_t = 3600.0)]
    idle_timeout: f64,
}

#[derive(clap::Args)]
struct Inspect {
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
    /// Admin API address of the agent.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Run {
            node,
            daemonset,
            limits,
            common,
        } => {
            mesh_agent::logging::init(common.log_json);
            let source = match common.source() {
                Some(source) => source,
                None => return no_source(),
            };
            app::run(Config {
                node,
                source,
                admin_addr: common.admin_addr,
                readiness_addr: common.readiness_addr,
                metrics_addr: common.metrics_addr,
                drain_timeout: secs(common.drain_timeout, 5),
                worker_threads: common.worker_threads.max(1),
                identity: common.identity(),
                mesh: common.mesh(),
                pool: common.pool(),
                daemonset,
                limits,
                keepalive: common.keepalive(),
            })
        }
        Command::Waypoint {
            pod_namespace,
            pod_name,
            tunnel_addr,
            access_log,
            common,
        } => {
            mesh_agent::logging::init(common.log_json);
            let source = match common.source() {
                Some(source) => source,
                None => return no_source(),
            };
            waypoint::app::run(WaypointConfig {
                pod_namespace,
                pod_name,
                source,
                tunnel_addr,
                readiness_addr: common.readiness_addr,
                metrics_addr: common.metrics_addr,
                drain_timeout: secs(common.drain_timeout, 5),
                worker_threads: common.worker_threads.max(1),
                identity: common.identity(),
                mesh: common.mesh(),
                pool: common.pool(),
                keepalive: common.keepalive(),
                access_log,
            })
        }
        Command::Status(i) => inspect(View::Status, i),
        Command::Certs(i) => inspect(View::Certs, i),
        Command::Policies(i) => inspect(View::Policies, i),
        Command::Explain {
            from,
            to,
            method,
            path,
            headers,
            token,
            inspect: i,
        } => {
            let http = HttpQuestion {
                method,
                path,
                headers,
                token,
            };
            inspect(View::Explain { from, to, http }, i)
        }
        Command::Workloads(i) => inspect(View::Workloads, i),
        Command::Connections(i) => inspect(View::Connections, i),
        Command::Bpf(i) => inspect(View::Bpf, i),
        Command::Crds => mesh_agent::crds::yaml()
            .map(|text| print!("{text}"))
            .map_err(anyhow::Error::from),
        Command::Uninstall { output } => run_uninstall(output),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Seconds given on the command line; the default for a value no `Duration` can hold.
fn secs(s: f64, default: u64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::from_secs(default))
}

fn no_source() -> ExitCode {
    eprintln!(
        "mesh-agent: no state source: give --state PATH (YAML) or --kubeconfig PATH, or run in a pod"
    );
    ExitCode::from(2)
}

impl Common {
    /// `--state`, else `--kubeconfig`, else the pod's service account; `None` without any.
    fn source(&self) -> Option<StateSource> {
        match (&self.state, &self.kubeconfig, Connection::in_cluster()) {
            (Some(path), _, _) => Some(StateSource::Files(path.clone())),
            (None, Some(path), _) => Some(StateSource::Kubernetes(Connection::Kubeconfig(
                path.clone(),
            ))),
            (None, None, Some(in_cluster)) => Some(StateSource::Kubernetes(in_cluster)),
            (None, None, None) => None,
        }
    }

    fn identity(&self) -> IdentityConfig {
        IdentityConfig {
            trust_domain: self.trust_domain.clone(),
            ca_dir: self.ca_dir.clone(),
            cert_ttl: secs(self.cert_ttl, 86400),
        }
    }

    fn mesh(&self) -> MeshConfig {
        MeshConfig {
            trust_domain: self.trust_domain.clone(),
            root_namespace: self.root_namespace.clone(),
        }
    }

    fn pool(&self) -> PoolSettings {
        PoolSettings {
            max_streams: self.pool_max_streams.max(1),
            idle_timeout: secs(self.pool_idle_timeout, 60),
        }
    }

    fn keepalive(&self) -> KeepaliveSettings {
        KeepaliveSettings {
            tcp_time: secs(self.tcp_keepalive_time, 60),
            tcp_interval: secs(self.tcp_keepalive_interval, 10),
            tcp_probes: self.tcp_keepalive_probes.max(1),
            http2_interval: secs(self.http2_keepalive_interval, 30),
            http2_timeout: secs(self.http2_keepalive_timeout, 10),
            idle_timeout: secs(self.idle_timeout, 3600),
        }
    }
}

fn inspect(view: View, args: Inspect) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let text = runtime.block_on(cli::show(args.admin_addr, view, args.output))?;
    print!("{text}");
    Ok(())
}

fn run_uninstall(output: Output) -> anyhow::Result<()> {
    let report = uninstall::uninstall(false)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => {
            let pin_dir = report.pin_dir.as_deref().unwrap_or("none");
            println!("pinned data plane: {pin_dir}");
            println!("links removed: {}", report.removed_links.len());
            for link in &report.removed_links {
                println!("  {link}");
            }
            let route = if report.removed_capture_route {
                "removed"
            } else {
                "not present"
            };
            println!("policy route: {route}");
            match &report.restored_early_demux {
                Some(value) => println!("net.ipv4.tcp_early_demux: restored to {value}"),
                None => println!("net.ipv4.tcp_early_demux: unchanged"),
            }
            println!("leftover proxy sockets closed: {}", report.closed_sockets);
            if report.still_attached.is_empty() {
                println!("capture programs attached: none");
            } else {
                println!("capture programs still attached (a live agent holds them):");
                for a in &report.still_attached {
                    println!("  {a}");
                }
            }
        }
    }
    Ok(())
}

/// The error and its causes on one line, skipping causes the message already includes.
fn error_chain(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}
