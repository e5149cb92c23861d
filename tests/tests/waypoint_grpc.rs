//! End to end, as root: gRPC through the waypoint. The Gateway API's gRPC mesh conformance tests
//! (`conformance/tests/mesh/grpcroute-*.go`) ported to the simulated cluster with their
//! GRPCRoutes and cases, with a real gRPC client (in echo-v1, or echo-v2 where the suite's case
//! uses that pod) and the gRPC echo on port 7070 of both echo pods (see `common/conformance.rs`).

mod common;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use common::conformance::{GRPC_PORT, Mesh, NS, WAYPOINT_POD, conformance_mesh};
use mesh_tests::grpc_echo::{GrpcCall, GrpcReply};

/// The method the cases call; the echo answers any.
const METHOD: &str = "/gateway_api_conformance.echo_basic.grpcecho.GrpcEcho/Echo";
/// The authority the suite's client sends (`Host: echo:7070`).
const AUTHORITY: &str = "echo:7070";
/// How many times in a row a case must hold, as the suite's `RequiredConsecutiveSuccesses`.
const CONSECUTIVE: usize = 3;

/// A GRPCRoute on Service `echo` port 7070.
fn grpc_route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: echo\n    port: {GRPC_PORT}\n  rules:\n{rules}"
    )
}

/// One gRPC call of a conformance test and what must come of it.
#[derive(Debug, Default, Clone, Copy)]
struct GrpcCase<'a> {
    /// The pod the call is made from; echo-v1 when empty.
    client: &'a str,
    metadata: &'a [(&'a str, &'a str)],
    /// The pod that must answer (a name prefix); any when empty.
    backend: &'a str,
    /// Metadata the echo must have received, with these values (several joined by commas).
    seen: &'a [(&'a str, &'a str)],
    absent: &'a [&'a str],
}

/// `echo:7070`, as the client dials it: the Service's VIP.
fn echo_address(mesh: &Mesh) -> SocketAddr {
    SocketAddr::from((mesh.vip("echo"), GRPC_PORT))
}

/// Calls from `client` to `echo:7070`, one after the other on one channel.
fn calls(
    mesh: &Mesh,
    client: &str,
    metadata: &[(&str, &str)],
    count: usize,
) -> Result<Vec<GrpcReply>> {
    let client = if client.is_empty() { "echo-v1" } else { client };
    mesh.cluster.pod(NS, client).grpc_call(&GrpcCall {
        authority: Some(AUTHORITY),
        metadata,
        count,
        ..GrpcCall::new(echo_address(mesh), METHOD)
    })
}

/// One call for `case`, checked; the reply.
fn check(mesh: &Mesh, case: &GrpcCase<'_>) -> Result<GrpcReply> {
    let reply = calls(mesh, case.client, case.metadata, 1)?
        .pop()
        .context("no reply")?;
    ensure!(
        reply.code == "OK",
        "gRPC {} ({:?}), not OK",
        reply.code,
        reply.details
    );
    let pod = reply.pod().unwrap_or_default();
    ensure!(
        pod.starts_with(case.backend),
        "answered by {pod:?}, not {}",
        case.backend
    );
    for (name, value) in case.seen {
        ensure!(
            reply.metadata(name).as_deref() == Some(*value),
            "the echo saw {name}: {:?}, not {value:?} (all: {:?})",
            reply.metadata(name),
            reply.response
        );
    }
    for name in case.absent {
        ensure!(
            reply.metadata(name).is_none(),
            "the echo saw {name}: {:?}",
            reply.metadata(name)
        );
    }
    Ok(reply)
}

/// `case` holds [`CONSECUTIVE`] times in a row within [`common::SETTLE`] (the suite's
/// `MakeRequestAndExpectEventuallyConsistentResponse`); the last reply.
async fn expect(mesh: &Mesh, case: &GrpcCase<'_>) -> Result<GrpcReply> {
    let deadline = tokio::time::Instant::now() + common::SETTLE;
    let mut streak = 0;
    loop {
        match check(mesh, case) {
            Ok(reply) => {
                streak += 1;
                if streak == CONSECUTIVE {
                    return Ok(reply);
                }
                continue;
            }
            Err(e) if tokio::time::Instant::now() >= deadline => bail!(
                "{case:?}: {e:#}\nwaypoint log:\n{}",
                mesh.waypoint.log_tail(30)
            ),
            Err(_) => streak = 0,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The calls went through the waypoint: the echo was called from the waypoint's address, and
/// the client's node sent its connections to `echo:7070` to the waypoint.
async fn expect_through_the_waypoint(mesh: &Mesh, reply: &GrpcReply) -> Result<()> {
    let waypoint_ip = mesh.cluster.pod(NS, WAYPOINT_POD).ip;
    ensure!(
        reply.peer().map(|p| p.ip()) == Some(std::net::IpAddr::V4(waypoint_ip)),
        "the echo was called from {:?}, not from the waypoint {waypoint_ip}",
        reply.peer()
    );
    let records = common::wait_records(&mesh.cluster, 0, "outbound", echo_address(mesh), 1).await?;
    let waypoint = SocketAddr::from((waypoint_ip, 15008)).to_string();
    ensure!(
        records
            .iter()
            .all(|r| r["route"] == "waypoint" && r["destination"] == waypoint.as_str()),
        "the client's node did not send the gRPC connections to the waypoint: {records:#?}"
    );
    Ok(())
}

/// MeshGRPCRouteWeight: calls to `echo:7070` split 70/30 between echo-v1 and echo-v2 (echo-v3,
/// weight 0, gets none), within the suite's tolerance of 5 points over 1,000 calls made on one
/// channel, through the waypoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_grpc_route_weight() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - backendRefs:\n    - {name: echo-v1, port: 7070, weight: 70}\n    - {name: echo-v2, port: 7070, weight: 30}\n    - {name: echo-v3, port: 7070, weight: 0}\n";
    common::apply(
        &mesh.cluster,
        "route.yaml",
        &grpc_route("mesh-grpc-weighted-backends", rules),
    )
    .await?;
    let reply = expect(&mesh, &GrpcCase::default()).await?;
    expect_through_the_waypoint(&mesh, &reply).await?;
    const CALLS: usize = 1000;
    let replies = calls(&mesh, "echo-v1", &[], CALLS)?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for reply in &replies {
        ensure!(reply.code == "OK", "a call failed: {reply:?}");
        *counts
            .entry(reply.pod().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    let share = |pod: &str| counts.get(pod).copied().unwrap_or(0) as f64 / CALLS as f64;
    ensure!(
        counts.len() == 2
            && (share("echo-v1") - 0.7).abs() <= 0.05
            && (share("echo-v2") - 0.3).abs() <= 0.05,
        "{CALLS} calls split {counts:?}: not 70/30 within 5 points"
    );
    Ok(())
}

/// MeshGRPCRouteRequestHeaderModifier: by the `x-test-case` metadata, rules set (overwriting
/// what the client sent), add (appended after the client's value with a comma) and remove
/// metadata, observed by the echo; the last case, from echo-v2, does all three towards echo-v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_grpc_route_request_header_modifier() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rule = |case: &str, modifier: &str, backend: &str| {
        format!(
            "  - matches:\n    - headers:\n      - {{name: x-test-case, value: {case}}}\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n{modifier}    backendRefs:\n    - {{name: {backend}, port: 7070}}\n"
        )
    };
    let rules = [
        rule(
            "set",
            "        set: [{name: x-header-set, value: set-overwrites-values}]\n",
            "echo-v1",
        ),
        rule(
            "add",
            "        add: [{name: x-header-add, value: add-appends-values}]\n",
            "echo-v1",
        ),
        rule("remove", "        remove: [x-header-remove]\n", "echo-v1"),
        rule(
            "multi",
            "        set: [{name: x-header-set-1, value: header-set-1}, {name: x-header-set-2, value: header-set-2}]\n        add: [{name: x-header-add-1, value: header-add-1}, {name: x-header-add-2, value: header-add-2}]\n        remove: [x-header-remove-1, x-header-remove-2]\n",
            "echo-v2",
        ),
    ]
    .concat();
    common::apply(
        &mesh.cluster,
        "route.yaml",
        &grpc_route("grpc-request-header-modifier", &rules),
    )
    .await?;
    let cases = [
        GrpcCase {
            metadata: &[
                ("x-test-case", "set"),
                ("some-other-header", "this-header-should-be-set"),
                ("x-header-set", "this-value-should-be-overwritten"),
            ],
            backend: "echo-v1",
            seen: &[
                ("x-test-case", "set"),
                ("some-other-header", "this-header-should-be-set"),
                ("x-header-set", "set-overwrites-values"),
            ],
            ..GrpcCase::default()
        },
        GrpcCase {
            metadata: &[
                ("x-test-case", "add"),
                ("x-header-add", "this-value-should-be-appended"),
            ],
            backend: "echo-v1",
            seen: &[
                ("x-test-case", "add"),
                (
                    "x-header-add",
                    "this-value-should-be-appended,add-appends-values",
                ),
            ],
            ..GrpcCase::default()
        },
        GrpcCase {
            metadata: &[
                ("x-test-case", "remove"),
                ("x-header-remove", "this-should-be-removed"),
            ],
            backend: "echo-v1",
            seen: &[("x-test-case", "remove")],
            absent: &["x-header-remove"],
            ..GrpcCase::default()
        },
        GrpcCase {
            client: "echo-v2",
            metadata: &[
                ("x-test-case", "multi"),
                ("x-header-set-2", "set-header-2"),
                ("x-header-add-2", "add-header-2"),
                ("x-header-remove-2", "should-be-removed-2"),
            ],
            backend: "echo-v2",
            seen: &[
                ("x-test-case", "multi"),
                ("x-header-set-1", "header-set-1"),
                ("x-header-set-2", "header-set-2"),
                ("x-header-add-1", "header-add-1"),
                ("x-header-add-2", "add-header-2,header-add-2"),
            ],
            absent: &["x-header-remove-1", "x-header-remove-2"],
        },
    ];
    let mut last = None;
    for (i, case) in cases.iter().enumerate() {
        last = Some(
            expect(&mesh, case)
                .await
                .with_context(|| format!("case {i}"))?,
        );
    }
    let last = last.context("no case ran")?;
    expect_through_the_waypoint(&mesh, &last).await
}

/// A call no rule of the Service's GRPCRoute matches is answered by the waypoint in gRPC's
/// terms, as Envoy maps its 404: UNIMPLEMENTED, with the waypoint's reason; the routed method
/// still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrouted_call_is_unimplemented() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let routes = grpc_route(
        "only-echo",
        "  - matches:\n    - method: {service: gateway_api_conformance.echo_basic.grpcecho.GrpcEcho, method: Echo}\n    backendRefs:\n    - {name: echo-v1, port: 7070}\n",
    );
    common::apply(&mesh.cluster, "route.yaml", &routes).await?;
    let other = "/gateway_api_conformance.echo_basic.grpcecho.GrpcEcho/Other";
    let call = |method| -> Result<GrpcReply> {
        mesh.cluster
            .pod(NS, "echo-v1")
            .grpc_call(&GrpcCall {
                authority: Some(AUTHORITY),
                ..GrpcCall::new(echo_address(&mesh), method)
            })?
            .pop()
            .context("no reply")
    };
    common::eventually(common::SETTLE, "the route to be in force", || {
        Ok(call(other)?.code == "UNIMPLEMENTED")
    })
    .await?;
    let unrouted = call(other)?;
    ensure!(
        unrouted.details.as_deref() == Some("route not found"),
        "an unrouted call: {unrouted:?}"
    );
    let routed = call(METHOD)?;
    ensure!(
        routed.code == "OK" && routed.pod() == Some("echo-v1"),
        "the routed method: {routed:?}"
    );
    Ok(())
}

/// A status the echo answers with comes back to the client through the waypoint: 14 is
/// UNAVAILABLE, with the echo's message, and a call without it still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_status_comes_back_through_the_waypoint() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let ok = expect(&mesh, &GrpcCase::default()).await?;
    expect_through_the_waypoint(&mesh, &ok).await?;
    let reply = calls(&mesh, "echo-v1", &[("x-echo-grpc-status", "14")], 1)?
        .pop()
        .context("no reply")?;
    ensure!(
        reply.code == "UNAVAILABLE"
            && reply.details.as_deref() == Some("status requested by x-echo-grpc-status"),
        "the echo's UNAVAILABLE came back as {reply:?}"
    );
    Ok(())
}
