//! `cargo xtask fuzz [SECONDS]`: builds the libFuzzer targets in fuzz/ and runs them all at once.
//!
//! Each target starts from its seeds in fuzz/corpus/<target> and keeps what it finds in
//! target/fuzz/corpus/<target>, so a later run goes on from there; the seeds are never written.
//! A target's output goes to target/fuzz/<target>.log: a passing run prints one line of figures,
//! a failing one the end of its log, where libFuzzer shows the panic and the input.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Instant,
};

use crate::{
    EBPF_TOOLCHAIN,
    process::{self, Failure, command},
    repo_root, target_dir,
};

/// The targets in fuzz/Cargo.toml: the state file parser, the L4 policy engine, and the HBONE
/// server's request handling.
pub const TARGETS: [&str; 3] = ["state_parser", "policy_engine", "hbone_request"];
/// How long each target runs by default, and in the pass at the end of `cargo xtask test`.
pub const DEFAULT_SECONDS: u64 = 20;
/// One input that runs longer than this is a hang, reported like a crash.
const INPUT_TIMEOUT_SECS: u64 = 30;
/// How much of a failing target's log is printed.
const LOG_TAIL_LINES: usize = 60;

/// Builds every target, then runs them side by side for `seconds` each.
pub fn run(seconds: u64) -> Result<(), Failure> {
    let dir = target_dir().join("fuzz");
    build(&dir)?;
    println!(
        "fuzz: running {} for {seconds} s each, side by side",
        TARGETS.join(", ")
    );
    let started = Instant::now();
    let running = TARGETS
        .iter()
        .map(|target| Run::start(&dir, target, seconds))
        .collect::<Result<Vec<_>, _>>()?;
    let failed: Vec<&str> = running
        .into_iter()
        .filter_map(|run| run.finish().err())
        .collect();
    println!("fuzz: done in {:.0} s", started.elapsed().as_secs_f64());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "fuzz target(s) failed: {}",
            failed.join(", ")
        )))
    }
}

/// `cargo fuzz build` with the pinned nightly (libFuzzer's instrumentation needs nightly flags):
/// optimised with debug assertions, no sanitizer (the code under test is safe Rust; a sanitizer
/// would slow every execution for little). The eBPF object is not built: no target loads it.
fn build(dir: &Path) -> Result<(), Failure> {
    println!("fuzz: building the targets with {EBPF_TOOLCHAIN}");
    let mut cmd = command("cargo");
    cmd.arg(format!("+{EBPF_TOOLCHAIN}"))
        .args(["fuzz", "build", "--release", "--debug-assertions"])
        .args(["--sanitizer", "none", "--fuzz-dir", "fuzz", "--target-dir"])
        .arg(dir.join("build"))
        .current_dir(repo_root())
        .env("AYA_BUILD_SKIP", "1");
    without_outer_cargo(&mut cmd);
    process::run(&mut cmd)
}

/// Drops what the outer `cargo run` of xtask set for its own package: the fuzz crate's
/// dependencies would see another package's metadata and rebuild.
fn without_outer_cargo(cmd: &mut std::process::Command) {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&name.as_ref())
        {
            cmd.env_remove(name.as_ref());
        }
    }
}

/// One target's fuzzer, running.
struct Run {
    target: &'static str,
    child: Child,
    log: PathBuf,
    artifacts: PathBuf,
    build: PathBuf,
}

impl Run {
    fn start(dir: &Path, target: &'static str, seconds: u64) -> Result<Self, Failure> {
        let binary = dir
            .join("build")
            .join(host_triple())
            .join("release")
            .join(target);
        let corpus = dir.join("corpus").join(target);
        let artifacts = dir.join("artifacts").join(target);
        let seeds = repo_root().join("fuzz").join("corpus").join(target);
        // What an earlier run kept is not this run's finding.
        let _ = fs::remove_dir_all(&artifacts);
        for path in [&corpus, &artifacts] {
            fs::create_dir_all(path)
                .map_err(|e| Failure::new(format!("cannot create {}: {e}", path.display())))?;
        }
        let log = dir.join(format!("{target}.log"));
        let out = fs::File::create(&log)
            .map_err(|e| Failure::new(format!("cannot create {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| Failure::new(format!("cannot share {}: {e}", log.display())))?;
        // libFuzzer writes new inputs into the first corpus directory only.
        let child = command(&binary)
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .arg(&corpus)
            .arg(&seeds)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| Failure::new(format!("cannot start {}: {e}", binary.display())))?;
        Ok(Self {
            target,
            child,
            log,
            artifacts,
            build: dir.join("build"),
        })
    }

    /// Waits for the fuzzer; `Err(target)` when it found something or could not run.
    fn finish(mut self) -> Result<(), &'static str> {
        let status = self.child.wait();
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        match status {
            Ok(status) if status.success() => {
                println!("fuzz: {}: {}", self.target, summary(&log));
                Ok(())
            }
            other => {
                let status = match other {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("cannot wait: {e}"),
                };
                eprintln!(
                    "fuzz: {} FAILED ({status}); the end of {}:",
                    self.target,
                    self.log.display()
                );
                let lines: Vec<&str> = log.lines().collect();
                for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                    eprintln!("  {line}");
                }
                for input in fs::read_dir(&self.artifacts)
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    eprintln!(
                        "fuzz: {}: input kept in {}; run it again with\n  {}",
                        self.target,
                        input.path().display(),
                        reproduce(self.target, &input.path(), &self.build)
                    );
                }
                Err(self.target)
            }
        }
    }
}

/// The figures libFuzzer's final stats give: executions, their rate, and the corpus size.
fn summary(log: &str) -> String {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map(str::trim)
            .unwrap_or("?")
            .to_owned()
    };
    // The last status line ("#123 DONE cov: 456 ft: 789 corp: 12/3456b ...") has the corpus.
    let corpus = log
        .lines()
        .rev()
        .find_map(|l| l.split_once(" corp: ").map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("?");
    format!(
        "{} executions ({}/s), corpus {corpus} (inputs/bytes), nothing found",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
    )
}

/// The command a developer runs to replay one kept input.
fn reproduce(target: &str, input: &Path, build: &Path) -> String {
    format!(
        "AYA_BUILD_SKIP=1 cargo +{EBPF_TOOLCHAIN} fuzz run --release --debug-assertions \
         --sanitizer none --target-dir {} {target} {}",
        build.display(),
        input.display()
    )
}

/// The directory cargo fuzz builds into below its target dir (it always passes `--target`).
fn host_triple() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "aarch64-unknown-linux-gnu"
    } else {
        "x86_64-unknown-linux-gnu"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_libfuzzer_final_stats() {
        let log = "\
#2 INITED cov: 10 ft: 11 corp: 3/120b exec/s: 0 rss: 40Mb
#9000 DONE cov: 812 ft: 2301 corp: 240/18Kb lim: 4096 exec/s: 450 rss: 61Mb
Done 9000 runs in 21 second(s)
stat::number_of_executed_units: 9000
stat::average_exec_per_sec:     428
stat::peak_rss_mb:              61
";
        assert_eq!(
            summary(log),
            "9000 executions (428/s), corpus 240/18Kb (inputs/bytes), nothing found"
        );
    }
}
