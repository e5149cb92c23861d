//! The Gateway API's mesh conformance setup on the simulated cluster, and its way of checking
//! a request (`conformance/utils/echo/pod.go`): a case names the request and what must come of
//! it, and holds once it has been met three times in a row.
//!
//! The setup is the suite's (`conformance/mesh/manifests.yaml`): namespace
//! `gateway-conformance-mesh` with pods `echo-v1` (node 0) and `echo-v2` (node 1) running the
//! conformance echo on 8080 and a gRPC echo on 7070, Services `echo` (both), `echo-v1` and
//! `echo-v2` with ports 80→8080 and 8080 (HTTP), 9090 (TCP) and 7070 (gRPC), and — as Istio's ambient run of the suite does — the
//! namespace labelled `istio.io/use-waypoint=namespace` with a waypoint Gateway `namespace`,
//! whose pod `namespace-0` runs `mesh-agent waypoint` on node 1. Requests are made with curl
//! from inside `echo-v1`, as the suite's client runs in the echo-v1 pod.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{
    Agent, Cluster, ClusterSpec, PodSpec, Server, grpc_echo::GrpcEcho, http_echo::canonical,
    waypoint,
};
use serde_json::Value;

pub const NS: &str = "gateway-conformance-mesh";
pub const WAYPOINT_POD: &str = "namespace-0";
/// The Services' gRPC port, where the gRPC echo listens too.
pub const GRPC_PORT: u16 = 7070;

/// The conformance namespace behind its waypoint, running.
pub struct Mesh {
    pub cluster: Cluster,
    pub agents: Vec<Agent>,
    pub waypoint: Agent,
    /// The echo servers: echo-v1's HTTP (8080) and TCP (9090), then echo-v2's.
    pub servers: Vec<Server>,
    /// The gRPC echoes on 7070: echo-v1's, then echo-v2's.
    pub grpc_servers: Vec<GrpcEcho>,
}

impl Mesh {
    /// The VIP of Service `echo` (`.10`), `echo-v1` (`.11`) or `echo-v2` (`.12`).
    pub fn vip(&self, service: &str) -> Ipv4Addr {
        vip(&self.cluster, service)
    }

    /// `curl` from echo-v1 to `http://<service>:<port><path>`, the name resolving to the
    /// Service's VIP (there is no DNS here), with `args` before the URL.
    pub fn curl_service(
        &self,
        service: &str,
        port: u16,
        path: &str,
        args: &[&str],
    ) -> Result<Reply> {
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
    pub fn echo(&self, service: &str, port: u16, path: &str, args: &[&str]) -> Result<Echo> {
        let reply = self.curl_service(service, port, path, args)?;
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
    pub async fn apply_until(
        &self,
        file: &str,
        contents: &str,
        mut in_force: impl FnMut(&Mesh) -> Result<bool>,
    ) -> Result<()> {
        super::apply(&self.cluster, file, contents).await?;
        super::eventually(
            super::SETTLE,
            &format!("the waypoint to apply {file}"),
            || in_force(self),
        )
        .await
    }
}

impl Mesh {
    /// The waypoint's Prometheus text (its pod's `:15020/metrics`, which must answer 200).
    pub async fn waypoint_metrics(&self) -> Result<String> {
        let response = self
            .cluster
            .pod(NS, WAYPOINT_POD)
            .netns()
            .http_get("127.0.0.1:15020".parse()?, "/metrics")
            .await?;
        ensure!(
            response.status == 200,
            "waypoint metrics: HTTP {}",
            response.status
        );
        Ok(response.body)
    }
}

/// What curl printed: status, headers (lower-case names) and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body: String,
}

impl Reply {
    pub fn parse(out: &str) -> Result<Reply> {
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

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.first().map(String::as_str)
    }

    pub fn echo(&self) -> Result<Echo> {
        let report: Value = serde_json::from_str(&self.body)
            .with_context(|| format!("the echo's report is not JSON: {}", self.body))?;
        Ok(Echo(report))
    }
}

/// The conformance echo's report of the request it received.
#[derive(Debug)]
pub struct Echo(pub Value);

impl Echo {
    pub fn pod(&self) -> &str {
        self.0["pod"].as_str().unwrap_or_default()
    }

    pub fn path(&self) -> &str {
        self.0["path"].as_str().unwrap_or_default()
    }

    pub fn host(&self) -> &str {
        self.0["host"].as_str().unwrap_or_default()
    }

    /// Every value of a request header, joined by commas; any case of the name.
    pub fn header(&self, name: &str) -> Option<String> {
        let values = self.0["headers"][canonical(name)].as_array()?;
        Some(
            values
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
        )
    }

    /// Who opened the connection the request came on.
    pub fn remote_ip(&self) -> Option<Ipv4Addr> {
        let addr: std::net::SocketAddr = self.0["remoteAddr"].as_str()?.parse().ok()?;
        match addr.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        }
    }
}

pub fn vip(cluster: &Cluster, service: &str) -> Ipv4Addr {
    let host = match service {
        "echo" => 10,
        "echo-v1" => 11,
        "echo-v2" => 12,
        other => panic!("no Service {other} in the conformance setup"),
    };
    Ipv4Addr::new(10, 96, cluster.octet(), host)
}

/// The Services and the waypoint Gateway of the conformance setup.
pub fn manifests(cluster: &Cluster) -> String {
    // As the suite's: gRPC by the port's name, and h2c for `echo`'s.
    let service = |name: &str, selector: &str, grpc: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  clusterIP: {}\n  selector:\n    {selector}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n  - name: http-alt\n    port: 8080\n  - name: tcp\n    port: 9090\n  - name: grpc\n    port: 7070\n{grpc}",
            vip(cluster, name)
        )
    };
    [
        waypoint::gateway_yaml(NS, "namespace", None),
        service("echo", "app: echo", "    appProtocol: kubernetes.io/h2c\n"),
        service("echo-v1", "version: v1", ""),
        service("echo-v2", "version: v2", ""),
    ]
    .join("")
}

/// Builds the setup; `None` (after a loud skip) when not root.
pub async fn conformance_mesh() -> Result<Option<Mesh>> {
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
    if super::from_the_api() {
        cluster.serve_api().await?;
    }
    let agents = vec![cluster.start_agent(0).await?, cluster.start_agent(1).await?];
    let mut servers = Vec::new();
    for pod in ["echo-v1", "echo-v2"] {
        let pod = cluster.pod(NS, pod);
        servers.push(pod.http_echo_server(8080).await?);
        servers.push(pod.echo_server(9090).await?);
    }
    let mut grpc_servers = Vec::new();
    for pod in ["echo-v1", "echo-v2"] {
        grpc_servers.push(cluster.pod(NS, pod).grpc_echo_server(GRPC_PORT).await?);
    }
    let waypoint = cluster.start_waypoint(NS, WAYPOINT_POD).await?;
    Ok(Some(Mesh {
        cluster,
        agents,
        waypoint,
        servers,
        grpc_servers,
    }))
}

pub fn route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: {parent}\n  rules:\n{rules}"
    )
}

/// One request of a conformance test and what must come of it (Go's `http.ExpectedResponse`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Case<'a> {
    /// `service`, `service:port` (80 when absent), or a literal `ip:port`; `echo` by default.
    pub host: &'a str,
    /// Path and query; `/` by default.
    pub path: &'a str,
    /// Request headers (a `Host` here overrides the URL's).
    pub headers: &'a [(&'a str, &'a str)],
    /// 200 by default.
    pub status: u16,
    /// The pod that must answer (a name prefix, as the suite checks it); any when empty.
    pub backend: &'a str,
    /// The path (and query) the echo must have received.
    pub seen_path: Option<&'a str>,
    /// Headers the echo must have received, with these values (several joined by commas).
    pub seen_headers: &'a [(&'a str, &'a str)],
    pub absent_seen_headers: &'a [&'a str],
    pub response_headers: &'a [(&'a str, &'a str)],
    pub absent_response_headers: &'a [&'a str],
    /// The redirect's whole `Location`.
    pub location: Option<&'a str>,
    /// The whole body of an answer that is not the echo's (a denial's, say).
    pub body: Option<&'a str>,
}

/// How many times in a row a case must hold, as the suite's `RequiredConsecutiveSuccesses`.
const CONSECUTIVE: usize = 3;

impl Mesh {
    /// curl from echo-v1 for `case`: its reply.
    pub fn send(&self, case: &Case<'_>) -> Result<Reply> {
        let host = if case.host.is_empty() {
            "echo"
        } else {
            case.host
        };
        let path = if case.path.is_empty() { "/" } else { case.path };
        let mut args: Vec<String> = vec![
            "curl".into(),
            "-sS".into(),
            "-i".into(),
            "--max-time".into(),
            "10".into(),
        ];
        let url = match host.parse::<std::net::SocketAddr>() {
            Ok(address) => format!("http://{address}{path}"),
            Err(_) => {
                let (name, port) = match host.split_once(':') {
                    Some((name, port)) => (name, port.parse::<u16>().context("port")?),
                    None => (host, 80),
                };
                args.push("--resolve".into());
                args.push(format!("{name}:{port}:{}", self.vip(name)));
                format!("http://{name}:{port}{path}")
            }
        };
        for (name, value) in case.headers {
            args.push("-H".into());
            args.push(format!("{name}: {value}"));
        }
        args.push(url.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.cluster.pod_exec(NS, "echo-v1", &args)?;
        Reply::parse(&out).with_context(|| format!("curl {url}"))
    }

    /// One request for `case`, checked.
    pub fn check(&self, case: &Case<'_>) -> Result<()> {
        let reply = self.send(case)?;
        let status = if case.status == 0 { 200 } else { case.status };
        ensure!(
            reply.status == status,
            "HTTP {}, not {status}: {}",
            reply.status,
            reply.body
        );
        for (name, value) in case.response_headers {
            ensure!(
                reply.header(&name.to_ascii_lowercase()) == Some(*value),
                "response header {name} is {:?}, not {value:?}",
                reply.header(&name.to_ascii_lowercase())
            );
        }
        for name in case.absent_response_headers {
            ensure!(
                reply.header(&name.to_ascii_lowercase()).is_none(),
                "response header {name} is there: {:?}",
                reply.headers
            );
        }
        if let Some(body) = case.body {
            ensure!(reply.body == body, "body {:?}, not {body:?}", reply.body);
        }
        if let Some(location) = case.location {
            ensure!(
                reply.header("location") == Some(location),
                "Location {:?}, not {location:?}",
                reply.header("location")
            );
        }
        let wants_echo = !case.backend.is_empty()
            || case.seen_path.is_some()
            || !case.seen_headers.is_empty()
            || !case.absent_seen_headers.is_empty();
        if !wants_echo {
            return Ok(());
        }
        let echo = reply.echo()?;
        ensure!(
            echo.pod().starts_with(case.backend),
            "answered by {:?}, not {}",
            echo.pod(),
            case.backend
        );
        if let Some(path) = case.seen_path {
            ensure!(
                echo.path() == path,
                "the echo saw path {:?}, not {path:?}",
                echo.path()
            );
        }
        for (name, value) in case.seen_headers {
            ensure!(
                echo.header(name).as_deref() == Some(*value),
                "the echo saw {name}: {:?}, not {value:?} (all: {})",
                echo.header(name),
                echo.0["headers"]
            );
        }
        for name in case.absent_seen_headers {
            ensure!(
                echo.header(name).is_none(),
                "the echo saw {name}: {:?}",
                echo.header(name)
            );
        }
        Ok(())
    }

    /// `case` holds [`CONSECUTIVE`] times in a row within [`super::SETTLE`] (the suite's
    /// `MakeRequestAndExpectEventuallyConsistentResponse`).
    pub async fn expect(&self, case: &Case<'_>) -> Result<()> {
        let deadline = tokio::time::Instant::now() + super::SETTLE;
        let mut streak = 0;
        loop {
            match self.check(case) {
                Ok(()) => {
                    streak += 1;
                    if streak == CONSECUTIVE {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    bail!(
                        "{case:?}: {e:#}\nwaypoint log:\n{}",
                        self.waypoint.log_tail(30)
                    )
                }
                Err(_) => streak = 0,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How `count` GETs of `service:port` from echo-v1 spread over the pods that answered
    /// (one curl, its requests on one kept-alive connection).
    pub fn spread(
        &self,
        service: &str,
        port: u16,
        count: usize,
    ) -> Result<BTreeMap<String, usize>> {
        let resolve = format!("{service}:{port}:{}", self.vip(service));
        let url = format!("http://{service}:{port}/?n=[1-{count}]");
        let out = self.cluster.pod(NS, "echo-v1").netns().exec_with_timeout(
            &[
                "curl",
                "-sS",
                "--max-time",
                "120",
                "--resolve",
                &resolve,
                "-w",
                "\\n",
                &url,
            ],
            Duration::from_secs(150),
        )?;
        let mut counts = BTreeMap::new();
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            let report: Value = serde_json::from_str(line)
                .with_context(|| format!("not an echo report: {line}"))?;
            *counts
                .entry(report["pod"].as_str().unwrap_or_default().to_owned())
                .or_insert(0) += 1;
        }
        let answered: usize = counts.values().sum();
        ensure!(
            answered == count,
            "{answered} of {count} requests answered: {counts:?}"
        );
        Ok(counts)
    }

    /// Every case of a test, in order.
    pub async fn expect_all(&self, cases: &[Case<'_>]) -> Result<()> {
        for (i, case) in cases.iter().enumerate() {
            self.expect(case)
                .await
                .with_context(|| format!("case {i}"))?;
        }
        Ok(())
    }

    /// Applies a state file, then expects every case.
    pub async fn apply_and_expect(
        &self,
        file: &str,
        contents: &str,
        cases: &[Case<'_>],
    ) -> Result<()> {
        super::apply(&self.cluster, file, contents).await?;
        self.expect_all(cases).await
    }
}
