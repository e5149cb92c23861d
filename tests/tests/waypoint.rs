//! End to end, as root: a namespace behind a waypoint, with the Gateway API's mesh conformance
//! tests ported to the simulated cluster (`conformance/tests/mesh/*.go`).
//!
//! The setup is the suite's (`conformance/mesh/manifests.yaml`): namespace
//! `gateway-conformance-mesh` with pods `echo-v1` (node 0) and `echo-v2` (node 1) running the
//! conformance echo on 8080, Services `echo` (both), `echo-v1` and `echo-v2` with ports 80→8080
//! and 8080 (HTTP) and 9090 (TCP), and — as Istio's ambient run of the suite does — the
//! namespace labelled `istio.io/use-waypoint=namespace` with a waypoint Gateway `namespace`,
//! whose pod `namespace-0` runs `mesh-agent waypoint` on node 1. Requests are made with curl
//! from inside `echo-v1`, as the suite's client runs in the echo-v1 pod.

mod common;

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{Agent, Cluster, ClusterSpec, PodSpec, Server, waypoint};
use serde_json::Value;

const NS: &str = "gateway-conformance-mesh";
const WAYPOINT_POD: &str = "namespace-0";

/// The conformance namespace behind its waypoint, running.
struct Mesh {
    cluster: Cluster,
    _agents: Vec<Agent>,
    waypoint: Agent,
    /// The echo servers: echo-v1's HTTP (8080) and TCP (9090), then echo-v2's.
    servers: Vec<Server>,
}

impl Mesh {
    /// The VIP of Service `echo` (`.10`), `echo-v1` (`.11`) or `echo-v2` (`.12`).
    fn vip(&self, service: &str) -> Ipv4Addr {
        vip(&self.cluster, service)
    }

    /// `curl` from echo-v1 to `http://<service>:<port><path>`, the name resolving to the
    /// Service's VIP (there is no DNS here), with `args` before the URL.
    fn curl(&self, service: &str, port: u16, path: &str, args: &[&str]) -> Result<Reply> {
        let resolve = format!("{service}:{port}:{}", self.vip(service));
        let url = format!("http://{service}:{port}{path}");
        let mut all = vec![
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "10",
            "--resolve",
            &resolve,
        ];
        all.extend_from_slice(args);
        all.push(&url);
        let out = self.cluster.pod_exec(NS, "echo-v1", &all)?;
        Reply::parse(&out).with_context(|| format!("curl {url}"))
    }

    /// [`Mesh::curl`] of a GET that must be answered by the echo: its report.
    fn echo(&self, service: &str, port: u16, path: &str, args: &[&str]) -> Result<Echo> {
        let reply = self.curl(service, port, path, args)?;
        ensure!(
            reply.status == 200,
            "GET {service}:{port}{path}: HTTP {} {}",
            reply.status,
            reply.body
        );
        reply.echo()
    }

    /// Applies a state file and waits until requests show it in force: `in_force` is asked of
    /// fresh requests until it holds (the agents' acceptance alone says nothing of the
    /// waypoint's).
    async fn apply_until(
        &self,
        file: &str,
        contents: &str,
        mut in_force: impl FnMut(&Mesh) -> Result<bool>,
    ) -> Result<()> {
        common::apply(&self.cluster, file, contents).await?;
        common::eventually(
            common::SETTLE,
            &format!("the waypoint to apply {file}"),
            || in_force(self),
        )
        .await
    }
}

/// What curl printed: status, headers (lower-case names) and body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, Vec<String>>,
    body: String,
}

impl Reply {
    fn parse(out: &str) -> Result<Reply> {
        let (head, body) = out
            .split_once("\r\n\r\n")
            .with_context(|| format!("no header end in {out:?}"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("status line {status_line:?}"))?;
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                headers
                    .entry(name.trim().to_ascii_lowercase())
                    .or_default()
                    .push(value.trim().to_owned());
            }
        }
        Ok(Reply {
            status,
            headers,
            body: body.to_owned(),
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.first().map(String::as_str)
    }

    fn echo(&self) -> Result<Echo> {
        let report: Value = serde_json::from_str(&self.body)
            .with_context(|| format!("the echo's report is not JSON: {}", self.body))?;
        Ok(Echo(report))
    }
}

/// The conformance echo's report of the request it received.
#[derive(Debug)]
struct Echo(Value);

impl Echo {
    fn pod(&self) -> &str {
        self.0["pod"].as_str().unwrap_or_default()
    }

    fn path(&self) -> &str {
        self.0["path"].as_str().unwrap_or_default()
    }

    fn host(&self) -> &str {
        self.0["host"].as_str().unwrap_or_default()
    }

    /// Every value of a request header, by its canonical name (`X-Header-Set`).
    fn header(&self, name: &str) -> Option<String> {
        let values = self.0["headers"][name].as_array()?;
        Some(
            values
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
        )
    }

    /// Who opened the connection the request came on.
    fn remote_ip(&self) -> Option<Ipv4Addr> {
        let addr: std::net::SocketAddr = self.0["remoteAddr"].as_str()?.parse().ok()?;
        match addr.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        }
    }
}

fn vip(cluster: &Cluster, service: &str) -> Ipv4Addr {
    let host = match service {
        "echo" => 10,
        "echo-v1" => 11,
        "echo-v2" => 12,
        other => panic!("no Service {other} in the conformance setup"),
    };
    Ipv4Addr::new(10, 96, cluster.octet(), host)
}

/// The Services and the waypoint Gateway of the conformance setup.
fn manifests(cluster: &Cluster) -> String {
    let service = |name: &str, selector: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  clusterIP: {}\n  selector:\n    {selector}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n  - name: http-alt\n    port: 8080\n  - name: tcp\n    port: 9090\n",
            vip(cluster, name)
        )
    };
    [
        waypoint::gateway_yaml(NS, "namespace", None),
        service("echo", "app: echo"),
        service("echo-v1", "version: v1"),
        service("echo-v2", "version: v2"),
    ]
    .join("")
}

/// Builds the setup; `None` (after a loud skip) when not root.
async fn conformance_mesh() -> Result<Option<Mesh>> {
    if !mesh_tests::require_root() {
        return Ok(None);
    }
    let spec = ClusterSpec::new()
        .namespace(
            NS,
            &[
                (mesh_tests::MODE_LABEL, mesh_tests::MODE_AMBIENT),
                ("istio.io/use-waypoint", "namespace"),
            ],
        )
        .pod(
            PodSpec::new(NS, "echo-v1", 0)
                .label("app", "echo")
                .label("version", "v1"),
        )
        .pod(
            PodSpec::new(NS, "echo-v2", 1)
                .label("app", "echo")
                .label("version", "v2"),
        )
        .pod(PodSpec::waypoint(NS, WAYPOINT_POD, "namespace", 1));
    let mut cluster = Cluster::new(spec)?;
    cluster.write_state_file("conformance.yaml", &manifests(&cluster))?;
    if common::from_the_api() {
        cluster.serve_api().await?;
    }
    let agents = vec![cluster.start_agent(0).await?, cluster.start_agent(1).await?];
    let mut servers = Vec::new();
    for pod in ["echo-v1", "echo-v2"] {
        let pod = cluster.pod(NS, pod);
        servers.push(pod.http_echo_server(8080).await?);
        servers.push(pod.echo_server(9090).await?);
    }
    let waypoint = cluster.start_waypoint(NS, WAYPOINT_POD).await?;
    Ok(Some(Mesh {
        cluster,
        _agents: agents,
        waypoint,
        servers,
    }))
}

fn route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: {parent}\n  rules:\n{rules}"
    )
}

/// MeshBasic: with no route, a GET to `echo` is answered 200 by one of its pods — through the
/// waypoint: the pod sees the waypoint's address as the client, the client's node recorded the
/// connection as sent to the waypoint, and the echo's node saw the waypoint's identity. Its
/// connections to the echoes are kept alive across requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_basic() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let waypoint_ip = mesh.cluster.pod(NS, WAYPOINT_POD).ip;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let echo = mesh.echo("echo", 80, "/", &[])?;
        ensure!(
            echo.remote_ip() == Some(waypoint_ip),
            "the echo was reached from {:?}, not from the waypoint {waypoint_ip}: {:?}",
            echo.remote_ip(),
            echo.0
        );
        ensure!(
            echo.path() == "/" && echo.host() == "echo",
            "echo saw {:?}",
            echo.0
        );
        seen.insert(echo.pod().to_owned());
    }
    ensure!(
        seen.len() == 2,
        "6 requests went only to {seen:?}: the endpoints are not both used"
    );
    // Six client connections, yet each echo was connected to once: the waypoint keeps its
    // connections to endpoints alive and reuses them.
    let accepted = [mesh.servers[0].accepted(), mesh.servers[2].accepted()];
    ensure!(
        accepted == [1, 1],
        "the echoes accepted {accepted:?} connections for 6 requests: not kept alive"
    );
    let vip = std::net::SocketAddr::from((mesh.vip("echo"), 80));
    let records = common::wait_records(&mesh.cluster, 0, "outbound", vip, 1).await?;
    ensure!(
        records.iter().all(|r| r["route"] == "waypoint"
            && r["destination"] == std::net::SocketAddr::from((waypoint_ip, 15008)).to_string()),
        "the client's node did not send the connections to the waypoint: {records:#?}"
    );
    let principal = format!("spiffe://cluster.local/ns/{NS}/sa/namespace");
    let inbound = common::connections(&mesh.cluster, 1)?;
    ensure!(
        inbound.iter().any(|r| r["direction"] == "inbound"
            && r["source_identity"] == principal.as_str()
            && r["destination_workload"] == format!("{NS}/echo-v2").as_str()),
        "echo-v2's node saw no connection from the waypoint's identity {principal}: {inbound:#?}"
    );
    Ok(())
}

/// MeshTrafficSplit: `/v1` goes to echo-v1, `/v2` to echo-v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_traffic_split() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - matches:\n    - path: {type: PathPrefix, value: /v1}\n    backendRefs:\n    - {name: echo-v1, port: 80}\n  - matches:\n    - path: {type: PathPrefix, value: /v2}\n    backendRefs:\n    - {name: echo-v2, port: 80}\n";
    mesh.apply_until("route.yaml", &route("mesh-split", "echo", rules), |m| {
        Ok(m.echo("echo", 80, "/v2", &[])?.pod() == "echo-v2")
    })
    .await?;
    for _ in 0..4 {
        for (path, pod) in [("/v1", "echo-v1"), ("/v2", "echo-v2")] {
            let echo = mesh.echo("echo", 80, path, &[])?;
            ensure!(
                echo.pod() == pod,
                "{path} went to {}, not {pod}",
                echo.pod()
            );
        }
    }
    // Routes are in force: a path no rule matches is 404.
    let reply = mesh.curl("echo", 80, "/other", &[])?;
    ensure!(
        reply.status == 404,
        "/other: HTTP {} {}",
        reply.status,
        reply.body
    );
    Ok(())
}

/// MeshHTTPRouteMatching: path-prefix segments and a `version` header pick v1 or v2;
/// `/v2example` is not under `/v2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_matching() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - matches:\n    - path: {type: PathPrefix, value: /}\n    backendRefs:\n    - {name: echo-v1, port: 80}\n  - matches:\n    - path: {type: PathPrefix, value: /v2}\n    - headers:\n      - {name: version, value: two}\n    backendRefs:\n    - {name: echo-v2, port: 80}\n";
    mesh.apply_until("route.yaml", &route("mesh-matching", "echo", rules), |m| {
        Ok(m.echo("echo", 80, "/v2", &[])?.pod() == "echo-v2")
    })
    .await?;
    let cases: [(&str, &[&str], &str); 6] = [
        ("/", &[], "echo-v1"),
        ("/example", &[], "echo-v1"),
        ("/v2", &[], "echo-v2"),
        ("/v2/example", &[], "echo-v2"),
        ("/v2example", &[], "echo-v1"),
        ("/", &["-H", "version: two"], "echo-v2"),
    ];
    for (path, args, pod) in cases {
        let echo = mesh.echo("echo", 80, path, args)?;
        ensure!(
            echo.pod() == pod,
            "{path} {args:?} went to {}, not {pod}",
            echo.pod()
        );
    }
    Ok(())
}

/// Traffic to a port that is not HTTP passes as TCP through the waypoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_passes_through_the_waypoint() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let client = mesh.cluster.pod(NS, "echo-v1");
    let address = std::net::SocketAddr::from((mesh.vip("echo-v2"), 9090));
    common::expect_echo(client, address).await?;
    client.send_and_verify(address, 256 * 1024).await?;
    let waypoint_ip = mesh.cluster.pod(NS, WAYPOINT_POD).ip;
    let peers = mesh.servers[3].peers();
    ensure!(
        peers.len() == 2
            && peers
                .iter()
                .all(|p| p.ip() == std::net::IpAddr::V4(waypoint_ip)),
        "echo-v2's TCP server was not reached from the waypoint {waypoint_ip}: {peers:?}"
    );
    let records = common::wait_records(&mesh.cluster, 0, "outbound", address, 2).await?;
    ensure!(
        records.iter().all(|r| r["route"] == "waypoint"),
        "not sent to the waypoint: {records:#?}"
    );
    if mesh.waypoint.log().contains("panicked") {
        bail!("the waypoint panicked:\n{}", mesh.waypoint.log_tail(50));
    }
    Ok(())
}
