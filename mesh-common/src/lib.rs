//! Types and constants shared by the mesh-agent (userspace) and its eBPF programs (kernel).
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree on the layout;
//! flags are `u32` bit sets rather than `bool`s or enums.
#![no_std]

/// Node proxy listener for connections leaving an enrolled pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Node proxy listener for plain TCP arriving for an enrolled pod.
pub const INBOUND_PORT: u16 = 15006;
/// Reserved for the HBONE tunnel (HTTP/2 CONNECT over mutual TLS).
pub const TUNNEL_PORT: u16 = 15008;
/// Admin API (127.0.0.1 only).
pub const ADMIN_PORT: u16 = 15000;
/// Readiness probe (`/healthz/ready`).
pub const READINESS_PORT: u16 = 15021;

/// Packet mark set by the capture programs; a policy route sends marked packets to the local stack.
pub const CAPTURE_MARK: u32 = 0x200;
/// Bits of the mark the capture rule owns.
pub const CAPTURE_MARK_MASK: u32 = 0xf00;
/// `SO_MARK` of every socket the proxy opens, so its own traffic is never captured again.
/// Same value as Istio's ztunnel uses for the same purpose.
pub const PROXY_MARK: u32 = 0x539;
/// Bits compared against [`PROXY_MARK`].
pub const PROXY_MARK_MASK: u32 = 0xfff;
/// Routing table holding `local 0.0.0.0/0 dev lo` for captured packets.
pub const CAPTURE_ROUTE_TABLE: u32 = 2004;
/// Priority of the `fwmark` rule that selects [`CAPTURE_ROUTE_TABLE`].
pub const CAPTURE_RULE_PRIORITY: u32 = 2004;

/// Version of the pinned maps' layout (their names, key and value types). An agent reuses the
/// maps pinned under `v<LAYOUT>` of its node; a different layout gets a fresh set, and the
/// pinned links are moved over to programs using it.
pub const DATAPLANE_LAYOUT: u32 = 1;

/// [`Workload::flags`]: the pod is enrolled in the mesh; capture its traffic.
pub const WORKLOAD_ENROLLED: u32 = 1 << 0;

/// Value of the `WORKLOADS` map, keyed by the pod's IPv4 address (network byte order `u32`).
///
/// Only pods on this node that are enrolled are present.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// `WORKLOAD_*` bits.
    pub flags: u32,
    /// Host-side veth of the pod.
    pub ifindex: u32,
}

/// Value of the single-entry `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Listener for HBONE: inbound connections to a pod's port 15008 go here.
    pub tunnel_port: u16,
    pub _pad: u16,
    pub capture_mark: u32,
    pub proxy_mark: u32,
    pub proxy_mark_mask: u32,
}

impl CaptureConfig {
    /// The listener for a connection arriving for a pod's `port` (host byte order): HBONE
    /// (pod port 15008) goes to the tunnel listener, everything else to plain inbound.
    pub const fn inbound_listener(&self, port: u16) -> u16 {
        if port == TUNNEL_PORT {
            self.tunnel_port
        } else {
            self.inbound_port
        }
    }

    pub const fn default_ports() -> Self {
        Self {
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            tunnel_port: TUNNEL_PORT,
            _pad: 0,
            capture_mark: CAPTURE_MARK,
            proxy_mark: PROXY_MARK,
            proxy_mark_mask: PROXY_MARK_MASK,
        }
    }
}

/// Value of the single-entry `META` array: what the pinned data plane is and who made it. Only
/// userspace reads and writes it; the programs never look at it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPlaneMeta {
    /// [`DATAPLANE_LAYOUT`] of the agent that created the maps.
    pub layout: u32,
    /// `net.ipv4.tcp_early_demux` before capture changed it, plus one (0: left unchanged), so
    /// that uninstall restores it even after a crash.
    pub early_demux_before: u32,
    /// When the data plane was first pinned, in seconds since the Unix epoch.
    pub pinned_since: u64,
    /// When an agent process last adopted it (or created it), likewise.
    pub adopted_at: u64,
    /// Version of the agent that created it, NUL-padded.
    pub created_by: [u8; 24],
    /// Version of the agent that last adopted it, NUL-padded.
    pub adopted_by: [u8; 24],
    /// Random, renewed by every agent that adopts the data plane: what its successor presents
    /// to take the listeners over. Reading it proves the right to change the data plane.
    pub handover_token: [u8; 16],
}

/// Indexes of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Outbound SYN from an enrolled pod assigned to the outbound listener.
    pub const OUTBOUND_CAPTURED: u32 = 0;
    /// Inbound SYN for an enrolled pod assigned to the inbound listener.
    pub const INBOUND_CAPTURED: u32 = 1;
    /// Non-SYN packet of a proxied connection delivered to the proxy's socket.
    pub const PROXIED_SEGMENTS: u32 = 2;
    /// Packet for an enrolled pod turned back from the veth's egress to its ingress.
    pub const INBOUND_REDIRECTED: u32 = 3;
    /// Packet of an enrolled pod left alone (not TCP, or a connection older than the enrollment).
    pub const PASSED: u32 = 4;
    /// SYN of an enrolled pod dropped because no proxy listener was there to take it (no agent
    /// serves the node): capture fails closed.
    pub const NO_LISTENER: u32 = 5;
    /// `bpf_sk_assign` failed.
    pub const ASSIGN_FAILED: u32 = 6;
    /// Packet from the proxy itself (its mark), never captured.
    pub const PROXY_OWN: u32 = 7;
    /// TCP connection of an enrolled pod established (sock_ops).
    pub const SOCKOPS_ESTABLISHED: u32 = 8;
    /// Packet for an enrolled pod sent by a process of the node itself (kubelet probes,
    /// host-network pods), never captured.
    pub const HOST_OWN: u32 = 9;
    /// Number of counters.
    pub const COUNT: u32 = 10;

    /// Names, in index order, as shown by `mesh-agent bpf`.
    pub const NAMES: [&str; COUNT as usize] = [
        "outbound_captured",
        "inbound_captured",
        "proxied_segments",
        "inbound_redirected",
        "passed",
        "no_listener",
        "assign_failed",
        "proxy_own",
        "sockops_established",
        "host_own",
    ];
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    const _: () = assert!(core::mem::size_of::<Workload>() == 8);
    const _: () = assert!(core::mem::size_of::<CaptureConfig>() == 20);
    const _: () = assert!(core::mem::size_of::<DataPlaneMeta>() == 88);
    // SAFETY: plain old data, no padding holes (checked above), every bit pattern valid.
    unsafe impl aya::Pod for Workload {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CaptureConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DataPlaneMeta {}
}
