//! `cargo xtask`: installs what the project needs, then builds, tests, demonstrates and benchmarks it.
//!
//! It builds with the machine's default stable toolchain and uses only crates that build there,
//! because it is the command that installs the pinned toolchains (see ../shared/TOOLCHAIN.md:
//! with `RUSTUP_AUTO_INSTALL=0`, nothing pinned may be needed before it runs).
#![forbid(unsafe_code)]

mod fuzz;
mod process;
mod setup;
mod validate;

use std::{
    env,
    path::{Path, PathBuf},
    process::ExitCode,
};

use process::{Failure, run};

/// The toolchain that builds and tests the userspace crates (aya 0.16 needs rustc 1.98).
pub const USER_TOOLCHAIN: &str = "1.98.0";
/// The toolchain mesh-agent's build.rs uses for the eBPF crate; its LLVM must match bpf-linker's.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-07-02";

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup              install missing apt packages, bpf-linker and the pinned toolchains (root)
  build              setup, then build every binary in release mode
  test [ARGS]        setup, check deploy/ (validate.rs), build, check `mesh-agent crds`,
                     then run every test, twice for the tests both state sources
                     serve, then every fuzz target for 20 s;
                     ARGS go to `cargo test`
                     (e.g. `cargo xtask test -p mesh-tests --test topology -- --nocapture`)
  demo               setup, build, then run the two-node demo
  bench              setup, build, then run the mesh vs. no-mesh benchmark
  soak               setup, build, then hold 10,000 tunnelled connections for 10 minutes
                     (MESH_SOAK_SECS, MESH_SOAK_CONNECTIONS for a shorter trial)
  fuzz [SECONDS]     setup, then run every fuzz target in fuzz/ at once, SECONDS each
                     (default 20; `cargo xtask test` ends with such a pass)
";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match command.as_str() {
        "setup" => no_args(command, rest).and_then(|()| setup::run()),
        "build" => no_args(command, rest).and_then(|()| build()),
        "test" => test(rest),
        "demo" => no_args(command, rest).and_then(|()| run_binary("demo")),
        "bench" => no_args(command, rest).and_then(|()| run_binary("bench")),
        "soak" => no_args(command, rest).and_then(|()| run_binary("soak")),
        "fuzz" => fuzz_seconds(rest).and_then(|seconds| {
            setup::run()?;
            fuzz::run(seconds)
        }),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(Failure::usage(format!(
            "unknown command `{other}`\n\n{USAGE}"
        ))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("xtask: {failure}");
            failure.exit_code()
        }
    }
}

fn no_args(command: &str, rest: &[String]) -> Result<(), Failure> {
    match rest.first() {
        None => Ok(()),
        Some(arg) => Err(Failure::usage(format!(
            "`{command}` takes no arguments (got `{arg}`)"
        ))),
    }
}

/// `fuzz [SECONDS]`: how long each target runs.
fn fuzz_seconds(rest: &[String]) -> Result<u64, Failure> {
    match rest {
        [] => Ok(fuzz::DEFAULT_SECONDS),
        [seconds] => seconds
            .parse::<u64>()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| {
                Failure::usage(format!(
                    "`fuzz` takes a number of seconds (got `{seconds}`)"
                ))
            }),
        [_, extra, ..] => Err(Failure::usage(format!(
            "`fuzz` takes at most one argument (got `{extra}` too)"
        ))),
    }
}

/// `cargo +1.98.0 build --release` of every host binary.
fn build() -> Result<(), Failure> {
    setup::run()?;
    compile()
}

fn compile() -> Result<(), Failure> {
    println!("xtask: building release binaries with {USER_TOOLCHAIN}");
    let mut args = vec![
        format!("+{USER_TOOLCHAIN}"),
        "build".into(),
        "--release".into(),
    ];
    args.extend(workspace_selection());
    args.push("--bins".into());
    run(process::cargo(&args).current_dir(repo_root()))
}

/// Runs every test of the workspace against the freshly built agent binary.
fn test(extra: &[String]) -> Result<(), Failure> {
    setup::run()?;
    // The manifests first: a few seconds, and a broken deploy/ fails the run before the build.
    validate::run()?;
    compile()?;
    // The CRDs `mesh-agent crds` prints need the binary just built.
    validate::crds(&agent_binary())?;
    // --no-fail-fast: one CI run reports every failing test binary, not only the first.
    let mut args = vec![
        format!("+{USER_TOOLCHAIN}"),
        "test".into(),
        "--release".into(),
        "--no-fail-fast".into(),
    ];
    // `--workspace` and `-p` cannot be combined: a package selection in ARGS replaces ours.
    let cargo_part = extra.split(|a| a == "--").next().unwrap_or_default();
    let selects_packages = cargo_part
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package") || a.starts_with("-p"));
    if !selects_packages {
        args.extend(workspace_selection());
    }
    args.extend(extra.iter().cloned());
    println!("xtask: cargo {}", args.join(" "));
    let first = run(process::cargo(&args)
        .current_dir(repo_root())
        .env("MESH_AGENT_BIN", agent_binary()));
    // The whole suite once more for the scenarios both state sources must serve alike: the
    // same tests with the cluster's state served by the test Kubernetes API server.
    let second = if extra.is_empty() {
        let mut args = vec![
            format!("+{USER_TOOLCHAIN}"),
            "test".into(),
            "--release".into(),
            "--no-fail-fast".into(),
        ];
        // The same package selection as the first pass, so cargo reuses its build (`-p
        // mesh-tests` alone would unify features differently and rebuild dependencies).
        args.extend(workspace_selection());
        for file in API_SOURCE_TESTS {
            args.extend(["--test".into(), file.into()]);
        }
        println!(
            "xtask: MESH_TESTS_SOURCE=kubernetes cargo {}",
            args.join(" ")
        );
        run(process::cargo(&args)
            .current_dir(repo_root())
            .env("MESH_AGENT_BIN", agent_binary())
            .env("MESH_TESTS_SOURCE", "kubernetes"))
    } else {
        Ok(())
    };
    // A short fuzz pass: a panic on some input the suite never thought of fails the run.
    let fuzzed = if extra.is_empty() {
        fuzz::run(fuzz::DEFAULT_SECONDS)
    } else {
        Ok(())
    };
    first.and(second).and(fuzzed)
}

/// The end-to-end test files that run a second time with their state served by the test
/// Kubernetes API server (`MESH_TESTS_SOURCE=kubernetes`).
const API_SOURCE_TESTS: [&str; 9] = [
    "capture",
    "tunnel",
    "policy",
    "services",
    "waypoint",
    "waypoint_policy",
    "waypoint_traffic",
    "waypoint_telemetry",
    "waypoint_grpc",
];

/// Runs one of the harness binaries (`demo`, `bench`, `soak`) built by [`build`].
fn run_binary(name: &str) -> Result<(), Failure> {
    build()?;
    let binary = target_dir().join("release").join(name);
    println!("xtask: running {}", binary.display());
    run(process::command(&binary)
        .current_dir(repo_root())
        .env("MESH_AGENT_BIN", agent_binary()))
}

/// Every member that builds for the host: `mesh-ebpf` only builds for the bpf target,
/// through mesh-agent's build.rs, and `--workspace` alone would build it for the host too.
fn workspace_selection() -> Vec<String> {
    ["--workspace", "--exclude", "mesh-ebpf"]
        .map(String::from)
        .to_vec()
}

fn repo_root() -> PathBuf {
    // xtask/ sits at the root of the workspace.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        None => repo_root().join("target"),
    }
}

fn agent_binary() -> PathBuf {
    target_dir().join("release").join("mesh-agent")
}
