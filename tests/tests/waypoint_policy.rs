//! End to end, as root: Istio's L7 AuthorizationPolicy at a waypoint, on the conformance setup
//! (`common/conformance.rs`): policies attach by `targetRefs` to the Service, the waypoint's
//! Gateway or (from the root namespace) the `istio-waypoint` class; selector policies are not
//! the waypoint's. A denial is Istio's 403 `RBAC: access denied`, seen by curl in the client pod;
//! the waypoint's `/metrics` counts it under the policy's name.

mod common;

use anyhow::{Result, ensure};
use common::conformance::{Case, Mesh, NS, WAYPOINT_POD, conformance_mesh};

fn policy(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n{spec}"
    )
}

/// A case the waypoint must refuse with Istio's denial.
fn denied(path: &'static str) -> Case<'static> {
    Case {
        path,
        status: 403,
        body: Some("RBAC: access denied"),
        ..Case::default()
    }
}

fn allowed(path: &'static str) -> Case<'static> {
    Case {
        path,
        backend: "echo",
        ..Case::default()
    }
}

/// The waypoint's Prometheus text (its pod's :15020).
async fn waypoint_metrics(mesh: &Mesh) -> Result<String> {
    let response = mesh
        .cluster
        .pod(NS, WAYPOINT_POD)
        .netns()
        .http_get("127.0.0.1:15020".parse()?, "/metrics")
        .await?;
    ensure!(response.status == 200, "waypoint metrics: HTTP {}", response.status);
    Ok(response.body)
}

/// Requests the waypoint denied under `policy`.
async fn denied_by(mesh: &Mesh, policy: &str) -> Result<f64> {
    let text = waypoint_metrics(mesh).await?;
    Ok(common::samples(&text, "mesh_agent_requests_denied_total")
        .iter()
        .filter(|(labels, _)| {
            labels.get("policy").map(String::as_str) == Some(policy)
                && labels.get("reporter").map(String::as_str) == Some("waypoint")
        })
        .map(|(_, value)| value)
        .sum())
}

/// Operations, sources and conditions of a Service-attached ALLOW and DENY, path
/// normalization before policy, and a Gateway-attached DENY for every Service the waypoint
/// serves. A selector policy naming the waypoint's pods changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_authorization_by_target() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let client = format!("cluster.local/ns/{NS}/sa/default");
    let policies = [
        policy(
            "echo-allow",
            &format!(
                "  targetRefs: [{{kind: Service, group: \"\", name: echo}}]\n  rules:\n  - from: [{{source: {{principals: [\"{client}\"]}}}}]\n    to: [{{operation: {{methods: [GET, HEAD], paths: [\"/public/*\", \"/items/{{*}}\", /]}}}}]\n  - to: [{{operation: {{methods: [POST]}}}}]\n    when: [{{key: \"request.headers[x-role]\", values: [writer]}}]\n"
            ),
        ),
        policy(
            "echo-deny",
            "  targetRefs: [{kind: Service, group: \"\", name: echo}]\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/public/secret*\"]}}]\n",
        ),
        policy(
            "waypoint-deny",
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: namespace}]\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/gateway-denied]}}]\n",
        ),
        policy(
            "by-selector",
            "  selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: namespace}}\n  action: DENY\n  rules: [{}]\n",
        ),
    ]
    .concat();
    common::apply(&mesh.cluster, "policy.yaml", &policies).await?;
    mesh.expect_all(&[
        allowed("/"),
        allowed("/public/page"),
        allowed("/items/7"),
        // One segment only, as `{*}` is.
        denied("/items/7/parts"),
        // The DENY wins over the ALLOW.
        denied("/public/secret/key"),
        // Not an ALLOW'd path.
        denied("/private"),
        // A Gateway-attached policy applies to every Service behind the waypoint.
        denied("/gateway-denied"),
        Case {
            host: "echo-v1",
            path: "/gateway-denied",
            status: 403,
            body: Some("RBAC: access denied"),
            ..Case::default()
        },
        // echo-v1 has no ALLOW policy of its own: anything else passes.
        Case {
            host: "echo-v1",
            path: "/private",
            backend: "echo-v1",
            ..Case::default()
        },
    ])
    .await?;
    // Dot segments are resolved before policy sees the path (curl must not resolve them).
    let reply = mesh.curl_service("echo", 80, "/public/../private", &["--path-as-is"])?;
    ensure!(
        reply.status == 403 && reply.body == "RBAC: access denied",
        "/public/../private passed the policy as /private: HTTP {} {}",
        reply.status,
        reply.body
    );
    let reply = mesh.curl_service("echo", 80, "/private/../public/x", &["--path-as-is"])?;
    ensure!(
        reply.status == 200 && reply.echo()?.path() == "/public/x",
        "/private/../public/x: HTTP {} {}",
        reply.status,
        reply.body
    );
    // Methods and a header condition.
    let post = mesh.curl_service("echo", 80, "/anything", &["-X", "POST"])?;
    ensure!(post.status == 403, "a POST without x-role: HTTP {}", post.status);
    let post = mesh.curl_service("echo", 80, "/anything", &["-X", "POST", "-H", "x-role: writer"])?;
    ensure!(post.status == 200, "a POST with x-role: writer: HTTP {} {}", post.status, post.body);
    // Counted under the deciding policy; the default denial (no ALLOW matched) as `default`.
    ensure!(
        denied_by(&mesh, &format!("{NS}/echo-deny")).await? >= 1.0
            && denied_by(&mesh, &format!("{NS}/waypoint-deny")).await? >= 2.0
            && denied_by(&mesh, "default").await? >= 2.0,
        "denials not counted by policy:\n{}",
        waypoint_metrics(&mesh).await?
    );
    Ok(())
}

/// A policy attached to the `istio-waypoint` class from the root namespace applies at every
/// waypoint; the same policy in another namespace attaches nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_policy_from_the_root_namespace_applies_everywhere() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let class_policy = |namespace: &str, name: &str, path: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  targetRefs: [{{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}}]\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: [{path}]}}}}]}}]\n"
        )
    };
    let text = [
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n".to_string(),
        class_policy("istio-system", "mesh-wide", "/root-denied"),
        class_policy(NS, "not-root", "/not-root"),
    ]
    .concat();
    common::apply(&mesh.cluster, "policy.yaml", &text).await?;
    mesh.expect_all(&[denied("/root-denied"), allowed("/not-root")])
        .await
}

/// TCP through the waypoint is decided once per connection with L4 semantics: a DENY on the
/// port resets the client's connection; other ports still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_through_the_waypoint_is_authorized() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let client = mesh.cluster.pod(NS, "echo-v1");
    let tcp = std::net::SocketAddr::from((mesh.vip("echo-v2"), 9090));
    common::expect_echo(client, tcp).await?;
    common::apply(
        &mesh.cluster,
        "policy.yaml",
        &policy(
            "no-tcp",
            "  targetRefs: [{kind: Service, group: \"\", name: echo-v2}]\n  action: DENY\n  rules: [{to: [{operation: {ports: [\"9090\"]}}]}]\n",
        ),
    )
    .await?;
    common::eventually(common::SETTLE, "the waypoint to deny TCP to echo-v2:9090", || {
        Ok(futures_block(common::exchange(client, tcp))?.outcome != common::Outcome::Echoed)
    })
    .await?;
    common::expect_reset(client, tcp).await?;
    mesh.expect(&Case {
        host: "echo-v2",
        backend: "echo-v2",
        ..Case::default()
    })
    .await?;
    ensure!(
        denied_by(&mesh, &format!("{NS}/no-tcp")).await? >= 1.0,
        "the TCP denial was not counted:\n{}",
        waypoint_metrics(&mesh).await?
    );
    Ok(())
}

/// Runs a future to completion from a synchronous closure (the test runtime has two workers).
fn futures_block<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}
