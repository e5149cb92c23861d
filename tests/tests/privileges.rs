//! End to end, as root: least privilege proven, not claimed. The capabilities come from the
//! DaemonSet manifest itself (`deploy/daemonset.yaml`); the agents run with exactly those
//! (bounding, permitted and effective sets, no inheritable or ambient ones, via `setpriv`) and
//! the mesh works; with any one of them taken away, the agent refuses to start and names it.
//! The same for the host mounts the manifest gives the agent: with any one of them absent
//! (unmounted in a private mount namespace, so the container would see sysfs's empty
//! directory), the agent refuses to start and names it.

mod common;

use std::{os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use common::{PORT, wait_records};
use mesh_tests::{AgentOptions, Cluster, ClusterSpec};
use serde_json::Value;

/// The pod spec of the shipped DaemonSet (`deploy/daemonset.yaml`).
fn manifest_pod_spec() -> Result<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let daemonset: Value = serde_yaml::from_str(&text)?;
    Ok(daemonset["spec"]["template"]["spec"].clone())
}

/// The `mesh-agent` container of a pod spec.
fn agent_container(spec: &Value) -> Result<&Value> {
    spec["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "mesh-agent"))
        .context("no mesh-agent container in deploy/daemonset.yaml")
}

/// `securityContext.capabilities` of the `mesh-agent` container of the shipped DaemonSet.
fn manifest_capabilities() -> Result<(Vec<String>, Vec<String>)> {
    let spec = manifest_pod_spec()?;
    let container = agent_container(&spec)?;
    let list = |key: &str| -> Vec<String> {
        container["securityContext"]["capabilities"][key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect()
    };
    Ok((list("add"), list("drop")))
}

/// The `mountPath`s of the `mesh-agent` container's hostPath volumes in the shipped DaemonSet.
fn manifest_host_mounts() -> Result<Vec<String>> {
    let spec = manifest_pod_spec()?;
    let host_volumes: Vec<&str> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["hostPath"].is_object())
        .filter_map(|v| v["name"].as_str())
        .collect();
    Ok(agent_container(&spec)?["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            m["name"]
                .as_str()
                .is_some_and(|n| host_volumes.contains(&n))
        })
        .filter_map(|m| m["mountPath"].as_str().map(str::to_owned))
        .collect())
}

/// What the agent says when the host mount at `path` is missing.
fn missing_mount_error(path: &str) -> Result<&'static str> {
    Ok(match path {
        "/sys/fs/bpf" => "bpffs is not mounted at /sys/fs/bpf",
        "/sys/fs/cgroup" => "cgroup v2 is not mounted",
        other => anyhow::bail!("host mount {other} is not known to this test"),
    })
}

/// Bit numbers of the capabilities `setpriv` and the kernel know by these names.
fn bit(name: &str) -> Result<u32> {
    Ok(match name {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => anyhow::bail!("capability {other} is not known to this test"),
    })
}

/// A wrapper that runs the agent with exactly `capabilities` (Kubernetes names, no `CAP_`).
fn confined_agent(cluster: &Cluster, capabilities: &[String], tag: &str) -> Result<PathBuf> {
    confined_agent_without(cluster, capabilities, None, tag)
}

/// [`confined_agent`], and with the mount at `hidden` (and all below it) gone from the agent's
/// own mount namespace; the host's mounts are untouched (private propagation).
fn confined_agent_without(
    cluster: &Cluster,
    capabilities: &[String],
    hidden: Option<&str>,
    tag: &str,
) -> Result<PathBuf> {
    let binary = mesh_tests::agent_binary()?;
    let caps: Vec<String> = capabilities
        .iter()
        .map(|c| format!("+{}", c.to_ascii_lowercase()))
        .collect();
    let set = std::iter::once("-all".to_owned())
        .chain(caps)
        .collect::<Vec<_>>()
        .join(",");
    let setpriv = format!(
        "setpriv --inh-caps=-all --ambient-caps=-all --bounding-set={set} -- {}",
        binary.display()
    );
    let script = match hidden {
        None => format!("#!/bin/sh\nexec {setpriv} \"$@\"\n"),
        Some(path) => format!(
            "#!/bin/sh\nexec unshare --mount --propagation private -- sh -c 'umount -l {path} && exec {setpriv} \"$@\"' sh \"$@\"\n"
        ),
    };
    let path = cluster.temp_dir().join(format!("confined-agent-{tag}"));
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Starts `binary` as node 0's agent and expects it to exit unsuccessfully, saying `expected`
/// in its one error line; `missing` names what it was started without.
async fn refuses_to_start(
    cluster: &Cluster,
    binary: PathBuf,
    missing: &str,
    expected: &str,
) -> Result<()> {
    let options = AgentOptions {
        binary: Some(binary),
        ..AgentOptions::default()
    }
    .no_wait();
    let mut agent = cluster.start_agent_with(0, options).await?;
    let exit = agent.wait_exit(Duration::from_secs(20)).await?;
    ensure!(!exit.success(), "the agent started without {missing}");
    let log = agent.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("mesh-agent: "))
        .collect();
    ensure!(
        errors.len() == 1 && errors[0].contains(expected),
        "without {missing} the agent must say {expected:?} in one line: {log}"
    );
    Ok(())
}

fn mask(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_capabilities_are_enough_and_each_is_needed() -> Result<()> {
    if !mesh_tests::require_root() {
        return Ok(());
    }
    let (add, drop) = manifest_capabilities()?;
    ensure!(
        drop == ["ALL"],
        "the DaemonSet must drop ALL, drops {drop:?}"
    );
    ensure!(!add.is_empty(), "the DaemonSet adds no capability");
    let wanted = add
        .iter()
        .try_fold(0u64, |m, c| Ok::<_, anyhow::Error>(m | 1 << bit(c)?))?;

    // Exactly those: the agents start, the kernel shows only those in their sets, the mesh works.
    let cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
    let confined = confined_agent(&cluster, &add, "all")?;
    let mut agents = Vec::new();
    for node in 0..2 {
        let options = AgentOptions {
            binary: Some(confined.clone()),
            ..AgentOptions::default()
        };
        agents.push(cluster.start_agent_with(node, options).await?);
    }
    for agent in &agents {
        let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))?;
        for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
            ensure!(
                mask(&status, field) == Some(wanted),
                "agent {} {field} {:x?}, want {wanted:x} ({add:?})",
                agent.node_name(),
                mask(&status, field)
            );
        }
        for field in ["CapInh:", "CapAmb:"] {
            ensure!(
                mask(&status, field) == Some(0),
                "agent {} {field} is not empty",
                agent.node_name()
            );
        }
    }
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    web1.send_and_verify(web2.addr(PORT), 64 * 1024).await?;
    let inbound = wait_records(&cluster, 1, "inbound", web2.addr(PORT), 1).await?;
    ensure!(
        inbound
            .iter()
            .any(|r| r["security"] == "mutual_tls" && r["route"] == "tunnel"),
        "not tunnelled with the manifest's capabilities: {inbound:#?}"
    );
    for agent in agents.iter_mut() {
        let exit = agent.terminate().await?;
        ensure!(
            exit.success(),
            "agent {} exited with {exit}",
            agent.node_name()
        );
    }

    // Any one taken away: the agent refuses to start and names it.
    for removed in &add {
        let fewer: Vec<String> = add.iter().filter(|c| *c != removed).cloned().collect();
        let confined = confined_agent(&cluster, &fewer, removed)?;
        let expected = format!("missing capability: CAP_{removed} (");
        refuses_to_start(&cluster, confined, removed, &expected).await?;
    }

    // Any one of the manifest's host mounts absent: the agent refuses to start and names it,
    // and the host still has the mount.
    let mounts = manifest_host_mounts()?;
    ensure!(
        mounts.iter().any(|m| m == "/sys/fs/bpf") && mounts.iter().any(|m| m == "/sys/fs/cgroup"),
        "the DaemonSet must mount the host's bpffs and cgroup2, mounts {mounts:?}"
    );
    for mount in &mounts {
        let expected = missing_mount_error(mount)?;
        let tag = format!("without-{}", mount.replace('/', "-"));
        let confined = confined_agent_without(&cluster, &add, Some(mount), &tag)?;
        refuses_to_start(&cluster, confined, mount, expected).await?;
        let host = std::fs::read_to_string("/proc/self/mountinfo")?;
        ensure!(
            host.lines().any(|l| l
                .split(' ')
                .nth(4)
                .is_some_and(|p| p.starts_with(mount.as_str()))),
            "the host lost {mount}"
        );
    }
    Ok(())
}
