//! A real gRPC echo and client for the gRPC tests: the Python scripts in `tests/grpc/` (Debian's
//! `python3-grpcio`, which `cargo xtask setup` installs for `/usr/bin/python3`), run inside a
//! pod's network namespace. The echo answers every unary call with a JSON report (pod,
//! namespace, method, metadata, authority, peer); the client makes calls one after the other on
//! one channel and prints one JSON line per call.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::topology::Pod;

/// Debian's Python, the one `python3-grpcio` is installed for (a pyenv `python3` on `PATH`
/// would not have it).
pub const PYTHON: &str = "/usr/bin/python3";

/// How long the echo may take to import grpcio and listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Echo processes started by this test binary, for unique tags.
static STARTED: AtomicUsize = AtomicUsize::new(0);

fn script(name: &str) -> String {
    format!("{}/grpc/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A running gRPC echo; the process is killed on drop.
pub struct GrpcEcho {
    child: Child,
    /// Unique among the processes of this machine (`mesh-tests-grpc-echo-<pid>-<n>`).
    pub tag: String,
    pub port: u16,
    output: Arc<Mutex<String>>,
}

impl GrpcEcho {
    /// What the echo printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

impl Drop for GrpcEcho {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            warn!("mesh-tests: cannot kill gRPC echo {}: {e}", self.tag);
        }
        let _ = self.child.wait();
    }
}

impl Pod {
    /// Starts the gRPC echo on `0.0.0.0:port` in this pod and waits until it listens.
    pub async fn grpc_echo_server(&self, port: u16) -> Result<GrpcEcho> {
        let tag = format!(
            "mesh-tests-grpc-echo-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::SeqCst)
        );
        let mut cmd = self.netns().command(PYTHON);
        // If the test process dies without unwinding, the echo goes too. The signal follows
        // the spawning thread: this is called from async code on a runtime thread.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.arg(script("echo_server.py"))
            .args(["--port", &port.to_string()])
            .args(["--pod", &self.name, "--namespace", &self.namespace])
            .args(["--tag", &tag])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the gRPC echo in {} ({PYTHON})", self.id()))?;
        let output = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take(), &output);
        collect(child.stderr.take(), &output);
        let mut echo = GrpcEcho {
            child,
            tag,
            port,
            output,
        };
        let ready = format!("serving on {port}");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if echo.output().contains(&ready) {
                return Ok(echo);
            }
            if let Some(status) = echo.child.try_wait()? {
                bail!(
                    "the gRPC echo in {} exited ({status}) before listening on {port} \
                     (is python3-grpcio installed? `cargo xtask setup`):\n{}",
                    self.id(),
                    echo.output()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the gRPC echo in {} did not listen on {port} within {START_TIMEOUT:?}:\n{}",
                    self.id(),
                    echo.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// gRPC calls from this pod, one after the other on one channel: one reply per call.
    pub fn grpc_call(&self, call: &GrpcCall<'_>) -> Result<Vec<GrpcReply>> {
        let mut args: Vec<String> = vec![
            PYTHON.into(),
            script("client.py"),
            call.target.to_string(),
            call.method.into(),
            "--count".into(),
            call.count.max(1).to_string(),
            "--timeout".into(),
            call.timeout.as_secs_f64().to_string(),
        ];
        if let Some(authority) = call.authority {
            args.extend(["--authority".into(), authority.into()]);
        }
        for (name, value) in call.metadata {
            args.extend(["-H".into(), format!("{name}:{value}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Every call may take its whole timeout; a little more for the interpreter.
        let limit = call.timeout * call.count.max(1) as u32 + Duration::from_secs(10);
        let out = self.netns().exec_with_timeout(&args, limit)?;
        let replies = out
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line).with_context(|| format!("not a client line: {line}"))
            })
            .collect::<Result<Vec<GrpcReply>>>()?;
        if replies.len() != call.count.max(1) {
            bail!(
                "{} of {} gRPC calls reported:\n{out}",
                replies.len(),
                call.count
            );
        }
        Ok(replies)
    }
}

/// What [`Pod::grpc_call`] sends.
#[derive(Debug, Clone, Copy)]
pub struct GrpcCall<'a> {
    pub target: SocketAddr,
    /// `/<package.Service>/<Method>`.
    pub method: &'a str,
    /// The `:authority`; the target's address when `None`.
    pub authority: Option<&'a str>,
    pub metadata: &'a [(&'a str, &'a str)],
    pub count: usize,
    /// For each call.
    pub timeout: Duration,
}

impl<'a> GrpcCall<'a> {
    /// One call of `method` to `target`, with a 10 s timeout.
    pub fn new(target: SocketAddr, method: &'a str) -> GrpcCall<'a> {
        GrpcCall {
            target,
            method,
            authority: None,
            metadata: &[],
            count: 1,
            timeout: Duration::from_secs(10),
        }
    }
}

/// One call's outcome, as the client printed it.
#[derive(Debug, Clone, Deserialize)]
pub struct GrpcReply {
    /// The gRPC status name: `OK`, `UNAVAILABLE`, ...
    pub code: String,
    pub details: Option<String>,
    /// The echo's report (`OK` only).
    pub response: Option<Value>,
}

impl GrpcReply {
    /// The pod that answered.
    pub fn pod(&self) -> Option<&str> {
        self.response.as_ref()?["pod"].as_str()
    }

    /// Every value of a metadata key the echo received, joined by commas.
    pub fn metadata(&self, name: &str) -> Option<String> {
        let values = self.response.as_ref()?["metadata"][name].as_array()?;
        Some(
            values
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
        )
    }

    /// The address that called the echo (its `peer`, `ipv4:IP:PORT`).
    pub fn peer(&self) -> Option<SocketAddr> {
        self.response.as_ref()?["peer"]
            .as_str()?
            .strip_prefix("ipv4:")?
            .parse()
            .ok()
    }
}

/// Appends what `pipe` prints to `output`, on a thread.
fn collect(pipe: Option<impl Read + Send + 'static>, output: &Arc<Mutex<String>>) {
    let Some(pipe) = pipe else { return };
    let output = output.clone();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut all) = output.lock() {
                all.push_str(&line);
                all.push('\n');
            }
        }
    });
}
