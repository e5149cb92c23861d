//! End to end, as root: hostile HTTP against the waypoint, from a client pod of the
//! conformance setup (`common/conformance.rs`) — oversized headers (curl, HTTP/1.1 and h2c),
//! request smuggling with conflicting Content-Length and Transfer-Encoding and an HTTP/2
//! rapid-reset burst (`tests/hostile/*.py`, Python's h2). Each is refused or bounded, and the
//! waypoint keeps serving everyone else.

mod common;

use anyhow::{Context, Result, ensure};
use common::conformance::{Mesh, NS, conformance_mesh};
use serde_json::Value;

fn script(name: &str) -> String {
    format!("{}/hostile/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs one of the hostile clients in echo-v1 against Service `echo` port 80; its JSON report.
fn hostile(mesh: &Mesh, name: &str, args: &[&str]) -> Result<Value> {
    let vip = mesh.vip("echo").to_string();
    let path = script(name);
    let mut all = vec!["/usr/bin/python3", path.as_str(), vip.as_str(), "80"];
    all.extend_from_slice(args);
    let out = mesh.cluster.pod_exec(NS, "echo-v1", &all)?;
    serde_json::from_str(out.trim()).with_context(|| format!("{name} printed {out:?}"))
}

/// Whether any echo answered a request for `path`.
fn reached(mesh: &Mesh, path: &str) -> bool {
    [0, 2].iter().any(|&server| {
        mesh.servers[server]
            .requests()
            .iter()
            .any(|r| r["path"].as_str().is_some_and(|p| p.starts_with(path)))
    })
}

/// The waypoint still answers an ordinary request.
fn still_serving(mesh: &Mesh) -> Result<()> {
    mesh.echo("echo", 80, "/still-serving", &[])?;
    ensure!(
        mesh.waypoint.log().lines().all(|l| !l.contains("panicked")),
        "the waypoint panicked:\n{}",
        mesh.waypoint.log_tail(40)
    );
    Ok(())
}

/// Headers over 60 KiB are refused — 431 over HTTP/1.1, 431 or GOAWAY over HTTP/2 — and never
/// reach an endpoint; more than 100 header fields are a 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    let reply = mesh.curl_service("echo", 80, "/big-http1", &["-H", &big])?;
    ensure!(
        reply.status == 431,
        "70 KiB of headers over HTTP/1.1: HTTP {}",
        reply.status
    );
    // Over HTTP/2 the header block spans CONTINUATION frames, and the waypoint's HTTP/2 stack
    // stops decoding an oversized block rather than buffer it: 431 on the stream, or the
    // connection ended with GOAWAY COMPRESSION_ERROR / ENHANCE_YOUR_CALM (Python's h2 tells).
    let report = hostile(
        &mesh,
        "h2_big_headers.py",
        &[&(70 * 1024).to_string(), "echo"],
    )?;
    const COMPRESSION_ERROR: u64 = 0x9;
    const ENHANCE_YOUR_CALM: u64 = 0xb;
    ensure!(
        report["status"] == 431
            || matches!(
                report["goaway"].as_u64(),
                Some(COMPRESSION_ERROR | ENHANCE_YOUR_CALM)
            ),
        "70 KiB of headers over HTTP/2 were not refused: {report}"
    );
    let many: Vec<String> = (0..120).map(|i| format!("x-h{i}: v")).collect();
    let mut args: Vec<&str> = Vec::new();
    for header in &many {
        args.extend(["-H", header.as_str()]);
    }
    let reply = mesh.curl_service("echo", 80, "/many-headers", &args)?;
    ensure!(
        reply.status == 431,
        "120 header fields: HTTP {}",
        reply.status
    );
    ensure!(
        !reached(&mesh, "/big-http") && !reached(&mesh, "/many-headers"),
        "a refused request reached an endpoint"
    );
    still_serving(&mesh)
}

/// A request with both Content-Length and Transfer-Encoding is read by its chunked body, as
/// RFC 9112 says, and the connection is closed after it: the request hidden after the empty
/// chunk is never served. An obfuscated Transfer-Encoding is refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_is_refused() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let smuggle = "POST /front HTTP/1.1\\r\\nHost: echo\\r\\nContent-Length: 44\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\nGET /smuggled HTTP/1.1\\r\\nHost: echo\\r\\n\\r\\n";
    let report = hostile(&mesh, "raw_http1.py", &[smuggle])?;
    let response = report["response"].as_str().unwrap_or_default();
    ensure!(
        response.matches("HTTP/1.1 ").count() == 1
            && response.starts_with("HTTP/1.1 200")
            && report["closed"] == true,
        "one answer and a closed connection expected: {report}"
    );
    ensure!(reached(&mesh, "/front"), "the front request was not served");
    ensure!(
        !reached(&mesh, "/smuggled"),
        "the smuggled request reached an endpoint"
    );
    let obfuscated = "POST /obfuscated HTTP/1.1\\r\\nHost: echo\\r\\nContent-Length: 5\\r\\nTransfer-Encoding: chunked, identity\\r\\n\\r\\nhello";
    let report = hostile(&mesh, "raw_http1.py", &[obfuscated])?;
    ensure!(
        report["response"]
            .as_str()
            .is_some_and(|r| r.starts_with("HTTP/1.1 400")),
        "an obfuscated Transfer-Encoding: {report}"
    );
    ensure!(
        !reached(&mesh, "/obfuscated"),
        "the obfuscated request reached an endpoint"
    );
    still_serving(&mesh)
}

/// 10,000 streams opened and cancelled at once over one connection: the waypoint ends that
/// connection with GOAWAY ENHANCE_YOUR_CALM long before, few of the streams reach an endpoint,
/// and other clients are served meanwhile and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_is_cut_short() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    const ENHANCE_YOUR_CALM: u64 = 0xb;
    let report = hostile(&mesh, "rapid_reset.py", &["10000", "echo"])?;
    let sent = report["sent"].as_u64().unwrap_or(0);
    ensure!(
        report["goaway"].as_u64() == Some(ENHANCE_YOUR_CALM) && sent < 10000,
        "the burst was not cut short with ENHANCE_YOUR_CALM: {report}"
    );
    let served: usize = [0, 2]
        .iter()
        .map(|&s| {
            mesh.servers[s]
                .requests()
                .iter()
                .filter(|r| r["path"] == "/rapid-reset")
                .count()
        })
        .sum();
    ensure!(
        served <= 200,
        "{served} of {sent} cancelled streams reached the endpoints"
    );
    still_serving(&mesh)
}
