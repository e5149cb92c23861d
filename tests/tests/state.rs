//! End to end, as root: a bad state document is rejected with a clear message and the agent
//! keeps serving the last good state.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::{PORT, SETTLE, eventually, mesh, wait_records};
use mesh_tests::AgentOptions;

const BROKEN: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: intruder
  namespace: shop
spec:
  nodeName: nowhere
status:
  podIP: 10.0.0.300
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_state_is_rejected_and_last_good_state_keeps_serving() -> Result<()> {
    let Some((cluster, mut agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;

    cluster.write_state_file("zz-broken.yaml", BROKEN)?;
    let logged = agents[0].wait_for_log("zz-broken.yaml", SETTLE).await?;
    ensure!(
        logged.contains("intruder") && logged.contains("podIP"),
        "log line lacks object or field: {logged}"
    );
    let status = cluster.cli_json(0, &["status", "-o", "json"])?;
    let error = status["state"]["status"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        error.contains("zz-broken.yaml")
            && error.contains("Pod shop/intruder")
            && error.contains("status.podIP"),
        "status does not name file, object and field: {status}"
    );
    let text = cluster.cli(0, &["status"])?;
    ensure!(
        text.contains("zz-broken.yaml"),
        "status table hides the error:\n{text}"
    );

    // Still enrolled and captured from the last good state.
    web1.send_and_verify(web2.addr(PORT), 64 * 1024).await?;
    wait_records(&cluster, 0, "outbound", web2.addr(PORT), 1).await?;

    // A contradiction: a second pod claiming web-2's address.
    cluster.remove_state_file("zz-broken.yaml")?;
    let twin = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: twin, namespace: shop}}\nspec: {{nodeName: {}}}\nstatus: {{podIP: {}, phase: Running}}\n",
        cluster.node(1).name,
        web2.ip
    );
    cluster.write_state_file("zz-twin.yaml", &twin)?;
    let mut error = String::new();
    eventually(SETTLE, "duplicate IP reported", || {
        let status = cluster.cli_json(1, &["status", "-o", "json"])?;
        error = status["state"]["status"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Ok(!error.is_empty())
    })
    .await?;
    // File, object, field and value of the rejected pod, and the pod it collides with.
    for part in [
        "zz-twin.yaml",
        "Pod shop/twin",
        "status.podIP",
        &web2.ip.to_string(),
        "shop/web-2",
    ] {
        ensure!(
            error.contains(part),
            "duplicate IP error lacks {part:?}: {error}"
        );
    }
    web1.send_and_verify(web2.addr(PORT), 1024).await?;
    wait_records(&cluster, 1, "inbound", web2.addr(PORT), 2).await?;

    // Fixed: the error clears.
    cluster.remove_state_file("zz-twin.yaml")?;
    eventually(SETTLE, "error cleared", || {
        let status = cluster.cli_json(1, &["status", "-o", "json"])?;
        Ok(status["state"]["status"]["last_error"].is_null())
    })
    .await?;

    // An agent started on a broken state refuses to start and says why.
    cluster.write_state_file("zz-broken.yaml", BROKEN)?;
    let mut fresh = cluster
        .start_agent_with(
            0,
            AgentOptions::default()
                .no_wait()
                .arg("--admin-addr")
                .arg("127.0.0.1:15100")
                .arg("--readiness-addr")
                .arg("127.0.0.1:15121"),
        )
        .await?;
    let exit = fresh.wait_exit(Duration::from_secs(10)).await?;
    ensure!(!exit.success(), "agent started on a broken state");
    let log = fresh.log();
    ensure!(
        log.contains("zz-broken.yaml") && log.contains("status.podIP"),
        "start-up error is unclear: {log}"
    );
    Ok(())
}

/// Files the parser must never be handed whole, each with what the rejection must say.
fn hostile_files() -> Vec<(&'static str, String, String)> {
    let rules = "{}, ".repeat(100_001);
    vec![
        (
            "zz-deep.yaml",
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {}",
                "[".repeat(200_000)
            ),
            "nests deeper than 64 levels (line 3)".to_string(),
        ),
        (
            "zz-big.yaml",
            format!("items: [{}", "a, ".repeat(17_000_000)),
            "over the limit of 8388608 bytes".to_string(),
        ),
        (
            "zz-rules.yaml",
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: huge, namespace: shop}}\nspec:\n  rules: [{rules}]\n"
            ),
            "spec.rules: has 100001 rules, over the limit of 1000".to_string(),
        ),
    ]
}

/// Most the agent's resident memory may grow while it refuses one of [`hostile_files`].
const REFUSAL_CEILING_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_deeply_nested_files_are_refused_at_once() -> Result<()> {
    let Some((cluster, agents)) = mesh().await? else {
        return Ok(());
    };
    let pid = agents[0].pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = mesh_tests::resident_kib(pid)?;
    let status = |cluster: &mesh_tests::Cluster| -> Result<serde_json::Value> {
        Ok(cluster.cli_json(0, &["status", "-o", "json"])?["state"].clone())
    };
    for (index, (file, contents, reason)) in hostile_files().into_iter().enumerate() {
        cluster.write_state_file(file, &contents)?;
        drop(contents);
        let written = std::time::Instant::now();
        let mut peak = 0;
        eventually(SETTLE, &format!("{file} refused"), || {
            peak = peak.max(mesh_tests::resident_kib(pid)?);
            let error = status(&cluster)?["status"]["last_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Ok(error.contains(file) && error.contains(&reason))
        })
        .await?;
        let refused_after = written.elapsed();
        ensure!(
            refused_after < Duration::from_secs(1),
            "{file} was refused only after {refused_after:?}"
        );
        ensure!(
            peak <= idle + REFUSAL_CEILING_KIB,
            "refusing {file} took the agent from {idle} to {peak} KiB"
        );

        // Removed and, at the same moment, another change made: it applies at once.
        let workloads = status(&cluster)?["workloads"].as_u64().unwrap_or_default();
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: late-{index}, namespace: legacy}}\nspec: {{nodeName: {}}}\nstatus: {{podIP: 10.250.0.{}, phase: Running}}\n",
            cluster.node(0).name,
            index + 1
        );
        cluster.remove_state_file(file)?;
        cluster.write_state_file(&format!("zz-late-{index}.yaml"), &pod)?;
        let changed = std::time::Instant::now();
        eventually(SETTLE, "the next change applied", || {
            let state = status(&cluster)?;
            Ok(state["status"]["last_error"].is_null()
                && state["workloads"].as_u64() == Some(workloads + 1))
        })
        .await?;
        let applied_after = changed.elapsed();
        ensure!(
            applied_after < Duration::from_secs(1),
            "after {file}, the next change took {applied_after:?} to apply"
        );
        eprintln!(
            "{file}: refused in {refused_after:?}, peak {peak} KiB (idle {idle}), next change applied in {applied_after:?}"
        );
    }
    let after = mesh_tests::resident_kib(pid)?;
    ensure!(
        after <= 2 * idle,
        "after the refusals the agent holds {after} KiB, idle it held {idle}"
    );
    Ok(())
}
