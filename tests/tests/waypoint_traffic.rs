//! End to end, as root: what an HTTPRoute's `retry`, `timeouts` and RequestMirror do at the
//! waypoint, observed at the backends (each echo keeps a log of the requests it answered) and
//! by curl in the client pod, on the conformance setup (`common/conformance.rs`).

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::conformance::{Case, Mesh, conformance_mesh, route};

/// Requests an echo pod answered with this `x-request-id` (servers: 0 is echo-v1's HTTP, 2
/// echo-v2's).
fn arrivals(mesh: &Mesh, server: usize, id: &str) -> Vec<serde_json::Value> {
    mesh.servers[server]
        .requests()
        .into_iter()
        .filter(|report| report["headers"]["X-Request-Id"][0] == id)
        .collect()
}

/// A 503 is tried three times (`attempts: 2`) when the rule lists it, once when it does not;
/// the client gets the last answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_seen_at_the_backend() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - matches: [{path: {type: PathPrefix, value: /retry}}]\n    retry: {codes: [503], attempts: 2, backoff: 10ms}\n    backendRefs: [{name: echo-v1, port: 8080}]\n  - backendRefs: [{name: echo-v1, port: 8080}]\n";
    mesh.apply_and_expect(
        "route.yaml",
        &route("retries", "echo", rules),
        &[Case {
            path: "/retry",
            backend: "echo-v1",
            ..Case::default()
        }],
    )
    .await?;
    let reply = mesh.curl_service(
        "echo",
        80,
        "/retry",
        &[
            "-H",
            "x-echo-status: 503",
            "-H",
            "x-request-id: retried-503",
        ],
    )?;
    ensure!(
        reply.status == 503,
        "HTTP {}, not the echo's 503",
        reply.status
    );
    let seen = arrivals(&mesh, 0, "retried-503").len();
    ensure!(
        seen == 3,
        "echo-v1 saw the retried request {seen} times, not 3"
    );
    // A status the rule does not list is not retried; nor is anything without a retry.
    mesh.curl_service(
        "echo",
        80,
        "/retry",
        &[
            "-H",
            "x-echo-status: 500",
            "-H",
            "x-request-id: unlisted-500",
        ],
    )?;
    mesh.curl_service(
        "echo",
        80,
        "/other",
        &["-H", "x-echo-status: 503", "-H", "x-request-id: no-retry"],
    )?;
    let once = [
        arrivals(&mesh, 0, "unlisted-500").len(),
        arrivals(&mesh, 0, "no-retry").len(),
    ];
    ensure!(once == [1, 1], "tried {once:?} times, not once each");
    // A POST with a small body is retried whole.
    mesh.curl_service(
        "echo",
        80,
        "/retry",
        &[
            "-H",
            "x-echo-status: 503",
            "-H",
            "x-request-id: with-body",
            "--data",
            "twelve bytes",
        ],
    )?;
    let bodies: Vec<u64> = arrivals(&mesh, 0, "with-body")
        .iter()
        .filter_map(|r| r["bodyBytes"].as_u64())
        .collect();
    ensure!(
        bodies == [12, 12, 12],
        "the retried POST arrived with bodies {bodies:?}"
    );
    Ok(())
}

/// `timeouts.request` answers 504 when the backend is slower; `backendRequest` with a retry
/// limits each try, and the tries are seen at the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_end_slow_requests() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - matches: [{path: {type: PathPrefix, value: /request}}]\n    timeouts: {request: 500ms}\n    backendRefs: [{name: echo-v1, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /per-try}}]\n    timeouts: {request: 5s, backendRequest: 300ms}\n    retry: {attempts: 2, backoff: 10ms}\n    backendRefs: [{name: echo-v1, port: 8080}]\n";
    mesh.apply_and_expect(
        "route.yaml",
        &route("timeouts", "echo", rules),
        &[Case {
            path: "/request",
            backend: "echo-v1",
            ..Case::default()
        }],
    )
    .await?;
    let start = Instant::now();
    let reply = mesh.curl_service("echo", 80, "/request", &["-H", "x-echo-delay: 3000"])?;
    let took = start.elapsed();
    ensure!(
        reply.status == 504 && reply.body == "upstream request timeout",
        "a 3 s answer under a 500 ms timeout: HTTP {} {}",
        reply.status,
        reply.body
    );
    ensure!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2500),
        "the 500 ms timeout ended the request after {took:?}"
    );
    // Fast enough: answered.
    let reply = mesh.curl_service("echo", 80, "/request", &["-H", "x-echo-delay: 50"])?;
    ensure!(reply.status == 200, "a 50 ms answer: HTTP {}", reply.status);
    // Each try gets 300 ms: three tries reach the backend, then 504.
    let start = Instant::now();
    let reply = mesh.curl_service(
        "echo",
        80,
        "/per-try",
        &["-H", "x-echo-delay: 2000", "-H", "x-request-id: per-try"],
    )?;
    let took = start.elapsed();
    ensure!(
        reply.status == 504,
        "per-try timeouts: HTTP {} {}",
        reply.status,
        reply.body
    );
    let tries = arrivals(&mesh, 0, "per-try").len();
    ensure!(
        tries == 3 && took < Duration::from_millis(2000),
        "{tries} tries in {took:?}: not three of 300 ms each"
    );
    Ok(())
}

/// RequestMirror: echo-v1 answers, echo-v2 gets a copy, body and all (its host marked
/// `-shadow`, as Envoy marks mirrored requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_requests_reach_the_mirror() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - filters:\n    - type: RequestMirror\n      requestMirror: {backendRef: {name: echo-v2, port: 8080}}\n    backendRefs: [{name: echo-v1, port: 8080}]\n";
    mesh.apply_and_expect(
        "route.yaml",
        &route("mirror", "echo", rules),
        &[Case {
            backend: "echo-v1",
            ..Case::default()
        }],
    )
    .await?;
    let reply = mesh.curl_service(
        "echo",
        80,
        "/mirrored?x=1",
        &["-H", "x-request-id: mirrored", "--data", "copy me"],
    )?;
    ensure!(
        reply.status == 200 && reply.echo()?.pod() == "echo-v1",
        "HTTP {} {}",
        reply.status,
        reply.body
    );
    common::eventually(Duration::from_secs(5), "the mirror to see the copy", || {
        Ok(!arrivals(&mesh, 2, "mirrored").is_empty())
    })
    .await?;
    let copy = &arrivals(&mesh, 2, "mirrored")[0];
    ensure!(
        copy["path"] == "/mirrored?x=1"
            && copy["method"] == "POST"
            && copy["bodyBytes"] == 7
            && copy["host"]
                .as_str()
                .is_some_and(|h| h.starts_with("echo-shadow")),
        "the mirror saw {copy}"
    );
    ensure!(
        arrivals(&mesh, 0, "mirrored").len() == 1,
        "echo-v1 answered the mirrored request more than once"
    );
    Ok(())
}
