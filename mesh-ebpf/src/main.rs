//! eBPF programs of mesh-agent: capture of enrolled pods' TCP into the node proxy.
//!
//! Capture works on the pod's host-side veth, in the node's network namespace:
//! - `capture_ingress` (TC ingress, packets leaving the pod, and packets turned back by
//!   `capture_egress`): a SYN is handed to the proxy's transparent listener with `bpf_sk_assign`
//!   and every packet of a proxied connection is marked so a policy route delivers it locally.
//! - `capture_egress` (TC egress, packets about to enter the pod): anything not sent by the
//!   proxy itself (its `SO_MARK`) or by another process of the node that belongs to a proxied
//!   connection, or opens a new one, is turned back to the veth's ingress, where
//!   `capture_ingress` hands it to the inbound listener.
//! - `observe_sockops` (sock_ops on cgroup v2): counts TCP connections that enrolled pods establish.
//!
//! The programs fail closed: the links stay pinned when the agent is gone, and a new connection
//! of an enrolled pod that finds no proxy listener is dropped, never passed in plaintext (the
//! client's SYN retransmission then reaches an agent that is back within seconds).
#![no_std]
#![no_main]

mod maps;
mod packet;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_TCP_LISTEN, TC_ACT_OK, TC_ACT_SHOT, bpf_sock,
        bpf_sock_tuple,
    },
    helpers::generated::{bpf_redirect, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, sock_ops},
    programs::{SockOpsContext, TcContext},
};
use mesh_common::{CaptureConfig, counter};

use crate::{
    maps::{CONFIG, count, is_enrolled},
    packet::Tcp4,
};

/// `BPF_F_CURRENT_NETNS`: look sockets up in the namespace of the packet's device.
const CURRENT_NETNS: u64 = u64::MAX;
const PACKET_HOST: u32 = 0;

#[classifier]
pub fn capture_ingress(ctx: TcContext) -> i32 {
    try_capture_ingress(&ctx).unwrap_or(TC_ACT_OK as i32)
}

/// On the node's uplink(s): packets from other nodes for enrolled pods go straight to the proxy
/// (instead of being forwarded to the pod's veth and turned back there).
#[classifier]
pub fn capture_uplink(ctx: TcContext) -> i32 {
    try_capture_uplink(&ctx).unwrap_or(TC_ACT_OK as i32)
}

#[classifier]
pub fn capture_egress(ctx: TcContext) -> i32 {
    try_capture_egress(&ctx).unwrap_or(TC_ACT_OK as i32)
}

#[sock_ops]
pub fn observe_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        && ctx.family() == 2
        && is_enrolled(ctx.local_ip4())
    {
        count(counter::SOCKOPS_ESTABLISHED);
    }
    1
}

fn config() -> Option<&'static CaptureConfig> {
    CONFIG.get(0)
}

/// Where a connection an enrolled pod takes part in belongs.
#[derive(Clone, Copy)]
enum Direction {
    /// The pod is the client.
    Outbound,
    /// The pod is the server (the packet was turned back here by `capture_egress`).
    Inbound,
}

fn try_capture_ingress(ctx: &TcContext) -> Result<i32, i64> {
    let Some(tcp) = Tcp4::parse(ctx)? else {
        return Ok(TC_ACT_OK as i32);
    };
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK as i32);
    };
    let direction = if is_enrolled(tcp.saddr) {
        Direction::Outbound
    } else if is_enrolled(tcp.daddr) {
        Direction::Inbound
    } else {
        return Ok(TC_ACT_OK as i32);
    };
    if let Direction::Inbound = direction {
        // Turned back from egress: the frame still carries the pod's MAC, so the stack would
        // drop it as PACKET_OTHERHOST before it reaches the socket.
        ctx.change_type(PACKET_HOST)?;
    }
    steer(ctx, &tcp, cfg, direction)
}

fn try_capture_uplink(ctx: &TcContext) -> Result<i32, i64> {
    let Some(tcp) = Tcp4::parse(ctx)? else {
        return Ok(TC_ACT_OK as i32);
    };
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK as i32);
    };
    if !is_enrolled(tcp.daddr) {
        return Ok(TC_ACT_OK as i32);
    }
    steer(ctx, &tcp, cfg, Direction::Inbound)
}

/// Delivers a segment of a proxied connection to the proxy's socket, or a new connection's SYN
/// to the listener for its direction; leaves anything else alone.
fn steer(
    ctx: &TcContext,
    tcp: &Tcp4,
    cfg: &CaptureConfig,
    direction: Direction,
) -> Result<i32, i64> {
    let mut tuple = tcp.tuple();
    match lookup(ctx, &mut tuple) {
        Some(SocketState::Connected) => {
            // The proxy's socket for this connection exists: the policy route delivers it.
            ctx.set_mark(cfg.capture_mark);
            count(counter::PROXIED_SEGMENTS);
            return Ok(TC_ACT_OK as i32);
        }
        Some(SocketState::Listening) | None => {}
    }
    if !tcp.is_syn() {
        // A connection that predates the enrollment (or the agent): leave it alone.
        count(counter::PASSED);
        return Ok(TC_ACT_OK as i32);
    }
    let port = match direction {
        Direction::Outbound => cfg.outbound_port,
        Direction::Inbound => cfg.inbound_listener(u16::from_be(tcp.dport)),
    };
    set_dport(&mut tuple, port);
    // SAFETY: the tuple is a valid, initialised ipv4 tuple on the stack.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), &mut tuple, TUPLE4_LEN, CURRENT_NETNS, 0) };
    if sk.is_null() {
        // No agent serves this node: fail closed.
        count(counter::NO_LISTENER);
        return Ok(TC_ACT_SHOT as i32);
    }
    // SAFETY: `sk` is a non-null socket reference returned by the lookup helper.
    let listening = unsafe { (*sk).state } == BPF_TCP_LISTEN;
    let assigned = listening && unsafe { bpf_sk_assign(ctx.as_ptr(), sk as *mut _, 0) } == 0;
    // SAFETY: every reference from a lookup helper must be released exactly once.
    unsafe { bpf_sk_release(sk as *mut _) };
    if !assigned {
        count(if listening {
            counter::ASSIGN_FAILED
        } else {
            counter::NO_LISTENER
        });
        return Ok(TC_ACT_SHOT as i32);
    }
    ctx.set_mark(cfg.capture_mark);
    count(match direction {
        Direction::Outbound => counter::OUTBOUND_CAPTURED,
        Direction::Inbound => counter::INBOUND_CAPTURED,
    });
    Ok(TC_ACT_OK as i32)
}

fn try_capture_egress(ctx: &TcContext) -> Result<i32, i64> {
    let Some(tcp) = Tcp4::parse(ctx)? else {
        return Ok(TC_ACT_OK as i32);
    };
    if !is_enrolled(tcp.daddr) {
        return Ok(TC_ACT_OK as i32);
    }
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK as i32);
    };
    // SAFETY: the context of a TC program is a `__sk_buff`.
    let skb = unsafe { &*(ctx.as_ptr() as *const __sk_buff) };
    if skb.mark & cfg.proxy_mark_mask == cfg.proxy_mark {
        count(counter::PROXY_OWN);
        return Ok(TC_ACT_OK as i32);
    }
    // Sent by a process of the node itself: only such packets still carry a socket here (a
    // forwarded one lost its socket crossing into this namespace). Kubelet probes and
    // host-network pods reach the pod directly, as in Istio ambient, where host traffic to
    // ambient pods bypasses ztunnel (so STRICT does not refuse a pod's own health probes).
    // SAFETY: reading the `sk` member of the context; the verifier types it as a nullable
    // socket pointer, which is only compared with null.
    if !unsafe { skb.__bindgen_anon_2.sk }.is_null() {
        count(counter::HOST_OWN);
        return Ok(TC_ACT_OK as i32);
    }
    let mut tuple = tcp.tuple();
    match lookup(ctx, &mut tuple) {
        Some(SocketState::Connected) => {}
        Some(SocketState::Listening) | None if tcp.is_syn() => {
            set_dport(&mut tuple, cfg.inbound_listener(u16::from_be(tcp.dport)));
            if !matches!(lookup(ctx, &mut tuple), Some(SocketState::Listening)) {
                // A new connection for an enrolled pod and no agent to take it: fail closed.
                count(counter::NO_LISTENER);
                return Ok(TC_ACT_SHOT as i32);
            }
        }
        // A connection that predates the enrollment (or the agent): leave it alone.
        _ => return Ok(TC_ACT_OK as i32),
    }
    count(counter::INBOUND_REDIRECTED);
    // SAFETY: plain helper call; the ifindex is the veth this program runs on.
    Ok(unsafe { bpf_redirect(skb.ifindex, BPF_F_INGRESS as u64) } as i32)
}

#[derive(Clone, Copy)]
enum SocketState {
    Listening,
    Connected,
}

const TUPLE4_LEN: u32 = 12;

/// Looks the tuple up among the node's TCP sockets and releases the reference at once.
fn lookup(ctx: &TcContext, tuple: &mut bpf_sock_tuple) -> Option<SocketState> {
    // SAFETY: the tuple is a valid ipv4 tuple; the returned reference is released below.
    let sk: *mut bpf_sock =
        unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, TUPLE4_LEN, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null reference from the lookup helper.
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk as *mut _) };
    Some(if state == BPF_TCP_LISTEN {
        SocketState::Listening
    } else {
        SocketState::Connected
    })
}

fn set_dport(tuple: &mut bpf_sock_tuple, port: u16) {
    // Writing a union field is safe; the ipv4 member is the one `Tcp4::tuple` initialised.
    tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
