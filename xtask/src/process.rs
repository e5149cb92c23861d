//! Running child processes with the environment the project's tools need, and reporting failures.

use std::{
    env,
    ffi::OsStr,
    fmt,
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
};

/// Why a task stopped; printed once by `main`.
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1,
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 2,
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// `~/.cargo/bin` (or `$CARGO_HOME/bin`): where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    match env::var_os("CARGO_HOME") {
        Some(home) => Some(PathBuf::from(home).join("bin")),
        None => env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo").join("bin")),
    }
}

/// A command with `~/.cargo/bin` first on PATH, and without the variables the outer
/// `cargo run` set, so nested cargo/rustup calls pick their toolchain from `+toolchain` only.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(bin) = cargo_bin_dir() {
        let mut paths = vec![bin.clone()];
        if let Some(path) = env::var_os("PATH") {
            paths.extend(env::split_paths(&path).filter(|p| *p != bin));
        }
        if let Ok(joined) = env::join_paths(paths) {
            cmd.env("PATH", joined);
        }
    }
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "CARGO_MANIFEST_DIR",
        "CARGO_PKG_NAME",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

pub fn cargo(args: &[String]) -> Command {
    let mut cmd = command("cargo");
    cmd.args(args);
    cmd
}

/// Runs to completion with inherited stdio; a non-zero exit is a failure naming the command.
pub fn run(cmd: &mut Command) -> Result<(), Failure> {
    let shown = show(cmd);
    let status = cmd
        .status()
        .map_err(|e| Failure::new(format!("cannot start `{shown}`: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::new(format!("`{shown}` failed ({status})")))
    }
}

/// Runs quietly and returns stdout; `None` when the program is missing or exits non-zero.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = run_quietly(cmd)?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`output`] but keeps stdout even when the exit status is non-zero
/// (`dpkg-query` exits 1 when one of several packages is unknown, yet reports the others).
pub fn output_any_status(cmd: &mut Command) -> Option<String> {
    run_quietly(cmd).map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs with no stdin and stderr discarded; `None` when the program cannot be started.
fn run_quietly(cmd: &mut Command) -> Option<std::process::Output> {
    cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()
}

fn show(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}
