//! A `mesh-agent` process running in a node's namespace: its log, readiness, signals, exit.

use std::{
    collections::BTreeSet,
    env, fs,
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The agent's admin API (JSON views for the CLI), on 127.0.0.1 in the node namespace.
pub const ADMIN_PORT: u16 = 15000;
/// The agent's readiness port (all addresses of the node namespace).
pub const READY_PORT: u16 = 15021;
/// The readiness endpoint polled by [`crate::Cluster::start_agent`].
pub const READY_PATH: &str = "/healthz/ready";
/// Default readiness deadline.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Agent::terminate`] waits after SIGTERM.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `mesh-agent` binary: `$MESH_AGENT_BIN`, else `target/release/mesh-agent` found next to the
/// running executable (`target/release/{demo,deps/…}`) or from this crate's manifest directory.
/// Whether the agent's status (`mesh-agent status -o json`) shows a watch of every kind the
/// Kubernetes source watches, each synced.
pub fn watches_synced(status: &serde_json::Value) -> bool {
    status["state"]["watches"]
        .as_array()
        .is_some_and(|w| w.len() == WATCHED_KINDS && w.iter().all(|w| w["state"] == "synced"))
}

/// The kinds the agent's Kubernetes source watches: Namespace, Pod, Service, EndpointSlice,
/// AuthorizationPolicy, PeerAuthentication, Gateway, HTTPRoute, RequestAuthentication, GRPCRoute.
pub const WATCHED_KINDS: usize = 10;

pub fn agent_binary() -> Result<PathBuf> {
    if let Some(path) = env::var_os("MESH_AGENT_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "MESH_AGENT_BIN={} is not a file: build it with `cargo xtask build`",
                path.display()
            );
        }
        return Ok(path);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("mesh-agent"));
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join("mesh-agent"));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/mesh-agent"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "mesh-agent binary not found (looked at {}): run `cargo xtask build` or set MESH_AGENT_BIN",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        })
}

/// How to start an agent; `AgentOptions::default()` is what [`crate::Cluster::start_agent`] uses.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Arguments after `run --node <node> --state <dir>`.
    pub args: Vec<String>,
    /// Read the cluster from this kubeconfig's API server (`--kubeconfig`) instead of the
    /// cluster's state directory (`--state`).
    pub kubeconfig: Option<PathBuf>,
    /// Extra environment (the agent inherits the test's environment, plus `NO_COLOR=1`).
    pub env: Vec<(String, String)>,
    /// Another binary than [`agent_binary`].
    pub binary: Option<PathBuf>,
    /// Wait for `GET /healthz/ready` to return 200 before returning.
    pub wait_ready: bool,
    pub ready_timeout: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            args: Vec::new(),
            kubeconfig: None,
            env: Vec::new(),
            binary: None,
            wait_ready: true,
            ready_timeout: READY_TIMEOUT,
        }
    }
}

impl AgentOptions {
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// See [`AgentOptions::kubeconfig`].
    pub fn kubeconfig(mut self, path: impl Into<PathBuf>) -> Self {
        self.kubeconfig = Some(path.into());
        self
    }

    pub fn no_wait(mut self) -> Self {
        self.wait_ready = false;
        self
    }
}

/// Process ids of agents not yet reaped, so the cluster can kill any that outlive their
/// [`Agent`] handle before it deletes the namespaces.
#[derive(Default)]
pub(crate) struct Registry(Mutex<BTreeSet<u32>>);

impl Registry {
    fn add(&self, pid: u32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
    }

    fn remove(&self, pid: u32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }

    /// SIGKILLs every agent still running. Safe against pid reuse: a pid stays registered only
    /// until its `Child` is reaped, so it still names our (possibly zombie) child.
    pub(crate) fn kill_all(&self) {
        let pids: Vec<u32> = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        for pid in &pids {
            if let Err(e) = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL)
                && e != nix::errno::Errno::ESRCH
            {
                warn!("mesh-tests: cannot kill agent {pid}: {e}");
            }
        }
        // Dead once its sockets are closed: a zombie (state Z) holds none.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for pid in pids {
            while !exited(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// True once `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// A byte offset into an agent's log (see [`Agent::log_mark`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogMark(usize);

/// A running agent. Dropping it SIGKILLs it (use [`Agent::terminate`] for a graceful stop).
pub struct Agent {
    node_index: usize,
    node_name: String,
    child: Child,
    pid: u32,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
    registry: Arc<Registry>,
}

impl Agent {
    pub(crate) fn new(
        node_index: usize,
        node_name: &str,
        child: Child,
        log_path: PathBuf,
        registry: Arc<Registry>,
    ) -> Agent {
        let pid = child.id();
        registry.add(pid);
        Agent {
            node_index,
            node_name: node_name.to_owned(),
            child,
            pid,
            log_path,
            exit: None,
            registry,
        }
    }

    pub fn node_index(&self) -> usize {
        self.node_index
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The file that receives the agent's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the agent has printed so far.
    pub fn log(&self) -> String {
        match fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", self.log_path.display()),
        }
    }

    /// The last `lines` lines of [`Agent::log`].
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A position in the log: [`Agent::log_since`] and [`Agent::wait_for_log_since`] see only
    /// what was printed after it.
    pub fn log_mark(&self) -> LogMark {
        LogMark(fs::metadata(&self.log_path).map_or(0, |m| m.len() as usize))
    }

    /// The complete lines printed since `mark`.
    pub fn log_since(&self, mark: LogMark) -> Vec<String> {
        let log = self.log();
        let new = log.get(mark.0..).unwrap_or_default();
        // A line still being written (no newline yet) is left for the next read.
        let complete = new.rfind('\n').map_or("", |end| &new[..end]);
        complete.lines().map(str::to_owned).collect()
    }

    /// The lines since `mark` that contain `needle`.
    pub fn log_lines_since(&self, mark: LogMark, needle: &str) -> Vec<String> {
        self.log_since(mark)
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }

    /// Waits for the first line containing `needle` printed after `mark` and returns it; fails
    /// if more than one such line is there by then (one event, one line) or none comes within
    /// `timeout`.
    pub async fn one_new_log_line(
        &mut self,
        mark: LogMark,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        let first = self.wait_for_log_since(mark, needle, timeout).await?;
        let lines = self.log_lines_since(mark, needle);
        anyhow::ensure!(
            lines.len() == 1,
            "one event, {} {needle:?} lines on {}: {lines:#?}",
            lines.len(),
            self.node_name
        );
        Ok(first)
    }

    /// Waits until a log line contains `needle` and returns that line; fails on timeout, or at
    /// once if the agent exits without printing it.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_log_since(LogMark(0), needle, timeout).await
    }

    /// [`Agent::wait_for_log`] for lines printed after `mark`.
    pub async fn wait_for_log_since(
        &mut self,
        mark: LogMark,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.try_exit()?.is_some();
            if let Some(line) = self.log_lines_since(mark, needle).into_iter().next() {
                return Ok(line);
            }
            if exited {
                bail!(
                    "agent on {} exited ({}) without logging {needle:?}; log:\n{}",
                    self.node_name,
                    self.exit.map(|s| s.to_string()).unwrap_or_default(),
                    self.log_tail(200)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent on {} did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.node_name,
                    self.log_tail(200)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_exit(), Ok(None))
    }

    /// The exit status if the agent has exited (reaps it), `None` while it runs.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none()
            && let Some(status) = self.child.try_wait().context("waiting for the agent")?
        {
            self.reaped(status);
        }
        Ok(self.exit)
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        if self.exit.is_some() {
            bail!("agent on {} has already exited", self.node_name);
        }
        kill(Pid::from_raw(self.pid as i32), signal)
            .with_context(|| format!("sending {signal} to agent {}", self.pid))
    }

    /// Waits for the agent to exit on its own, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent on {} still running after {timeout:?}; log:\n{}",
                    self.node_name,
                    self.log_tail(100)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits up to 10 s for the exit status. If the agent is still running then,
    /// it is SIGKILLed and this fails.
    pub async fn terminate(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit()? {
            return Ok(status);
        }
        self.signal(Signal::SIGTERM)?;
        match self.wait_exit(TERMINATE_TIMEOUT).await {
            Ok(status) => Ok(status),
            Err(e) => {
                let _ = self.kill();
                Err(e.context(format!(
                    "agent on {} ignored SIGTERM for {TERMINATE_TIMEOUT:?}; SIGKILLed it",
                    self.node_name
                )))
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let _ = self.child.kill();
        let status = self.child.wait().context("reaping the agent")?;
        self.reaped(status);
        Ok(status)
    }

    /// Resident memory in KiB (`VmRSS` of `/proc/<pid>/status`); `None` once it has exited.
    pub fn rss_kib(&self) -> Option<u64> {
        self.proc_status_kib("VmRSS:")
    }

    /// Peak resident memory in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.proc_status_kib("VmHWM:")
    }

    fn proc_status_kib(&self, field: &str) -> Option<u64> {
        if self.exit.is_some() {
            return None;
        }
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    fn reaped(&mut self, status: ExitStatus) {
        self.exit = Some(status);
        self.registry.remove(self.pid);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            warn!(
                "---- mesh-agent log, node {} ({}), last 80 lines ----\n{}\n---- end of agent log ----",
                self.node_name,
                self.log_path.display(),
                self.log_tail(80)
            );
        }
        if let Err(e) = self.kill() {
            warn!(
                "mesh-tests: stopping agent {} on {}: {e:#}",
                self.pid, self.node_name
            );
        }
    }
}
