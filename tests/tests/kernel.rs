//! As root: when the kernel lacks what capture needs, the agent says what is missing in one line
//! and exits, without verifier noise. Each case hides a feature in a private mount namespace.

use std::process::Command;

use anyhow::{Context, Result, ensure};

/// Runs `mesh-agent run` after `hide` (shell) in a private mount namespace. The state path does
/// not exist, so even if the kernel check passed the agent would stop before touching anything.
fn run_agent_hiding(hide: &str) -> Result<(bool, String)> {
    let bin = mesh_tests::agent_binary()?;
    let script = format!(
        "set -e; {hide}; exec {} run --node kernel-test --state /nonexistent/mesh-agent-state",
        bin.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("NO_COLOR", "1")
        .output()
        .context("running unshare")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
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
    let (ok, stderr) = run_agent_hiding(
        "for m in $(findmnt -n -l -t bpf -o TARGET | sort -u); do while umount -l \"$m\" 2>/dev/null; do :; done; done",
    )?;
    ensure!(!ok, "agent started on a missing state path: {stderr}");
    let errors = error_lines(&stderr);
    ensure!(
        errors.len() == 1
            && errors[0].contains("/nonexistent/mesh-agent-state")
            && !errors[0].contains("bpffs"),
        "expected the state error after mounting bpffs: {stderr}"
    );
    Ok(())
}
