//! End to end, as root: Istio's L7 AuthorizationPolicy at a waypoint, on the conformance setup
//! (`common/conformance.rs`): policies attach by `targetRefs` to the Service, the waypoint's
//! Gateway or (from the root namespace) the `istio-waypoint` class; selector policies are not
//! the waypoint's. A denial is Istio's 403 `RBAC: access denied`, seen by curl in the client pod;
//! the waypoint's `/metrics` counts it under the policy's name.

mod common;

use anyhow::{Result, ensure};
use common::conformance::{Case, Mesh, NS, conformance_mesh};

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

/// Requests the waypoint denied under `policy`.
async fn denied_by(mesh: &Mesh, policy: &str) -> Result<f64> {
    let text = mesh.waypoint_metrics().await?;
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
    // `explain` agrees, naming the deciding policy and rule.
    let said = explain(&mesh, "/public/secret/key", None)?;
    ensure!(
        said["status"] == 403
            && said["decision"]["policy"] == format!("{NS}/echo-deny").as_str()
            && said["decision"]["rule"] == 0,
        "explain of a denied request: {said:#}"
    );
    let said = explain(&mesh, "/items/7", None)?;
    ensure!(
        said["status"].is_null()
            && said["decision"]["policy"] == format!("{NS}/echo-allow").as_str()
            && said["backends"][0]["service"] == format!("{NS}/echo:80").as_str(),
        "explain of an allowed request: {said:#}"
    );
    let said = explain(&mesh, "/public/../private", None)?;
    ensure!(
        said["status"] == 403 && said["path"] == "/private",
        "explain of a path with dot segments: {said:#}"
    );
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
    ensure!(
        post.status == 403,
        "a POST without x-role: HTTP {}",
        post.status
    );
    let post = mesh.curl_service(
        "echo",
        80,
        "/anything",
        &["-X", "POST", "-H", "x-role: writer"],
    )?;
    ensure!(
        post.status == 200,
        "a POST with x-role: writer: HTTP {} {}",
        post.status,
        post.body
    );
    // Counted under the deciding policy; the default denial (no ALLOW matched) as `default`.
    ensure!(
        denied_by(&mesh, &format!("{NS}/echo-deny")).await? >= 1.0
            && denied_by(&mesh, &format!("{NS}/waypoint-deny")).await? >= 2.0
            && denied_by(&mesh, "default").await? >= 2.0,
        "denials not counted by policy:\n{}",
        mesh.waypoint_metrics().await?
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
    common::eventually(
        common::SETTLE,
        "the waypoint to deny TCP to echo-v2:9090",
        || Ok(futures_block(common::exchange(client, tcp))?.outcome != common::Outcome::Echoed),
    )
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
        mesh.waypoint_metrics().await?
    );
    Ok(())
}

/// Runs a future to completion from a synchronous closure (the test runtime has two workers).
fn futures_block<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

/// `mesh-agent explain` on node 0 of a GET of `path` from echo-v1 to Service `echo` port 80,
/// with `header` (a whole `authorization: Bearer ...` line) if any: its HTTP section.
fn explain(mesh: &Mesh, path: &str, header: Option<&str>) -> Result<serde_json::Value> {
    let from = format!("{NS}/echo-v1");
    let to = format!("{}:80", mesh.vip("echo"));
    let mut args = vec![
        "explain", "--from", &from, "--to", &to, "--path", path, "-o", "json",
    ];
    if let Some(header) = header {
        args.extend(["-H", header]);
    }
    let explanation = mesh.cluster.cli_json(0, &args)?;
    let http = explanation["http"].clone();
    ensure!(
        http.is_object(),
        "explain gave no HTTP verdict: {explanation:#}"
    );
    Ok(http)
}

/// Serves `body` as `application/json` at any path on `listener` (a key set at a `jwksUri`),
/// counting the requests.
fn serve_json(
    listener: tokio::net::TcpListener,
    body: String,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::{Arc, atomic::AtomicUsize};
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (body, count) = (body.clone(), count.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut response = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(body.clone()),
                    ));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (task, served)
}

/// Istio's TestL7JWT outcomes at a waypoint: a RequestAuthentication (inline `jwks`) and an
/// AuthorizationPolicy requiring one subject, both attached to the Service, with `/healthz`
/// open. No token: 403; the allowed subject: 200; an expired token: 401; another subject: 403;
/// `/healthz` without a token: 200; a token of an issuer that only a selector policy names:
/// 401. A second issuer's keys come from a `jwksUri`, fetched once and cached. The token is
/// taken out before the endpoint and a claim is passed on as a header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_outcomes_as_istio() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let inline = mesh_tests::jwt::Issuer::new("https://inline.example", "k1")?;
    let remote = mesh_tests::jwt::Issuer::new("https://remote.example", "k2")?;
    let ignored = mesh_tests::jwt::Issuer::new("https://selector-only.example", "k3")?;
    // The remote issuer's keys, served from echo-v2's pod (the waypoint's own pod is not
    // captured, so it fetches them directly).
    let echo_v2 = mesh.cluster.pod(NS, "echo-v2");
    let (_jwks_server, fetched) = serve_json(echo_v2.listen(8099).await?, remote.jwks_text());
    let jwks_uri = format!("http://{}:8099/keys", echo_v2.ip);
    let state = [
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: {NS}}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: echo}}]\n  jwtRules:\n  - issuer: {}\n    jwks: '{}'\n    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]\n  - issuer: {}\n    jwksUri: {jwks_uri}\n",
            inline.issuer,
            inline.jwks_text(),
            remote.issuer,
        ),
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: by-selector, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{gateway.networking.k8s.io/gateway-name: namespace}}}}\n  jwtRules:\n  - issuer: {}\n    jwks: '{}'\n",
            ignored.issuer,
            ignored.jwks_text(),
        ),
        policy(
            "require-jwt",
            &format!(
                "  targetRefs: [{{kind: Service, group: \"\", name: echo}}]\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"{}/allowed\", \"{}/remote-user\"]}}}}]\n  - to: [{{operation: {{paths: [/healthz]}}}}]\n",
                inline.issuer,
                remote.issuer
            ),
        ),
    ]
    .concat();
    common::apply(&mesh.cluster, "policy.yaml", &state).await?;
    let bearer = |token: &str| format!("Authorization: Bearer {token}");
    let allowed = bearer(&inline.token_for("allowed", &serde_json::json!({}))?);
    let other = bearer(&inline.token_for("someone-else", &serde_json::json!({}))?);
    let now = mesh_tests::jwt::now();
    let expired = bearer(&inline.token_for(
        "allowed",
        &serde_json::json!({"iat": now - 7200, "exp": now - 3600}),
    )?);
    let unknown = bearer(&ignored.token_for("allowed", &serde_json::json!({}))?);
    let remote_user = bearer(&remote.token_for("remote-user", &serde_json::json!({}))?);
    // In force once a request without a token is refused.
    mesh.expect(&Case {
        status: 403,
        body: Some("RBAC: access denied"),
        ..Case::default()
    })
    .await?;
    let cases: [(&str, Option<&str>, u16, &str); 6] = [
        ("/", None, 403, "RBAC: access denied"),
        ("/", Some(&allowed), 200, ""),
        ("/", Some(&expired), 401, "Jwt is expired"),
        ("/", Some(&other), 403, "RBAC: access denied"),
        ("/healthz", None, 200, ""),
        ("/", Some(&unknown), 401, "Jwt issuer is not configured"),
    ];
    for (path, header, status, body) in cases {
        let args: Vec<&str> = header.iter().flat_map(|h| ["-H", *h]).collect();
        let reply = mesh.curl_service("echo", 80, path, &args)?;
        // `explain` on node 0, asked the same request, must say the same.
        let explained = explain(&mesh, path, header)?;
        let said = explained["status"].as_u64().map_or(200, |s| s as u16);
        ensure!(
            said == status,
            "explain says {said} for GET {path} ({}), curl got {status}: {explained:#}",
            if header.is_some() {
                "with a token"
            } else {
                "no token"
            }
        );
        ensure!(
            reply.status == status && (body.is_empty() || reply.body == body),
            "GET {path} with {:?}: HTTP {} {:?}, not {status} {body:?}",
            header.map(|h| &h[..30.min(h.len())]),
            reply.status,
            reply.body
        );
        if status == 200 && header.is_some() {
            let echo = reply.echo()?;
            ensure!(
                echo.header("authorization").is_none()
                    && echo.header("x-jwt-sub").as_deref() == Some("allowed"),
                "the endpoint saw authorization {:?} and x-jwt-sub {:?}",
                echo.header("authorization"),
                echo.header("x-jwt-sub")
            );
        }
    }
    // The jwksUri issuer: its keys are fetched once and then cached.
    for _ in 0..3 {
        let reply = mesh.curl_service("echo", 80, "/", &["-H", &remote_user])?;
        ensure!(
            reply.status == 200,
            "a token of the jwksUri issuer: HTTP {} {}",
            reply.status,
            reply.body
        );
    }
    let fetches = fetched.load(std::sync::atomic::Ordering::SeqCst);
    ensure!(
        fetches == 1,
        "the jwksUri was fetched {fetches} times for 3 requests"
    );
    ensure!(
        denied_by(&mesh, "default").await? >= 2.0,
        "denials not counted:\n{}",
        mesh.waypoint_metrics().await?
    );
    Ok(())
}
