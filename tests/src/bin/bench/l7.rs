//! `MESH_BENCH_ONLY=l7`: what the waypoint costs at L7, against no proxy and against haproxy
//! doing the same job on the same machine.
//!
//! One cluster, two namespaces. `l7` is enrolled and behind the waypoint Gateway `waypoint`
//! (pod `waypoint-0`); its Service `echo` has an HTTPRoute of five rules (path prefixes, one
//! with a header match) to the Services `echo-v1` and `echo-v2`, and a DENY AuthorizationPolicy
//! on `/admin*` attached to it by `targetRefs`. `l7-plain` is not enrolled: its pods are the
//! direct baseline, and its pod `haproxy` runs haproxy (`nbthread` = the waypoint's worker
//! threads, `http-reuse always`, no logging) with the same five routes as ACLs and the same
//! denial. Clients are on node 0; echo pods, the waypoint and haproxy on node 1. Every echo pod
//! runs the same small HTTP server (`bench serve-http`: HTTP/1.1 and h2c, a fixed body naming
//! the pod), in its own process.
//!
//! The load is `h2load` in the client pod: [`CONNECTIONS`] connections, one request at a time
//! each over HTTP/1.1, [`H2_STREAMS`] streams each over h2c (prior knowledge), for [`MEASURE`]
//! after a separate [`WARM_UP`] run, all on `GET /r3/bench` with `x-canary: on` (the rule with
//! the header match, to echo-v2). Per request timings come from its `--log-file` (h2load prints
//! no percentiles). Targets, each measured in every round, the order rotating from round to round:
//! - direct: echo-v2 of `l7-plain`, by pod address;
//! - mesh L4: echo-v2 of `l7`, by pod address — through both node agents (HBONE, mutual TLS),
//!   not through the waypoint (it serves Service traffic): what the waypoint path pays besides
//!   the waypoint;
//! - waypoint: the Service `echo` of `l7`: node agent, HBONE to the waypoint, routing and policy
//!   there, HBONE to echo-v2's node agent (upstream HTTP/1.1, as the Service port says `http`);
//! - haproxy: plaintext, no agent, upstream HTTP/1.1 to echo-v2 of `l7-plain`.
//!
//! Besides requests per second and latency, the CPU time the proxy processes spent per request
//! (from `/proc/<pid>/stat`, so other work on the machine does not count), and the resident
//! memory of the waypoint and of haproxy.

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http::{Response, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use mesh_tests::{
    Agent, AgentOptions, Cluster, ClusterSpec, MODE_AMBIENT, MODE_LABEL, Pod, PodSpec, cputime,
    resident_kib, waypoint,
};
use tokio::process::Child;

use super::median;

const MESH_NS: &str = "l7";
const PLAIN_NS: &str = "l7-plain";
const GATEWAY: &str = "waypoint";
const WAYPOINT_POD: &str = "waypoint-0";
const HAPROXY_POD: &str = "haproxy";
/// Where every echo pod serves, and the Services' target port.
const ECHO_PORT: u16 = 8080;
/// The Services' port.
const SERVICE_PORT: u16 = 80;
/// haproxy's HTTP/1.1 and h2c listeners.
const HAPROXY_H1_PORT: u16 = 8080;
const HAPROXY_H2_PORT: u16 = 8081;
const CONNECTIONS: usize = 16;
/// Concurrent streams per HTTP/2 connection.
const H2_STREAMS: usize = 10;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);
/// The request of the load: the route with a header match, answered by echo-v2.
const LOAD_PATH: &str = "/r3/bench";
const LOAD_HEADER: &str = "x-canary: on";
/// The waypoint's worker threads and haproxy's `nbthread`, unless `MESH_BENCH_L7_THREADS`.
const THREADS: usize = 1;
/// How long the waypoint gets to apply the routes and the policy.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    const ALL: [Protocol; 2] = [Protocol::Http1, Protocol::Http2];

    fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1",
            Protocol::Http2 => "HTTP/2 (h2c)",
        }
    }

    fn streams(self) -> usize {
        match self {
            Protocol::Http1 => 1,
            Protocol::Http2 => H2_STREAMS,
        }
    }
}

/// In the order of [`Runs`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    MeshL4,
    Waypoint,
    Haproxy,
}

impl Target {
    const ALL: [Target; 4] = [
        Target::Direct,
        Target::MeshL4,
        Target::Waypoint,
        Target::Haproxy,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::MeshL4 => "mesh L4",
            Target::Waypoint => "waypoint",
            Target::Haproxy => "haproxy",
        }
    }
}

/// One h2load run.
#[derive(Clone, Copy, Default)]
struct Run {
    requests_per_s: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// CPU time of the L7 proxy process (waypoint or haproxy) per request.
    proxy_cpu_us: Option<f64>,
    /// CPU time of both node agents per request.
    agents_cpu_us: Option<f64>,
}

/// The figures of every target: `[protocol][target]`, one entry per round.
type Runs = [[Vec<Run>; 4]; 2];

pub async fn run(rounds: usize) -> Result<bool> {
    let threads = threads()?;
    println!(
        "L7: {CONNECTIONS} connections, {MEASURE:?} per run after a {WARM_UP:?} warm-up, GET {LOAD_PATH} ({LOAD_HEADER}); \
         waypoint --worker-threads {threads} --access-log false, haproxy nbthread {threads}"
    );
    let cluster = Cluster::new(spec())?;
    cluster.write_state_file("l7.yaml", &manifests(&cluster))?;
    // Declared after the cluster, so dropped (killed) before it deletes the namespaces.
    let mut echoes = Vec::new();
    for namespace in [MESH_NS, PLAIN_NS] {
        for name in ["echo-v1", "echo-v2"] {
            echoes.push(start_echo(cluster.pod(namespace, name))?);
        }
    }
    for namespace in [MESH_NS, PLAIN_NS] {
        for name in ["echo-v1", "echo-v2"] {
            let pod = cluster.pod(namespace, name);
            wait_listening(pod, pod.addr(ECHO_PORT)).await?;
        }
    }
    let agents = vec![cluster.start_agent(0).await?, cluster.start_agent(1).await?];
    let options = AgentOptions::default()
        .arg("--access-log")
        .arg("false")
        .arg("--worker-threads")
        .arg(threads.to_string());
    let waypoint = cluster
        .start_waypoint_with(MESH_NS, WAYPOINT_POD, options)
        .await?;
    let mut haproxy = Haproxy::start(&cluster, threads).await?;

    for protocol in Protocol::ALL {
        check_direct(&cluster, Target::Direct, protocol)?;
        check_direct(&cluster, Target::MeshL4, protocol)?;
        check_routing(&cluster, Target::Haproxy, protocol).await?;
        check_routing(&cluster, Target::Waypoint, protocol)
            .await
            .with_context(|| format!("waypoint log:\n{}", waypoint.log_tail(30)))?;
    }
    println!("L7: routes and policy checked through the waypoint and haproxy");

    let mut runs: Runs = Default::default();
    let mut waypoint_rss = None::<u64>;
    let mut haproxy_rss = None::<u64>;
    let mut sequence = 0;
    for round in 1..=rounds {
        println!("L7 round {round}/{rounds}");
        for (p, protocol) in Protocol::ALL.into_iter().enumerate() {
            let mut order = Target::ALL;
            order.rotate_left((round - 1) % Target::ALL.len());
            for target in order {
                sequence += 1;
                let load = Load {
                    cluster: &cluster,
                    protocol,
                    target,
                    haproxy: &haproxy,
                    waypoint: &waypoint,
                    agents: &agents,
                    sequence,
                };
                let result = load.measure().await;
                match &result {
                    Ok(run) => println!(
                        "  {:<13} {:<9} {}",
                        protocol.name(),
                        target.name(),
                        run.show()
                    ),
                    Err(e) => println!(
                        "  {:<13} {:<9} FAILED: {e:#}",
                        protocol.name(),
                        target.name()
                    ),
                }
                runs[p][target as usize].push(result.unwrap_or_default());
                match target {
                    Target::Waypoint => waypoint_rss = waypoint_rss.max(waypoint.rss_kib()),
                    Target::Haproxy => haproxy_rss = haproxy_rss.max(haproxy.rss_kib()),
                    _ => {}
                }
            }
        }
        haproxy.ensure_running()?;
    }

    for (p, protocol) in Protocol::ALL.into_iter().enumerate() {
        print_table(protocol, rounds, &runs[p]);
    }
    let mib =
        |kib: Option<u64>| kib.map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    println!(
        "resident memory (VmRSS), highest after a run: waypoint {}, haproxy {}",
        mib(waypoint_rss),
        mib(haproxy_rss),
    );
    let complete = runs
        .iter()
        .flatten()
        .flatten()
        .all(|r| r.requests_per_s.is_some());
    Ok(complete)
}

/// `MESH_BENCH_L7_THREADS`, or [`THREADS`].
fn threads() -> Result<usize> {
    match std::env::var("MESH_BENCH_L7_THREADS") {
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("MESH_BENCH_L7_THREADS must be a positive number, not {v:?}"),
        },
        Err(_) => Ok(THREADS),
    }
}

fn spec() -> ClusterSpec {
    let echo = |namespace: &str, version: &str| {
        PodSpec::new(namespace, &format!("echo-{version}"), 1)
            .label("app", "echo")
            .label("version", version)
    };
    ClusterSpec::new()
        .namespace(
            MESH_NS,
            &[
                (MODE_LABEL, MODE_AMBIENT),
                ("istio.io/use-waypoint", GATEWAY),
            ],
        )
        .namespace(PLAIN_NS, &[])
        .pod(PodSpec::new(MESH_NS, "client", 0))
        .pod(echo(MESH_NS, "v1"))
        .pod(echo(MESH_NS, "v2"))
        .pod(PodSpec::waypoint(MESH_NS, WAYPOINT_POD, GATEWAY, 1))
        .pod(PodSpec::new(PLAIN_NS, "client", 0))
        .pod(echo(PLAIN_NS, "v1"))
        .pod(echo(PLAIN_NS, "v2"))
        .pod(PodSpec::new(PLAIN_NS, HAPROXY_POD, 1))
}

/// The VIP of Service `echo` (`.10`), `echo-v1` (`.11`) or `echo-v2` (`.12`) of [`MESH_NS`].
fn vip(cluster: &Cluster, service: &str) -> Ipv4Addr {
    let host = match service {
        "echo-v1" => 11,
        "echo-v2" => 12,
        _ => 10,
    };
    Ipv4Addr::new(10, 96, cluster.octet(), host)
}

/// The waypoint Gateway, the Services, the five-rule HTTPRoute and the L7 policy.
fn manifests(cluster: &Cluster) -> String {
    let service = |name: &str, selector: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {MESH_NS}\nspec:\n  clusterIP: {}\n  selector:\n    {selector}\n  ports:\n  - name: http\n    port: {SERVICE_PORT}\n    targetPort: {ECHO_PORT}\n",
            vip(cluster, name)
        )
    };
    let rule = |prefix: &str, header: bool, backend: &str| {
        let header = if header {
            "\n      headers:\n      - {name: x-canary, value: \"on\"}"
        } else {
            ""
        };
        format!(
            "  - matches:\n    - path: {{type: PathPrefix, value: {prefix}}}{header}\n    backendRefs:\n    - {{name: {backend}, port: {SERVICE_PORT}}}\n"
        )
    };
    let rules = [
        rule("/r1", false, "echo-v1"),
        rule("/r2", false, "echo-v2"),
        rule("/r3", true, "echo-v2"),
        rule("/r3", false, "echo-v1"),
        rule("/r4", false, "echo-v2"),
    ]
    .concat();
    let route = format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: echo\n  namespace: {MESH_NS}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: echo, port: {SERVICE_PORT}}}\n  rules:\n{rules}"
    );
    let policy = format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-admin\n  namespace: {MESH_NS}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: echo}}]\n  action: DENY\n  rules:\n  - to: [{{operation: {{paths: [\"/admin*\"]}}}}]\n"
    );
    [
        format!("---\n{}", waypoint::gateway_yaml(MESH_NS, GATEWAY, None)),
        service("echo", "app: echo"),
        service("echo-v1", "version: v1"),
        service("echo-v2", "version: v2"),
        route,
        policy,
    ]
    .concat()
}

/// The haproxy equivalent of [`manifests`]' route and policy, to `l7-plain`'s echo pods.
/// Gateway API's PathPrefix matches whole segments: `/r1` and `/r1/…`, not `/r10`.
fn haproxy_config(threads: usize, v1: SocketAddr, v2: SocketAddr) -> String {
    let mut acls = String::new();
    for r in ["r1", "r2", "r3", "r4"] {
        let _ = writeln!(acls, "    acl {r} path /{r}");
        let _ = writeln!(acls, "    acl {r} path_beg /{r}/");
    }
    format!(
        "global
    nbthread {threads}
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend echo
    bind :{HAPROXY_H1_PORT}
    bind :{HAPROXY_H2_PORT} proto h2
    # The AuthorizationPolicy: DENY paths /admin*.
    http-request deny deny_status 403 if {{ path_beg /admin }}
{acls}    acl canary req.hdr(x-canary) -m str on
    # No rule matches: 404, as the waypoint answers.
    http-request return status 404 unless r1 || r2 || r3 || r4
    use_backend echo-v1 if r1
    use_backend echo-v2 if r2
    use_backend echo-v2 if r3 canary
    use_backend echo-v1 if r3
    use_backend echo-v2 if r4

backend echo-v1
    server echo-v1 {v1}

backend echo-v2
    server echo-v2 {v2}
"
    )
}

/// Starts `program args` in `pod`, killed when the handle drops and when this process dies.
fn spawn_in(pod: &Pod, program: &str, args: &[&str], log: Option<&Path>) -> Result<Child> {
    let mut command = pod.netns().command(program);
    command.args(args).stdin(Stdio::null());
    if let Some(path) = log {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        command.stdout(file.try_clone()?).stderr(file);
    }
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {program} in {}", pod.id()))
}

/// `bench serve-http <name>` in `pod`.
fn start_echo(pod: &Pod) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    spawn_in(
        pod,
        &exe.to_string_lossy(),
        &["serve-http", &pod.name],
        None,
    )
}

async fn wait_listening(pod: &Pod, addr: SocketAddr) -> Result<()> {
    for _ in 0..100 {
        if pod.connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {addr} in {}", pod.id())
}

/// `bench serve-http <name>`: HTTP/1.1 and h2c on [`ECHO_PORT`], every request answered 200
/// with `<name>\n`. The conformance echo (`mesh_tests::http_echo`) reports each request as JSON
/// and keeps every report, which under this load would grow without bound and cost more than
/// the proxies being measured.
pub async fn serve_http(name: Option<String>) -> ExitCode {
    let body = Bytes::from(format!("{}\n", name.unwrap_or_default()));
    let listener = match tokio::net::TcpListener::bind(("0.0.0.0", ECHO_PORT)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench serve-http: cannot bind {ECHO_PORT}: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                let body = body.clone();
                async move {
                    let mut response = Response::new(Full::new(body));
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// haproxy in pod `l7-plain/haproxy`, killed on drop.
struct Haproxy {
    child: Child,
    log: PathBuf,
}

impl Haproxy {
    async fn start(cluster: &Cluster, threads: usize) -> Result<Haproxy> {
        let pod = cluster.pod(PLAIN_NS, HAPROXY_POD);
        let config = haproxy_config(
            threads,
            cluster.pod(PLAIN_NS, "echo-v1").addr(ECHO_PORT),
            cluster.pod(PLAIN_NS, "echo-v2").addr(ECHO_PORT),
        );
        let path = cluster.temp_dir().join("haproxy.cfg");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let path = path.to_string_lossy().into_owned();
        pod.exec(&["haproxy", "-c", "-q", "-f", &path])
            .context("haproxy rejects its configuration (is it installed? `cargo xtask setup`)")?;
        let log = cluster.temp_dir().join("haproxy.log");
        // -db: in the foreground, one process; no `log` line: no logging.
        let child = spawn_in(pod, "haproxy", &["-db", "-f", &path], Some(&log))?;
        let mut haproxy = Haproxy { child, log };
        for port in [HAPROXY_H1_PORT, HAPROXY_H2_PORT] {
            let waited = wait_listening(pod, pod.addr(port)).await;
            haproxy.ensure_running()?;
            waited?;
        }
        Ok(haproxy)
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "haproxy exited ({status}): {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }

    fn rss_kib(&self) -> Option<u64> {
        resident_kib(self.pid()?).ok()
    }
}

/// Where a target is reached, and from which client pod.
fn endpoint(cluster: &Cluster, target: Target, protocol: Protocol) -> (&Pod, SocketAddr) {
    match target {
        Target::Direct => {
            let echo = cluster.pod(PLAIN_NS, "echo-v2");
            (cluster.pod(PLAIN_NS, "client"), echo.addr(ECHO_PORT))
        }
        Target::MeshL4 => {
            let echo = cluster.pod(MESH_NS, "echo-v2");
            (cluster.pod(MESH_NS, "client"), echo.addr(ECHO_PORT))
        }
        Target::Waypoint => (
            cluster.pod(MESH_NS, "client"),
            SocketAddr::from((vip(cluster, "echo"), SERVICE_PORT)),
        ),
        Target::Haproxy => {
            let port = match protocol {
                Protocol::Http1 => HAPROXY_H1_PORT,
                Protocol::Http2 => HAPROXY_H2_PORT,
            };
            (
                cluster.pod(PLAIN_NS, "client"),
                cluster.pod(PLAIN_NS, HAPROXY_POD).addr(port),
            )
        }
    }
}

/// One curl from `client`: the status and the body.
fn curl(
    client: &Pod,
    protocol: Protocol,
    to: SocketAddr,
    path: &str,
    header: Option<&str>,
) -> Result<(u16, String)> {
    let url = format!("http://{to}{path}");
    let mut args = vec!["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}"];
    if protocol == Protocol::Http2 {
        args.push("--http2-prior-knowledge");
    }
    if let Some(header) = header {
        args.extend(["-H", header]);
    }
    args.push(&url);
    let out = client.exec(&args)?;
    let (body, status) = out
        .rsplit_once('\n')
        .with_context(|| format!("curl {url}: no status in {out:?}"))?;
    let status = status
        .trim()
        .parse()
        .with_context(|| format!("curl {url}: status {status:?}"))?;
    Ok((status, body.to_owned()))
}

/// The load's request reaches echo-v2 without a proxy.
fn check_direct(cluster: &Cluster, target: Target, protocol: Protocol) -> Result<()> {
    let (client, to) = endpoint(cluster, target, protocol);
    let (status, body) = curl(client, protocol, to, LOAD_PATH, Some(LOAD_HEADER))?;
    ensure!(
        status == 200 && body.trim() == "echo-v2",
        "{} {}: HTTP {status} {body:?}",
        target.name(),
        protocol.name()
    );
    Ok(())
}

/// The routes and the policy are in force at `target` (retried until [`SETTLE`]).
async fn check_routing(cluster: &Cluster, target: Target, protocol: Protocol) -> Result<()> {
    let (client, to) = endpoint(cluster, target, protocol);
    // (path, header, status, the pod that must answer)
    let cases: [(&str, Option<&str>, u16, &str); 8] = [
        (LOAD_PATH, Some(LOAD_HEADER), 200, "echo-v2"),
        (LOAD_PATH, None, 200, "echo-v1"),
        ("/r1", None, 200, "echo-v1"),
        ("/r2/x", None, 200, "echo-v2"),
        ("/r4/x", None, 200, "echo-v2"),
        ("/r10", None, 404, ""),
        ("/admin/x", None, 403, ""),
        ("/r1/admin", None, 200, "echo-v1"),
    ];
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let mut failed = None;
        for (path, header, status, pod) in cases {
            match curl(client, protocol, to, path, header) {
                Ok((got, body)) if got == status && (pod.is_empty() || body.trim() == pod) => {}
                Ok((got, body)) => {
                    failed = Some(format!(
                        "GET {path} {header:?}: HTTP {got} {body:?}, not {status} {pod}"
                    ));
                    break;
                }
                Err(e) => {
                    failed = Some(format!("GET {path}: {e:#}"));
                    break;
                }
            }
        }
        let Some(failed) = failed else {
            return Ok(());
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("{} {}: {failed}", target.name(), protocol.name());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One measurement: a warm-up run, then the measured run with the processes' CPU time around it.
struct Load<'a> {
    cluster: &'a Cluster,
    protocol: Protocol,
    target: Target,
    haproxy: &'a Haproxy,
    waypoint: &'a Agent,
    agents: &'a [Agent],
    /// Numbers the run's log file.
    sequence: usize,
}

impl Load<'_> {
    async fn measure(&self) -> Result<Run> {
        let (client, to) = endpoint(self.cluster, self.target, self.protocol);
        h2load(client, self.protocol, to, WARM_UP, None).await?;
        let proxy = match self.target {
            Target::Waypoint => Some(self.waypoint.pid()),
            Target::Haproxy => self.haproxy.pid(),
            Target::Direct | Target::MeshL4 => None,
        };
        let through_agents = matches!(self.target, Target::MeshL4 | Target::Waypoint);
        let agents_busy = || -> Result<Duration> {
            self.agents
                .iter()
                .map(|a| cputime::process_busy(a.pid()))
                .sum()
        };
        let proxy_before = proxy.map(cputime::process_busy).transpose()?;
        let agents_before = agents_busy()?;
        let log = self
            .cluster
            .temp_dir()
            .join(format!("h2load-{}.log", self.sequence));
        let summary = h2load(client, self.protocol, to, MEASURE, Some(&log)).await?;
        let proxy_busy = match (proxy, proxy_before) {
            (Some(pid), Some(before)) => Some(cputime::process_busy(pid)?.saturating_sub(before)),
            _ => None,
        };
        let agents_busy = agents_busy()?.saturating_sub(agents_before);
        let mut latencies = read_log(&log)?;
        // The logs of a whole run would fill the temp dir: tens of MB each.
        let _ = std::fs::remove_file(&log);
        ensure!(
            latencies.len() as u64 == summary.done,
            "h2load finished {} requests, its log has {}",
            summary.done,
            latencies.len()
        );
        latencies.sort_unstable();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
        let per_request = |busy: Duration| busy.as_secs_f64() * 1e6 / summary.done as f64;
        Ok(Run {
            requests_per_s: Some(summary.requests_per_s),
            p50_ms: Some(at(0.50)),
            p99_ms: Some(at(0.99)),
            proxy_cpu_us: proxy_busy.map(per_request),
            agents_cpu_us: through_agents.then(|| per_request(agents_busy)),
        })
    }
}

impl Run {
    fn show(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.2}"));
        let mut line = format!(
            "{:.0} req/s, p50 {} ms, p99 {} ms",
            self.requests_per_s.unwrap_or(0.0),
            ms(self.p50_ms),
            ms(self.p99_ms)
        );
        if let Some(us) = self.proxy_cpu_us {
            let _ = write!(line, ", proxy {us:.1} µs CPU/request");
        }
        if let Some(us) = self.agents_cpu_us {
            let _ = write!(line, ", agents {us:.1} µs CPU/request");
        }
        line
    }
}

/// What h2load printed at the end of a run.
#[derive(Debug, PartialEq)]
struct Summary {
    requests_per_s: f64,
    done: u64,
}

/// Runs h2load from `client` to `http://<to><LOAD_PATH>` for `duration`, checks every request
/// was answered 2xx, and writes per-request timings to `log` if given.
async fn h2load(
    client: &Pod,
    protocol: Protocol,
    to: SocketAddr,
    duration: Duration,
    log: Option<&Path>,
) -> Result<Summary> {
    let mut command = client.netns().command("h2load");
    command.args([
        "-c".to_owned(),
        CONNECTIONS.to_string(),
        "-m".to_owned(),
        protocol.streams().to_string(),
        "-t".to_owned(),
        "1".to_owned(),
        "-D".to_owned(),
        duration.as_secs().to_string(),
        "-H".to_owned(),
        LOAD_HEADER.to_owned(),
    ]);
    if protocol == Protocol::Http1 {
        command.arg("--h1");
    }
    if let Some(log) = log {
        command.arg("--log-file").arg(log);
    }
    command.arg(format!("http://{to}{LOAD_PATH}"));
    let run = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .stdin(Stdio::null())
        .output();
    // h2load may wait forever on a server that stops answering.
    let output = tokio::time::timeout(duration + Duration::from_secs(20), run)
        .await
        .with_context(|| format!("h2load to {to} did not finish"))?
        .context("running h2load")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "h2load to {to}: {}: {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse_summary(&stdout).with_context(|| format!("h2load to {to}: {stdout}"))
}

/// Reads h2load's `finished in …, N req/s` and checks that no request failed and every one
/// was answered 2xx.
fn parse_summary(out: &str) -> Result<Summary> {
    let line = |prefix: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .with_context(|| format!("no {prefix:?} line"))
    };
    let requests_per_s = line("finished in ")?
        .split(", ")
        .find_map(|part| part.strip_suffix(" req/s"))
        .and_then(|n| n.parse::<f64>().ok())
        .context("no req/s")?;
    // requests: 146831 total, 146831 started, 146831 done, 146831 succeeded, 0 failed, ...
    let requests = line("requests: ")?;
    let count = |text: &str, word: &str| -> Result<u64> {
        text.split(", ")
            .find_map(|part| part.strip_suffix(word))
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no {word:?} count"))
    };
    let done = count(requests, " done")?;
    for word in [" failed", " errored", " timeout"] {
        let n = count(requests, word)?;
        ensure!(n == 0, "{n} requests{word}");
    }
    let ok = count(line("status codes: ")?, " 2xx")?;
    ensure!(done > 0, "no request finished");
    ensure!(ok == done, "{done} requests done, {ok} answered 2xx");
    Ok(Summary {
        requests_per_s,
        done,
    })
}

/// The third column of h2load's `--log-file` (start time, status, µs to the end of the
/// response), every status checked to be 2xx.
fn read_log(path: &Path) -> Result<Vec<u64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let mut columns = line.split('\t');
            let (_, status, micros) = (columns.next(), columns.next(), columns.next());
            ensure!(
                status.is_some_and(|s| s.starts_with('2')),
                "h2load logged {line:?}"
            );
            micros
                .and_then(|m| m.trim().parse().ok())
                .with_context(|| format!("h2load logged {line:?}"))
        })
        .collect()
}

/// The medians of one protocol's runs, with the ratios against the direct baseline and
/// between the waypoint and haproxy.
fn print_table(protocol: Protocol, rounds: usize, runs: &[Vec<Run>; 4]) {
    type Pick = fn(&Run) -> Option<f64>;
    let rows: [(&str, Pick, usize); 5] = [
        ("requests/s", |r| r.requests_per_s, 0),
        ("latency p50, ms", |r| r.p50_ms, 2),
        ("latency p99, ms", |r| r.p99_ms, 2),
        ("proxy CPU µs/request", |r| r.proxy_cpu_us, 1),
        ("agents' CPU µs/request", |r| r.agents_cpu_us, 1),
    ];
    let [direct, mesh_l4, waypoint, haproxy] = runs;
    println!();
    println!(
        "L7 {}, {CONNECTIONS} connections × {} stream{}, median of {rounds} rounds:",
        protocol.name(),
        protocol.streams(),
        if protocol.streams() == 1 { "" } else { "s" }
    );
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8}",
        "", "direct", "mesh L4", "waypoint", "haproxy", "wp/direct", "hap/direct", "wp/hap"
    );
    for (name, pick, decimals) in rows {
        let of = |runs: &[Run]| median(runs.iter().filter_map(pick).collect());
        let (d, m, w, h) = (of(direct), of(mesh_l4), of(waypoint), of(haproxy));
        let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.decimals$}"));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".to_owned(),
        };
        println!(
            "{name:<24} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8}",
            show(d),
            show(m),
            show(w),
            show(h),
            ratio(w, d),
            ratio(h, d),
            ratio(w, h)
        );
    }
    let per_round: Vec<String> = waypoint
        .iter()
        .zip(haproxy)
        .map(|(w, h)| match (w.requests_per_s, h.requests_per_s) {
            (Some(w), Some(h)) if h > 0.0 => format!("{w:.0}/{h:.0} = {:.2}", w / h),
            _ => "failed".to_owned(),
        })
        .collect();
    println!(
        "requests/s by round (waypoint/haproxy): {}",
        per_round.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const H2LOAD: &str = "finished in 3.00s, 73415.50 req/s, 4.62MB/s
requests: 146831 total, 146831 started, 146831 done, 146831 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 146831 2xx, 0 3xx, 0 4xx, 0 5xx
";

    #[test]
    fn reads_h2load_summary() {
        assert_eq!(
            parse_summary(H2LOAD).unwrap(),
            Summary {
                requests_per_s: 73415.5,
                done: 146831
            }
        );
    }

    #[test]
    fn a_failed_or_non_2xx_request_fails_the_run() {
        let failed = H2LOAD.replace("0 failed", "3 failed");
        assert!(parse_summary(&failed).is_err());
        let denied = H2LOAD.replace("146831 2xx, 0 3xx, 0 4xx", "146830 2xx, 0 3xx, 1 4xx");
        assert!(parse_summary(&denied).is_err());
    }

    #[test]
    fn haproxy_routes_whole_path_segments() {
        let v1 = SocketAddr::from(([10, 0, 2, 10], 8080));
        let v2 = SocketAddr::from(([10, 0, 2, 11], 8080));
        let config = haproxy_config(1, v1, v2);
        assert!(config.contains("nbthread 1\n"));
        assert!(config.contains("    acl r1 path /r1\n    acl r1 path_beg /r1/\n"));
        assert!(config.contains("server echo-v2 10.0.2.11:8080\n"));
    }
}
