//! `cargo xtask setup`: installs only what is missing, so a second run costs about nothing.
//!
//! The steps and their versions are the ones checked in ../shared/TOOLCHAIN.md.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use crate::{
    EBPF_TOOLCHAIN, USER_TOOLCHAIN,
    process::{self, Failure, command, output, output_any_status},
};

/// Debian packages: LLVM 22 for bpf-linker, bpftool/iproute2 for the agent and tests, tcpdump to
/// debug, curl and nghttp2's clients (nghttp, h2load) as the HTTP clients of the waypoint tests,
/// Python's h2 for the tests' HTTP/2 misbehaviour (rapid reset), haproxy as the L7 proxy the
/// waypoint is benchmarked against.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "clang-22",
    "bpftool",
    "iproute2",
    "libzstd-dev",
    "zlib1g-dev",
    "tcpdump",
    "curl",
    "nghttp2-client",
    "python3-h2",
    "haproxy",
    // The gRPC client and echo of the gRPC conformance tests (tests/grpc/), for /usr/bin/python3.
    "python3-grpcio",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Builds and runs the fuzz targets in fuzz/ (fuzz.rs).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Validates deploy/ against Kubernetes' own schemas (validate.rs); from PyPI, into its own venv
/// so that neither Debian's Python (externally managed) nor the machine's is changed.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const KUBERNETES_VALIDATE_VENV: &str = "/opt/kubernetes-validate";

pub fn run() -> Result<(), Failure> {
    require_root()?;
    let started = Instant::now();
    apt_packages()?;
    bpf_linker()?;
    cargo_fuzz()?;
    // rustfmt and clippy: what a developer runs before a commit.
    toolchain(USER_TOOLCHAIN, &["rustfmt", "clippy"])?;
    toolchain(EBPF_TOOLCHAIN, &["rust-src"])?;
    kubernetes_validate()?;
    println!("setup: ready ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}

fn require_root() -> Result<(), Failure> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| Failure::new(format!("cannot read /proc/self/status: {e}")))?;
    // "Uid:\treal\teffective\tsaved\tfs"
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse::<u32>().ok());
    match euid {
        Some(0) => Ok(()),
        Some(uid) => Err(Failure::new(format!(
            "setup must run as root (uid is {uid}): it installs apt packages, and the tests \
             create network namespaces and load eBPF programs; run it again with sudo or as root"
        ))),
        None => Err(Failure::new(
            "cannot tell the current uid from /proc/self/status",
        )),
    }
}

fn apt_packages() -> Result<(), Failure> {
    let missing = missing_packages();
    if missing.is_empty() {
        println!(
            "setup: apt packages: skipped (all {} installed)",
            APT_PACKAGES.len()
        );
        return Ok(());
    }
    println!("setup: apt packages: installing {}", missing.join(" "));
    process::run(
        command("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    process::run(
        command("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing_packages();
    if !still.is_empty() {
        return Err(Failure::new(format!(
            "apt-get did not install {}",
            still.join(" ")
        )));
    }
    println!("setup: apt packages: done");
    Ok(())
}

fn missing_packages() -> Vec<&'static str> {
    let listing = output_any_status(
        command("dpkg-query")
            .args(["-W", "-f=${Package} ${Status}\\n"])
            .args(APT_PACKAGES),
    )
    .unwrap_or_default();
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            !listing.lines().any(|line| {
                // The package name may carry an architecture suffix (`zlib1g-dev:amd64`).
                let mut words = line.split_whitespace();
                let name = words.next().unwrap_or_default();
                let name = name.split(':').next().unwrap_or_default();
                name == *pkg && line.ends_with("install ok installed")
            })
        })
        .collect()
}

fn bpf_linker() -> Result<(), Failure> {
    let wanted_minor = BPF_LINKER_VERSION
        .rsplit_once('.')
        .map_or(BPF_LINKER_VERSION, |(m, _)| m);
    if let Some(version) = output(command("bpf-linker").arg("--version")) {
        // "bpf-linker 0.13.0"
        let have = version.split_whitespace().nth(1).unwrap_or_default();
        if have == wanted_minor || have.starts_with(&format!("{wanted_minor}.")) {
            println!("setup: bpf-linker: skipped ({})", version.trim());
            return Ok(());
        }
        println!("setup: bpf-linker: found {have}, want {wanted_minor}");
    }
    println!("setup: bpf-linker: installing {BPF_LINKER_VERSION} (about a minute)");
    process::run(
        command("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--force",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            // Without LLVM_PREFIX, bpf-linker fails to link (`unable to find library -lLLVM`).
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
    )?;
    println!("setup: bpf-linker: done");
    Ok(())
}

fn cargo_fuzz() -> Result<(), Failure> {
    // "cargo-fuzz 0.13.2"
    let found = output(command("cargo-fuzz").arg("--version"));
    let have = found.as_deref().and_then(|v| v.split_whitespace().nth(1));
    if have == Some(CARGO_FUZZ_VERSION) {
        println!("setup: cargo-fuzz: skipped ({CARGO_FUZZ_VERSION} installed)");
        return Ok(());
    }
    println!("setup: cargo-fuzz: installing {CARGO_FUZZ_VERSION} (about a minute)");
    process::run(command("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
        "--force",
    ]))?;
    println!("setup: cargo-fuzz: done");
    Ok(())
}

fn toolchain(name: &str, components: &[&str]) -> Result<(), Failure> {
    let installed = output(command("rustup").args(["toolchain", "list"])).ok_or_else(|| {
        Failure::new("`rustup toolchain list` failed: rustup is needed (https://rustup.rs)")
    })?;
    // Lines look like "nightly-2026-07-02-x86_64-unknown-linux-gnu" or "1.98.0-x86_64-... (default)".
    let present = installed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|t| t == name || t.starts_with(&format!("{name}-")));
    if !present {
        println!("setup: toolchain {name}: installing");
        let mut cmd = command("rustup");
        cmd.args(["toolchain", "install", name, "--profile", "minimal"]);
        for component in components {
            cmd.args(["--component", component]);
        }
        process::run(&mut cmd)?;
        println!("setup: toolchain {name}: done");
        return Ok(());
    }
    // Installed earlier, perhaps without a component we need.
    let have =
        output(command("rustup").args(["component", "list", "--installed", "--toolchain", name]))
            .unwrap_or_default();
    let lacking: Vec<&str> = components
        .iter()
        .copied()
        .filter(|c| {
            !have
                .lines()
                .any(|l| l.trim() == *c || l.starts_with(&format!("{c}-")))
        })
        .collect();
    if lacking.is_empty() {
        println!("setup: toolchain {name}: skipped (installed)");
        return Ok(());
    }
    println!("setup: toolchain {name}: adding {}", lacking.join(" "));
    process::run(
        command("rustup")
            .args(["component", "add", "--toolchain", name])
            .args(&lacking),
    )?;
    println!("setup: toolchain {name}: done");
    Ok(())
}

/// The `kubernetes-validate` program that [`kubernetes_validate`] installs.
pub fn kubernetes_validate_bin() -> PathBuf {
    Path::new(KUBERNETES_VALIDATE_VENV).join("bin/kubernetes-validate")
}

fn kubernetes_validate() -> Result<(), Failure> {
    let venv = Path::new(KUBERNETES_VALIDATE_VENV);
    if kubernetes_validate_bin().exists() && has_dist_info(venv, KUBERNETES_VALIDATE_VERSION) {
        println!("setup: kubernetes-validate: skipped ({KUBERNETES_VALIDATE_VERSION} installed)");
        return Ok(());
    }
    println!(
        "setup: kubernetes-validate: installing {KUBERNETES_VALIDATE_VERSION} into {KUBERNETES_VALIDATE_VENV}"
    );
    if !venv.join("bin/python").exists() {
        process::run(command("python3").args(["-m", "venv"]).arg(venv))?;
    }
    process::run(
        command(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )),
    )?;
    println!("setup: kubernetes-validate: done");
    Ok(())
}

/// Whether pip installed `kubernetes_validate-<version>.dist-info` in the venv; a file check, so
/// that a second setup does not pay for starting Python.
fn has_dist_info(venv: &Path, version: &str) -> bool {
    let wanted = format!("kubernetes_validate-{version}.dist-info");
    let Ok(lib) = fs::read_dir(venv.join("lib")) else {
        return false;
    };
    lib.flatten()
        .any(|python| python.path().join("site-packages").join(&wanted).is_dir())
}
