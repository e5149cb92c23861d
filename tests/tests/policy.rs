//! End to end, as root: Istio AuthorizationPolicy (L4) and PeerAuthentication, enforced at the
//! destination's node, and `mesh-agent explain` agrees with what actually happens in every case.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{apply, exchange};
use mesh_tests::{ClusterSpec, MODE_AMBIENT, MODE_LABEL, PodSpec};

const WEB: &str = "cluster.local/ns/shop/sa/web";
/// PeerAuthentication: STRICT for the whole `shop` namespace.
const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n";

fn spec() -> ClusterSpec {
    ClusterSpec::new()
        .namespace("shop", &[(MODE_LABEL, MODE_AMBIENT)])
        .namespace("ops", &[(MODE_LABEL, MODE_AMBIENT)])
        .namespace("legacy", &[])
        .namespace("istio-system", &[])
        .pod(
            PodSpec::new("shop", "web-1", 0)
                .service_account("web")
                .label("app", "web"),
        )
        .pod(
            PodSpec::new("shop", "web-2", 1)
                .service_account("web")
                .label("app", "web"),
        )
        .pod(
            PodSpec::new("ops", "ops-1", 0)
                .service_account("ops")
                .label("app", "ops"),
        )
        .pod(
            PodSpec::new("legacy", "batch-1", 0)
                .service_account("batch")
                .label("app", "batch"),
        )
}

fn authz(namespace: &str, name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{body}"
    )
}

struct Case {
    name: &'static str,
    yaml: String,
    /// (client namespace/name, port on web-2, allowed)
    expect: Vec<(&'static str, u16, bool)>,
}

fn cases(batch_ip: std::net::Ipv4Addr) -> Vec<Case> {
    vec![
        Case {
            name: "no policy: everything allowed",
            yaml: "# no policies\n".into(),
            expect: vec![("shop/web-1", 8080, true), ("ops/ops-1", 8080, true), ("legacy/batch-1", 8080, true)],
        },
        Case {
            name: "ALLOW by principal, with selector",
            yaml: authz(
                "shop",
                "allow-web",
                &format!("spec:\n  selector:\n    matchLabels: {{app: web}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{WEB}\"]\n"),
            ),
            expect: vec![("shop/web-1", 8080, true), ("ops/ops-1", 8080, false), ("legacy/batch-1", 8080, false)],
        },
        Case {
            name: "DENY by namespace, namespace-wide",
            yaml: authz("shop", "deny-ops", "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [ops]\n"),
            expect: vec![("shop/web-1", 8080, true), ("ops/ops-1", 8080, false), ("legacy/batch-1", 8080, true)],
        },
        Case {
            name: "ALLOW by destination port",
            yaml: authz("shop", "allow-9090", "spec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"9090\"]\n"),
            expect: vec![("shop/web-1", 8080, false), ("shop/web-1", 9090, true)],
        },
        Case {
            name: "ALLOW notPrincipals",
            yaml: authz(
                "shop",
                "allow-not-web",
                &format!("spec:\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"{WEB}\"]\n"),
            ),
            expect: vec![("shop/web-1", 8080, false), ("ops/ops-1", 8080, true)],
        },
        Case {
            name: "ALLOW by ipBlocks (plaintext source)",
            yaml: authz("shop", "allow-batch-ip", &format!("spec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{batch_ip}/32\"]\n")),
            expect: vec![("legacy/batch-1", 8080, true), ("shop/web-1", 8080, false)],
        },
        Case {
            name: "DENY notNamespaces",
            yaml: authz("shop", "deny-not-shop", "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        notNamespaces: [shop]\n"),
            expect: vec![("shop/web-1", 8080, true), ("ops/ops-1", 8080, false)],
        },
        Case {
            name: "DENY wins over ALLOW",
            yaml: format!(
                "{}---\n{}",
                authz("shop", "allow-all", "spec:\n  action: ALLOW\n  rules:\n  - {}\n"),
                authz("shop", "deny-web", &format!("spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"{WEB}\"]\n"))
            ),
            expect: vec![("shop/web-1", 8080, false), ("ops/ops-1", 8080, true)],
        },
        Case {
            name: "when conditions",
            yaml: authz(
                "shop",
                "allow-when",
                "spec:\n  rules:\n  - when:\n    - key: destination.port\n      values: [\"9090\"]\n    - key: source.namespace\n      values: [shop]\n",
            ),
            expect: vec![("shop/web-1", 9090, true), ("shop/web-1", 8080, false), ("ops/ops-1", 9090, false)],
        },
        Case {
            name: "L7-only attributes fail closed at L4",
            yaml: authz("shop", "allow-get", "spec:\n  rules:\n  - to:\n    - operation:\n        methods: [GET]\n"),
            expect: vec![("shop/web-1", 8080, false), ("ops/ops-1", 8080, false)],
        },
        Case {
            name: "dry-run only logs",
            yaml: "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all-dry\n  namespace: shop\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  action: DENY\n  rules:\n  - {}\n".into(),
            expect: vec![("shop/web-1", 8080, true), ("ops/ops-1", 8080, true)],
        },
        Case {
            name: "mesh-wide policy in the root namespace",
            yaml: authz("istio-system", "deny-ops-everywhere", "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [ops]\n"),
            expect: vec![("shop/web-1", 8080, true), ("ops/ops-1", 8080, false)],
        },
        Case {
            name: "PeerAuthentication STRICT refuses plaintext",
            yaml: STRICT.into(),
            expect: vec![("legacy/batch-1", 8080, false), ("shop/web-1", 8080, true)],
        },
        Case {
            name: "PERMISSIVE admits plaintext and policy still applies",
            yaml: format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: permissive\n  namespace: shop\nspec:\n  mtls:\n    mode: PERMISSIVE\n---\n{}",
                authz("shop", "deny-batch-ip", &format!("spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{batch_ip}/32\"]\n    to:\n    - operation:\n        ports: [\"9090\"]\n"))
            ),
            expect: vec![("legacy/batch-1", 8080, true), ("legacy/batch-1", 9090, false), ("shop/web-1", 9090, true)],
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_and_explain_agrees() -> Result<()> {
    let Some((cluster, _agents)) = common::mesh_of(spec(), &[]).await? else {
        return Ok(());
    };
    let web2 = cluster.pod("shop", "web-2");
    let _servers = (web2.echo_server(8080).await?, web2.echo_server(9090).await?);
    let batch_ip = cluster.pod("legacy", "batch-1").ip;

    let mut failures = Vec::new();
    for case in cases(batch_ip) {
        apply(&cluster, "policy.yaml", &case.yaml)
            .await
            .with_context(|| case.name)?;
        for (client, port, allowed) in &case.expect {
            let (ns, name) = client.split_once('/').context("client name")?;
            let pod = cluster.pod(ns, name);
            let actual = exchange(pod, web2.addr(*port)).await?;
            let to = web2.addr(*port).to_string();
            let explained =
                cluster.cli_json(1, &["explain", "--from", client, "--to", &to, "-o", "json"])?;
            let predicted = explained["paths"][0]["allowed"].as_bool();
            if actual != *allowed || predicted != Some(*allowed) {
                failures.push(format!(
                    "{}: {client} -> :{port}: expected {allowed}, connection {actual}, explain {predicted:?} ({})",
                    case.name, explained["summary"]
                ));
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} policy case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_are_reset_counted_and_logged_with_the_policy() -> Result<()> {
    let Some((cluster, mut agents)) = common::mesh_of(spec(), &[]).await? else {
        return Ok(());
    };
    let web2 = cluster.pod("shop", "web-2");
    let _server = web2.echo_server(8080).await?;
    apply(&cluster, "policy.yaml", &authz("shop", "deny-ops", "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [ops]\n")).await?;
    ensure!(!exchange(cluster.pod("ops", "ops-1"), web2.addr(8080)).await?);
    let line = agents[1]
        .wait_for_log("connection denied", Duration::from_secs(3))
        .await?;
    ensure!(
        line.contains("shop/deny-ops"),
        "denial log lacks the policy: {line}"
    );
    let view = cluster.cli_json(1, &["connections", "-o", "json"])?;
    ensure!(
        view["totals"]["denied"].as_u64() == Some(1),
        "{}",
        view["totals"]
    );
    let metrics = common::metrics(&cluster, 1).await?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_agent_connections_denied_total{")
                && l.contains("policy=\"shop/deny-ops\"")),
        "denial not counted:\n{metrics}"
    );
    let policies = cluster.cli_json(1, &["policies", "-o", "json"])?;
    ensure!(
        policies.to_string().contains("deny-ops"),
        "policies view: {policies}"
    );
    Ok(())
}

/// Kubelet probes come from the pod's node. As in Istio ambient, where host traffic to ambient
/// pods bypasses ztunnel, the node's own connections are not captured: STRICT does not refuse a
/// pod's health probes, while a plaintext client pod is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_leaves_the_nodes_own_probes_alone() -> Result<()> {
    let Some((cluster, _agents)) = common::mesh_of(spec(), &[]).await? else {
        return Ok(());
    };
    let web2 = cluster.pod("shop", "web-2");
    let _server = web2.echo_server(8080).await?;
    apply(&cluster, "policy.yaml", STRICT).await?;
    ensure!(
        !exchange(cluster.pod("legacy", "batch-1"), web2.addr(8080)).await?,
        "STRICT let a plaintext pod in"
    );
    let before = common::counter(&cluster, 1, "host_own")?;
    let node = cluster.node(web2.node);
    let mut probe = node.netns().connect(web2.addr(8080)).await?;
    ensure!(
        common::echoes(&mut probe).await,
        "no echo to the node's probe within 5 s"
    );
    ensure!(
        common::counter(&cluster, 1, "host_own")? > before,
        "the node's probe was not recognised as the node's own traffic"
    );
    let view = cluster.cli_json(1, &["connections", "-o", "json"])?;
    ensure!(
        view["totals"]["inbound_opened"].as_u64() == Some(0),
        "the node's probe went through the proxy: {}",
        view["totals"]
    );
    // explain agrees: from the node itself, allowed, not captured.
    let node_ip = probe.local_addr()?.ip().to_string();
    let to = web2.addr(8080).to_string();
    let explained = cluster.cli_json(
        1,
        &["explain", "--from", &node_ip, "--to", &to, "-o", "json"],
    )?;
    let path = &explained["paths"][0];
    ensure!(
        path["allowed"] == true
            && path["route"] == "host"
            && path["captured_at_destination"] == false,
        "explain disagrees for the node's probe: {explained}"
    );
    Ok(())
}
