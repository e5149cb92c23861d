# mesh-agent image: `docker build -t REGISTRY/mesh-agent:TAG .` from the repository root.
# Not built on the development machines (they run no Docker engine); see README.md,
# "Install on a cluster".

# Builder: exactly what `cargo xtask build` does on a developer machine. `cargo xtask setup`
# installs LLVM 22, clang 22, bpftool and iproute2 with apt, bpf-linker 0.13 with cargo, the
# toolchains 1.98.0 and nightly-2026-07-02 with rustup, and kubernetes-validate (into a venv,
# hence python3-venv), skipping what is there. Debian 12's own archive has no LLVM 22: if the
# image's apt sources do not offer llvm-22-dev, add LLVM's apt repository for bookworm first.
FROM rust:1-bookworm AS builder
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo xtask build

# Runtime: the binary, and iproute2 because the agent runs `ip rule` / `ip route` for its
# policy route (mesh-agent/src/capture/routing.rs). The shell of the base image is used by the
# DaemonSet's init container that sets net.ipv4.tcp_early_demux.
FROM debian:12-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /src/target/release/mesh-agent /usr/local/bin/mesh-agent
ENTRYPOINT ["/usr/local/bin/mesh-agent"]
CMD ["--help"]
