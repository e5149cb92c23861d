//! Running a host command to completion with a deadline, so a stuck tool fails the test instead
//! of hanging it.

use std::{
    io::Read,
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// What a finished command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// The default deadline for a host command (`ip`, `tc`, `bpftool`, the agent's CLI).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `cmd` with a null stdin; kills it when `timeout` passes.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = show(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    // Drain both pipes on threads: a chatty command must not block on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for `{shown}`"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{shown}` did not finish within {timeout:?}; killed it");
        }
        thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs `cmd` and returns its stdout; a non-zero exit is an error carrying both outputs.
pub fn stdout_of(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let shown = show(cmd);
    let out = run(cmd, timeout)?;
    if !out.status.success() {
        let mut message = format!("`{shown}` failed ({})", out.status);
        for (name, text) in [("stderr", &out.stderr), ("stdout", &out.stdout)] {
            if !text.trim().is_empty() {
                message.push_str(&format!("\n{name}: {}", text.trim_end()));
            }
        }
        bail!(message);
    }
    Ok(out.stdout)
}

pub fn show(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}
