//! Test harness for mesh-agent: a two-node cluster simulated in network namespaces and wired the
//! way a routed CNI (Calico) wires pods, real `mesh-agent` processes on its nodes, and async
//! traffic helpers whose every wait is bounded, so a broken data path fails in seconds.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use mesh_tests::{Cluster, ClusterSpec, PodSpec, require_root};
//! if !require_root() {
//!     return Ok(());
//! }
//! let cluster = Cluster::new(
//!     ClusterSpec::new()
//!         .namespace("shop", &[("mesh-agent.dev/mode", "ambient")])
//!         .pod(PodSpec::new("shop", "web-1", 0))
//!         .pod(PodSpec::new("shop", "web-2", 1)),
//! )?;
//! let _agents = (cluster.start_agent(0).await?, cluster.start_agent(1).await?);
//! let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
//! let _server = web2.echo_server(8080).await?;
//! web1.send_and_verify(web2.addr(8080), 64 * 1024).await?;
//! # Ok(()) }
//! ```
//!
//! Node indices are 0-based: node 0 is the namespace `mt<id>-n1` with link address
//! `192.168.X.1`, pod CIDR `10.X.1.0/24`.

#[macro_use]
mod macros {
    /// `eprintln!` that cannot panic: cleanup code runs in `Drop`, often while unwinding, where
    /// a second panic (say, stderr is a closed pipe) would abort and skip the rest of the cleanup.
    macro_rules! warn {
        ($($arg:tt)*) => {{
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr().lock(), $($arg)*);
        }};
    }
}

pub mod agent;
pub mod apiserver;
mod command;
pub mod cputime;
pub mod grpc_echo;
pub mod http_echo;
pub mod jwt;
pub mod netns;
pub mod state_gen;
pub mod state_yaml;
pub mod tcx;
pub mod topology;
pub mod traffic;
pub mod wakeup;

pub use agent::{Agent, AgentOptions, LogMark, agent_binary, watches_synced};
pub use netns::Netns;
pub use tcx::{Attached, TcxPrograms};
pub use topology::{Cluster, ClusterSpec, NamespaceSpec, Node, Pod, PodSpec, waypoint};
pub use traffic::{FlowReport, HttpResponse, PeerReport, Server};

/// The label that enrolls a namespace (or a pod) into the mesh.
pub const MODE_LABEL: &str = "mesh-agent.dev/mode";
/// The value of [`MODE_LABEL`] that enrolls.
pub const MODE_AMBIENT: &str = "ambient";

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `true` when the caller may go on; otherwise prints a loud `SKIPPED` line and returns `false`:
///
/// ```no_run
/// if !mesh_tests::require_root() {
///     return;
/// }
/// ```
///
/// Under CI (`CI=true`) a test that needs root and does not have it panics instead: CI runs as
/// root, so a skip there would turn the whole end-to-end suite green without running it.
pub fn require_root() -> bool {
    const WHY: &str = "needs root (network namespaces, veth pairs, eBPF)";
    match root_gate(is_root(), under_ci()) {
        Gate::Run => true,
        Gate::Skip => {
            skip(WHY);
            false
        }
        Gate::Fail => panic!("{WHY}, and CI=true: a root test must not be skipped under CI"),
    }
}

/// Whether this runs under CI (`CI=true`, as GitHub Actions, GitLab and `.ci/run` set it).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

#[derive(Debug, PartialEq, Eq)]
enum Gate {
    Run,
    Skip,
    Fail,
}

fn root_gate(root: bool, ci: bool) -> Gate {
    match (root, ci) {
        (true, _) => Gate::Run,
        (false, false) => Gate::Skip,
        (false, true) => Gate::Fail,
    }
}

/// Prints the `SKIPPED: <reason>` line that marks a test which returned early. It goes straight
/// to the process's stderr, past libtest's output capture, so it shows even when the test passes.
pub fn skip(reason: &str) {
    use std::io::Write as _;
    let test = std::thread::current()
        .name()
        .map(|n| format!(" [{n}]"))
        .unwrap_or_default();
    let _ = writeln!(
        std::io::stderr().lock(),
        "==== SKIPPED: {reason}{test} ===="
    );
}

/// Raises this process's open-files limit, soft and hard, to at least `files` (root may raise
/// the hard limit): tests that hold tens of thousands of sockets need more than the default.
pub fn raise_open_files(files: u64) -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if limit.rlim_cur >= files {
        return Ok(());
    }
    let raised = libc::rlimit {
        rlim_cur: files,
        rlim_max: limit.rlim_max.max(files),
    };
    // SAFETY: setrlimit only reads the struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(anyhow::anyhow!(
            "raising the open-files limit to {files}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Resident memory of process `pid`, in KiB (`VmRSS`).
pub fn resident_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_test_skips_outside_ci_and_fails_under_it() {
        assert_eq!(root_gate(true, false), Gate::Run);
        assert_eq!(root_gate(true, true), Gate::Run);
        assert_eq!(root_gate(false, false), Gate::Skip);
        assert_eq!(root_gate(false, true), Gate::Fail);
    }
}
