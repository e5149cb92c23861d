//! As root: when the kernel lacks what capture needs, the agent says what is missing in one line
//! and exits, without verifier noise. Each case hides a feature in a private mount namespace.

use std::process::Command;

use anyhow::{Context, Result, ensure};

/// Runs `mesh-agent run` after `hide` (shell) in a private mount namespace. The state path does
/// not exist, so even if the kernel check passed the agent would stop before touching anything.
fn run_agent_hiding(hide: &str) -> Result<(bool, String)> {
    let (ok, stderr, _) = run_agent_hiding_then(hide, "true")?;
    Ok((ok, stderr))
}

/// [`run_agent_hiding`], then runs `after` (shell) in the same mount namespace once the agent
/// has exited; returns its stdout too.
fn run_agent_hiding_then(hide: &str, after: &str) -> Result<(bool, String, String)> {
    let bin = mesh_tests::agent_binary()?;
    // The agent's exit status is carried out through a file descriptor the script owns, so
    // `after` can still run and print.
    let script = format!(
        "set -e; {hide}; if {} run --node kernel-test --state /nonexistent/mesh-agent-state; then echo ok >&3; else echo failed >&3; fi; {after}",
        bin.display()
    );
    let status = tempfile::NamedTempFile::new()?;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("exec 3>{}; {script}", status.path().display()))
        .env("NO_COLOR", "1")
        .output()
        .context("running unshare")?;
    ensure!(
        out.status.success(),
        "the test script failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = std::fs::read_to_string(status.path())?;
    Ok((
        agent.trim() == "ok",
        String::from_utf8_lossy(&out.stderr).into_owned(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("mesh-agent: "))
        .collect()
}

#[test]
fn missing_cgroup2_is_named_in_one_line() -> Result<()> {
    if !mesh_tests::require_root() {
        return Ok(());
    }
    let (ok, stderr) = run_agent_hiding(
        "for m in $(findmnt -n -l -t cgroup2 -o TARGET | sort -u); do while umount -l \"$m\" 2>/dev/null; do :; done; done",
    )?;
    ensure!(!ok, "agent started without cgroup v2: {stderr}");
    let errors = error_lines(&stderr);
    ensure!(
        errors.len() == 1 && errors[0].contains("cgroup v2 is not mounted"),
        "unclear error: {stderr}"
    );
    ensure!(!stderr.contains("verifier"), "verifier noise: {stderr}");
    Ok(())
}

#[test]
fn missing_btf_is_named_in_one_line() -> Result<()> {
    if !mesh_tests::require_root() {
        return Ok(());
    }
    let (ok, stderr) = run_agent_hiding("mount -t tmpfs none /sys/kernel/btf")?;
    ensure!(!ok, "agent started without BTF: {stderr}");
    let errors = error_lines(&stderr);
    ensure!(
        errors.len() == 1 && errors[0].contains("kernel BTF is missing"),
        "unclear error: {stderr}"
    );
    Ok(())
}

#[test]
fn absent_bpffs_is_mounted_by_the_agent() -> Result<()> {
    if !mesh_tests::require_root() {
        return Ok(());
    }
    // With bpffs gone the agent mounts it and carries on to the (missing) state, which it names.
    // `findmnt` runs before and after the agent in the same mount namespace: none, then one.
    let (ok, stderr, mounts) = run_agent_hiding_then(
        "for m in $(findmnt -n -l -t bpf -o TARGET | sort -u); do while umount -l \"$m\" 2>/dev/null; do :; done; done; echo \"before: $(findmnt -n -l -t bpf -o TARGET | tr '\\n' ' ')\"",
        "echo \"after: $(findmnt -n -l -t bpf -o TARGET | tr '\\n' ' ')\"",
    )?;
    ensure!(!ok, "agent started on a missing state path: {stderr}");
    let errors = error_lines(&stderr);
    ensure!(
        errors.len() == 1
            && errors[0].contains("/nonexistent/mesh-agent-state")
            && !errors[0].contains("bpffs"),
        "expected the state error after mounting bpffs: {stderr}"
    );
    let line = |prefix: &str| -> Vec<String> {
        mounts
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|m| m.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    ensure!(
        line("before: ").is_empty(),
        "bpffs was still mounted before the agent ran: {mounts}"
    );
    ensure!(
        line("after: ") == ["/sys/fs/bpf"],
        "the agent did not leave bpffs mounted at /sys/fs/bpf: {mounts}"
    );
    Ok(())
}
