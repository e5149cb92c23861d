//! End to end, as root: Istio AuthorizationPolicy (L4) and PeerAuthentication, enforced at the
//! destination's node, and `mesh-agent explain` agrees with what actually happens in every case.

mod common;

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use common::{DENIAL_DEADLINE, Outcome, STRICT, apply, exchange, expect_reset};
use mesh_tests::{Cluster, ClusterSpec, MODE_AMBIENT, MODE_LABEL, PodSpec};

const WEB: &str = "cluster.local/ns/shop/sa/web";

/// The server is `shop/web-2` on node 1. Clients on node 0: `shop/web-1`, `ops/ops-1` (enrolled)
/// and `legacy/batch-1` (plain); on node 1, the server's own node: `ops/ops-2` (enrolled, served
/// in-process by one proxy) and `legacy/batch-2` (plain).
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
            PodSpec::new("ops", "ops-2", 1)
                .service_account("ops")
                .label("app", "ops"),
        )
        .pod(
            PodSpec::new("legacy", "batch-1", 0)
                .service_account("batch")
                .label("app", "batch"),
        )
        .pod(
            PodSpec::new("legacy", "batch-2", 1)
                .service_account("batch")
                .label("app", "batch"),
        )
}

fn authz(namespace: &str, name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{body}"
    )
}

/// A PeerAuthentication in `shop` for the `app: web` pods.
fn web_peer_authentication(name: &str, mtls: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {{app: web}}\n{mtls}"
    )
}

struct Case {
    name: &'static str,
    yaml: String,
    /// (client namespace/name, port on web-2, allowed)
    expect: Vec<(&'static str, u16, bool)>,
    /// Every connection of the case must make web-2's agent log one line containing this (and
    /// the client's address).
    logs: Option<&'static str>,
}

fn case(name: &'static str, yaml: String, expect: Vec<(&'static str, u16, bool)>) -> Case {
    Case {
        name,
        yaml,
        expect,
        logs: None,
    }
}

fn cases(batch_ip: Ipv4Addr) -> Vec<Case> {
    vec![
        case(
            "no policy: everything allowed",
            "# no policies\n".into(),
            vec![
                ("shop/web-1", 8080, true),
                ("ops/ops-1", 8080, true),
                ("legacy/batch-1", 8080, true),
                ("ops/ops-2", 8080, true),
                ("legacy/batch-2", 8080, true),
            ],
        ),
        case(
            "ALLOW by principal, with selector",
            authz(
                "shop",
                "allow-web",
                &format!("spec:\n  selector:\n    matchLabels: {{app: web}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{WEB}\"]\n"),
            ),
            vec![
                ("shop/web-1", 8080, true),
                ("ops/ops-1", 8080, false),
                ("legacy/batch-1", 8080, false),
                ("ops/ops-2", 8080, false),
                ("legacy/batch-2", 8080, false),
            ],
        ),
        case(
            "DENY by namespace, namespace-wide",
            authz("shop", "deny-ops", "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [ops]\n"),
            vec![
                ("shop/web-1", 8080, true),
                ("ops/ops-1", 8080, false),
                ("legacy/batch-1", 8080, true),
                ("ops/ops-2", 8080, false),
                ("legacy/batch-2", 8080, true),
            ],
        ),
        case(
            "ALLOW by destination port",
            authz("shop", "allow-9090", "spec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"9090\"]\n"),
            vec![
                ("shop/web-1", 8080, false),
                ("shop/web-1", 9090, true),
                ("ops/ops-2", 8080, false),
                ("ops/ops-2", 9090, true),
            ],
        ),
        case(
            "ALLOW notPrincipals",
            authz(
                "shop",
                "allow-not-web",
                &format!("spec:\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"{WEB}\"]\n"),
            ),
            vec![("shop/web-1", 8080, false), ("ops/ops-1", 8080, true), ("ops/ops-2", 8080, true)],
        ),
        case(
            "ALLOW by ipBlocks (plaintext source)",
            authz("shop", "allow-batch-ip", &format!("spec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{batch_ip}/32\"]\n")),
            vec![
                ("legacy/batch-1", 8080, true),
                ("shop/web-1", 8080, false),
                ("legacy/batch-2", 8080, false),
            ],
        ),
        case(
            "DENY notNamespaces",
            authz("shop", "deny-not-shop", "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        notNamespaces: [shop]\n"),
            vec![("shop/web-1", 8080, true), ("ops/ops-1", 8080, false), ("ops/ops-2", 8080, false)],
        ),
        case(
            "DENY wins over ALLOW",
            format!(
                "{}---\n{}",
                authz("shop", "allow-all", "spec:\n  action: ALLOW\n  rules:\n  - {}\n"),
                authz("shop", "deny-web", &format!("spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"{WEB}\"]\n"))
            ),
            vec![("shop/web-1", 8080, false), ("ops/ops-1", 8080, true), ("ops/ops-2", 8080, true)],
        ),
        case(
            "when conditions",
            authz(
                "shop",
                "allow-when",
                "spec:\n  rules:\n  - when:\n    - key: destination.port\n      values: [\"9090\"]\n    - key: source.namespace\n      values: [shop]\n",
            ),
            vec![("shop/web-1", 9090, true), ("shop/web-1", 8080, false), ("ops/ops-1", 9090, false), ("ops/ops-2", 9090, false)],
        ),
        case(
            "L7-only attributes fail closed at L4",
            authz("shop", "allow-get", "spec:\n  rules:\n  - to:\n    - operation:\n        methods: [GET]\n"),
            vec![("shop/web-1", 8080, false), ("ops/ops-1", 8080, false), ("ops/ops-2", 8080, false)],
        ),
        // Remote IPs are what a proxy in front forwarded: L7, as in ztunnel (issue 9, item 15).
        case(
            "remoteIpBlocks is L7: an ALLOW rule with it never matches",
            authz("shop", "allow-batch-remote", &format!("spec:\n  rules:\n  - from:\n    - source:\n        remoteIpBlocks: [\"{batch_ip}/32\"]\n")),
            vec![("legacy/batch-1", 8080, false), ("shop/web-1", 8080, false)],
        ),
        case(
            "when remote.ip is L7 as well",
            authz("shop", "allow-batch-remote-when", &format!("spec:\n  rules:\n  - when:\n    - key: remote.ip\n      values: [\"{batch_ip}\"]\n")),
            vec![("legacy/batch-1", 8080, false), ("shop/web-1", 8080, false)],
        ),
        case(
            "a DENY rule ignores remoteIpBlocks and still denies by namespace",
            authz("shop", "deny-ops-remote", "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [ops]\n        remoteIpBlocks: [\"192.0.2.1/32\"]\n"),
            vec![("ops/ops-1", 8080, false), ("shop/web-1", 8080, true), ("legacy/batch-1", 8080, true)],
        ),
        Case {
            logs: Some("would deny"),
            ..case(
                "dry-run only logs",
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all-dry\n  namespace: shop\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  action: DENY\n  rules:\n  - {}\n".into(),
                vec![("shop/web-1", 8080, true), ("ops/ops-1", 8080, true), ("ops/ops-2", 8080, true)],
            )
        },
        case(
            "mesh-wide policy in the root namespace",
            authz("istio-system", "deny-ops-everywhere", "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [ops]\n"),
            vec![("shop/web-1", 8080, true), ("ops/ops-1", 8080, false), ("ops/ops-2", 8080, false)],
        ),
        case(
            "PeerAuthentication STRICT refuses plaintext",
            STRICT.into(),
            vec![
                ("legacy/batch-1", 8080, false),
                ("legacy/batch-2", 8080, false),
                ("shop/web-1", 8080, true),
                ("ops/ops-2", 8080, true),
            ],
        ),
        case(
            "PERMISSIVE admits plaintext and policy still applies",
            format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: permissive\n  namespace: shop\nspec:\n  mtls:\n    mode: PERMISSIVE\n---\n{}",
                authz("shop", "deny-batch-ip", &format!("spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{batch_ip}/32\"]\n    to:\n    - operation:\n        ports: [\"9090\"]\n"))
            ),
            vec![
                ("legacy/batch-1", 8080, true),
                ("legacy/batch-1", 9090, false),
                ("legacy/batch-2", 9090, true),
                ("shop/web-1", 9090, true),
            ],
        ),
        case(
            "namespace STRICT, workload PERMISSIVE: the workload wins",
            format!("{STRICT}---\n{}", web_peer_authentication("web-permissive", "  mtls:\n    mode: PERMISSIVE\n")),
            vec![("legacy/batch-1", 8080, true), ("legacy/batch-2", 8080, true), ("shop/web-1", 8080, true)],
        ),
        case(
            "namespace STRICT, workload PERMISSIVE for other pods: still STRICT",
            format!(
                "{STRICT}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: ops-permissive\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {{app: ops}}\n  mtls:\n    mode: PERMISSIVE\n"
            ),
            vec![("legacy/batch-1", 8080, false), ("shop/web-1", 8080, true)],
        ),
        case(
            "workload STRICT with port 9090 PERMISSIVE",
            web_peer_authentication("web-strict", "  mtls:\n    mode: STRICT\n  portLevelMtls:\n    9090:\n      mode: PERMISSIVE\n"),
            vec![
                ("legacy/batch-1", 8080, false),
                ("legacy/batch-1", 9090, true),
                ("legacy/batch-2", 9090, true),
                ("shop/web-1", 8080, true),
            ],
        ),
        case(
            "namespace STRICT, workload port 9090 PERMISSIVE, workload mode unset (inherits STRICT)",
            format!("{STRICT}---\n{}", web_peer_authentication("web-9090", "  portLevelMtls:\n    9090:\n      mode: PERMISSIVE\n")),
            vec![("legacy/batch-1", 8080, false), ("legacy/batch-2", 8080, false), ("legacy/batch-1", 9090, true)],
        ),
        case(
            "namespace PERMISSIVE, workload port 9090 STRICT",
            web_peer_authentication("web-9090-strict", "  mtls:\n    mode: PERMISSIVE\n  portLevelMtls:\n    9090:\n      mode: STRICT\n"),
            vec![
                ("legacy/batch-1", 8080, true),
                ("legacy/batch-1", 9090, false),
                ("legacy/batch-2", 9090, false),
                ("shop/web-1", 9090, true),
            ],
        ),
    ]
}

/// Waits until node `node`'s agent has counted `want` denials in all, and fails if it counts
/// more (a denial counted twice, or one that should not have been).
async fn wait_denied(cluster: &Cluster, node: usize, want: u64) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = common::denied_total(cluster, node).await?;
        if now == want {
            return Ok(());
        }
        if now > want || tokio::time::Instant::now() > deadline {
            bail!("node {node} counted {now} denials, expected {want}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_and_explain_agrees() -> Result<()> {
    let Some((cluster, agents)) = common::mesh_of(spec(), &[]).await? else {
        return Ok(());
    };
    let web2 = cluster.pod("shop", "web-2");
    let _servers = (web2.echo_server(8080).await?, web2.echo_server(9090).await?);
    let batch_ip = cluster.pod("legacy", "batch-1").ip;

    let mut failures = Vec::new();
    let mut denied = common::denied_total(&cluster, 1).await?;
    for case in cases(batch_ip) {
        apply(&cluster, "policy.yaml", &case.yaml)
            .await
            .with_context(|| case.name)?;
        for (client, port, allowed) in &case.expect {
            let (ns, name) = client.split_once('/').context("client name")?;
            let pod = cluster.pod(ns, name);
            let to = web2.addr(*port);
            let what = format!("{}: {client} -> :{port}", case.name);
            let mark = agents[1].log_mark();
            let common::Exchanged { outcome, took, .. } = exchange(pod, to).await?;
            // Allowed: the echo; denied: a reset, at once, counted once by web-2's node.
            let expected = if *allowed {
                Outcome::Echoed
            } else {
                Outcome::Reset
            };
            if outcome != expected || (!allowed && took > DENIAL_DEADLINE) {
                failures.push(format!(
                    "{what}: expected {expected:?}, got {outcome:?} after {took:?}"
                ));
            }
            if !allowed {
                denied += 1;
            }
            if let Err(e) = wait_denied(&cluster, 1, denied).await {
                failures.push(format!("{what}: {e:#}"));
                denied = common::denied_total(&cluster, 1).await?;
            }
            let explained = cluster.cli_json(
                1,
                &[
                    "explain",
                    "--from",
                    client,
                    "--to",
                    &to.to_string(),
                    "-o",
                    "json",
                ],
            )?;
            let predicted = explained["paths"][0]["allowed"].as_bool();
            if predicted != Some(*allowed) {
                failures.push(format!(
                    "{what}: expected {allowed}, explain {predicted:?} ({})",
                    explained["summary"]
                ));
            }
            if let Some(needle) = case.logs {
                let client_addr = format!("src={}:", pod.ip);
                let lines: Vec<String> = agents[1]
                    .log_since(mark)
                    .into_iter()
                    .filter(|l| l.contains(needle) && l.contains(&client_addr))
                    .collect();
                if lines.len() != 1 {
                    failures.push(format!(
                        "{what}: expected one log line with {needle:?} and {client_addr}, got {lines:#?}"
                    ));
                }
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} policy check(s) failed:\n{}",
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
    let server = web2.echo_server(8080).await?;
    apply(&cluster, "policy.yaml", &authz("shop", "deny-ops", "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [ops]\n")).await?;
    let mark = agents[1].log_mark();
    let ops1 = cluster.pod("ops", "ops-1");
    expect_reset(ops1, web2.addr(8080)).await?;
    let line = agents[1]
        .wait_for_log_since(mark, "connection denied", Duration::from_secs(15))
        .await?;
    ensure!(
        line.contains("shop/deny-ops") && line.contains(&format!("src={}:", ops1.ip)),
        "denial log lacks the policy or the client: {line}"
    );
    ensure!(
        agents[1].log_lines_since(mark, "connection denied").len() == 1,
        "one denial, several log lines: {:#?}",
        agents[1].log_since(mark)
    );
    ensure!(
        server.accepted() == 0,
        "the denied connection reached the server"
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
                && l.contains("policy=\"shop/deny-ops\"")
                && l.ends_with(" 1")),
        "denial not counted once:\n{metrics}"
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
    // A plaintext pod is refused, from the other node and from the pod's own node.
    expect_reset(cluster.pod("legacy", "batch-1"), web2.addr(8080)).await?;
    expect_reset(cluster.pod("legacy", "batch-2"), web2.addr(8080)).await?;
    let before = common::counter(&cluster, 1, "host_own")?;
    let node = cluster.node(web2.node);
    let mut probe = node.netns().connect(web2.addr(8080)).await?;
    ensure!(
        common::echoes(&mut probe).await,
        "no echo to the node's probe"
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
