//! End to end, as root: the waypoint's request telemetry, read from outside it — its
//! `:15020/metrics` (Istio's request families with `reporter="waypoint"` and Istio's labels),
//! its access log on standard output (Istio's default text format), and the trace context the
//! endpoint receives — on the conformance setup (`common/conformance.rs`).

mod common;

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use common::conformance::{Case, NS, conformance_mesh, route};

/// The samples of `family` whose labels include all of `with`.
fn matching(
    text: &str,
    family: &str,
    with: &[(&str, &str)],
) -> Vec<(BTreeMap<String, String>, f64)> {
    common::samples(text, family)
        .into_iter()
        .filter(|(labels, _)| {
            with.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// Five GETs and one 100-byte POST to echo-v2 are counted as Istio counts them, with the
/// client's and the endpoint's workloads, principals and the Service; the duration histogram
/// has Envoy's buckets; the POST's body is in `istio_request_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_with_istio_labels() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    for _ in 0..5 {
        mesh.echo("echo-v2", 80, "/metrics-test", &[])?;
    }
    let body = "x".repeat(100);
    let post = mesh.curl_service("echo-v2", 80, "/posted", &["--data", &body])?;
    ensure!(post.status == 200, "POST: HTTP {}", post.status);
    let text = mesh.waypoint_metrics().await?;
    let service = format!("echo-v2.{NS}.svc.cluster.local");
    let expected: &[(&str, &str)] = &[
        ("reporter", "waypoint"),
        ("source_workload", "echo-v1"),
        ("source_workload_namespace", NS),
        (
            "source_principal",
            &format!("spiffe://cluster.local/ns/{NS}/sa/default"),
        ),
        ("source_app", "echo"),
        ("source_version", "v1"),
        ("destination_workload", "echo-v2"),
        ("destination_workload_namespace", NS),
        (
            "destination_principal",
            &format!("spiffe://cluster.local/ns/{NS}/sa/default"),
        ),
        ("destination_app", "echo"),
        ("destination_version", "v2"),
        ("destination_service", &service),
        ("destination_service_name", "echo-v2"),
        ("destination_service_namespace", NS),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("grpc_response_status", ""),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let requests = matching(&text, "istio_requests_total", expected);
    ensure!(
        requests.len() == 1 && requests[0].1 == 6.0,
        "istio_requests_total for echo-v2: {requests:?}\n{text}"
    );
    let buckets: Vec<String> = matching(
        &text,
        "istio_request_duration_milliseconds_bucket",
        expected,
    )
    .into_iter()
    .filter_map(|(labels, _)| labels.get("le").cloned())
    .collect();
    let envoy = [
        "0.5",
        "1.0",
        "5.0",
        "10.0",
        "25.0",
        "50.0",
        "100.0",
        "250.0",
        "500.0",
        "1000.0",
        "2500.0",
        "5000.0",
        "10000.0",
        "30000.0",
        "60000.0",
        "300000.0",
        "600000.0",
        "1800000.0",
        "3600000.0",
        "+Inf",
    ];
    ensure!(buckets == envoy, "duration buckets {buckets:?}");
    let count = matching(&text, "istio_request_duration_milliseconds_count", expected);
    ensure!(
        count.first().map(|s| s.1) == Some(6.0),
        "duration count {count:?}"
    );
    let sent = matching(&text, "istio_request_bytes_sum", expected);
    ensure!(
        sent.first().map(|s| s.1) == Some(100.0),
        "request bytes {sent:?}"
    );
    let received = matching(&text, "istio_response_bytes_sum", expected);
    ensure!(
        received.first().is_some_and(|s| s.1 > 600.0),
        "response bytes (six echo reports) {received:?}"
    );
    Ok(())
}

/// One access-log line per request in Istio's default format: the request line, status,
/// flags and details, the request id, the authority, the endpoint, Istio's cluster name, the
/// Service address, the client address and the route; a request no rule matches is `404 NR
/// route_not_found`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_as_istio() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - matches: [{path: {type: PathPrefix, value: /logged}}]\n    backendRefs: [{name: echo-v1, port: 8080}]\n";
    mesh.apply_and_expect(
        "route.yaml",
        &route("logged", "echo", rules),
        &[Case {
            path: "/logged",
            backend: "echo-v1",
            ..Case::default()
        }],
    )
    .await?;
    let mark = mesh.waypoint.log_mark();
    mesh.echo(
        "echo",
        80,
        "/logged/a?b=c",
        &["-H", "x-request-id: logged-1", "-A", "telemetry-test"],
    )?;
    let missing = mesh.curl_service("echo", 80, "/elsewhere", &["-H", "x-request-id: logged-2"])?;
    ensure!(missing.status == 404, "HTTP {}", missing.status);
    let echo_v1 = mesh.cluster.pod(NS, "echo-v1");
    let vip = mesh.vip("echo");
    let wanted = [
        (
            "logged-1",
            vec![
                "\"GET /logged/a?b=c HTTP/1.1\" 200 - via_upstream - \"-\" 0 ".to_string(),
                "\"telemetry-test\" \"logged-1\" \"echo\"".to_string(),
                format!("\"{}\"", echo_v1.addr(8080)),
                format!(
                    "inbound-vip|80|http|echo.{NS}.svc.cluster.local - {vip}:80 {}:",
                    echo_v1.ip
                ),
                format!(" - {NS}.logged.0"),
            ],
        ),
        (
            "logged-2",
            vec![
                "\"GET /elsewhere HTTP/1.1\" 404 NR route_not_found - \"-\" 0 ".to_string(),
                "\"logged-2\" \"echo\" \"-\"".to_string(),
            ],
        ),
    ];
    // `explain` names the same route and backend, and the same 404.
    let from = format!("{NS}/echo-v1");
    let to = format!("{vip}:80");
    let explain = |path: &str| -> Result<serde_json::Value> {
        let args = [
            "explain", "--from", &from, "--to", &to, "--path", path, "-o", "json",
        ];
        Ok(mesh.cluster.cli_json(0, &args)?["http"].clone())
    };
    let routed = explain("/logged/a?b=c")?;
    ensure!(
        routed["route"] == format!("{NS}.logged.0").as_str()
            && routed["backends"]
                == serde_json::json!([{"service": format!("{NS}/echo-v1:8080"), "weight": 1}])
            && routed["status"].is_null(),
        "explain of a routed request: {routed:#}"
    );
    let unrouted = explain("/elsewhere")?;
    ensure!(
        unrouted["status"] == 404,
        "explain of an unmatched request: {unrouted:#}"
    );
    for (id, parts) in wanted {
        let lines = mesh.waypoint.log_lines_since(mark, &format!("\"{id}\""));
        ensure!(
            lines.len() == 1,
            "{} access-log lines for {id}: {lines:?}",
            lines.len()
        );
        let line = &lines[0];
        ensure!(line.starts_with('['), "{line}");
        for part in parts {
            ensure!(
                line.contains(&part),
                "the line for {id} lacks {part:?}:\n{line}"
            );
        }
    }
    Ok(())
}

/// A `traceparent` goes on in the same trace with a new span id, its flags and `tracestate`
/// kept; a malformed one is dropped; none is made up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_is_carried_with_a_new_span() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let echo = mesh.echo(
        "echo",
        80,
        "/",
        &[
            "-H",
            &format!("traceparent: {parent}"),
            "-H",
            "tracestate: vendor=abc",
        ],
    )?;
    let seen = echo
        .header("traceparent")
        .context("no traceparent at the endpoint")?;
    let fields: Vec<&str> = seen.split('-').collect();
    ensure!(
        fields.len() == 4
            && fields[0] == "00"
            && fields[1] == trace
            && fields[2].len() == 16
            && fields[2] != "00f067aa0ba902b7"
            && fields[3] == "01",
        "the endpoint saw traceparent {seen}"
    );
    ensure!(
        echo.header("tracestate").as_deref() == Some("vendor=abc"),
        "tracestate {:?}",
        echo.header("tracestate")
    );
    let bad = mesh.echo(
        "echo",
        80,
        "/",
        &["-H", "traceparent: nonsense", "-H", "tracestate: x=1"],
    )?;
    ensure!(
        bad.header("traceparent").is_none() && bad.header("tracestate").is_none(),
        "a malformed traceparent went on: {:?}",
        bad.0["headers"]
    );
    let none = mesh.echo("echo", 80, "/", &[])?;
    ensure!(none.header("traceparent").is_none(), "a trace was made up");
    Ok(())
}
