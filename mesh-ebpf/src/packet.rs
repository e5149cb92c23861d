//! Bounds-checked parsing of Ethernet + IPv4 + TCP headers from a TC context.

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    programs::TcContext,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The addresses, ports and flags of an IPv4 TCP segment, all in network byte order.
pub struct Tcp4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
}

impl Tcp4 {
    /// `Ok(None)` for anything that is not the first fragment of an IPv4 TCP segment.
    #[inline(always)]
    pub fn parse(ctx: &TcContext) -> Result<Option<Self>, i64> {
        let ethertype: u16 = ctx.load(12)?;
        if u16::from_be(ethertype) != ETH_P_IP {
            return Ok(None);
        }
        let version_ihl: u8 = ctx.load(ETH_HLEN)?;
        let ihl = ((version_ihl & 0x0f) as usize) * 4;
        if version_ihl >> 4 != 4 || ihl < 20 || ihl > 60 {
            return Ok(None);
        }
        let protocol: u8 = ctx.load(ETH_HLEN + 9)?;
        if protocol != IPPROTO_TCP {
            return Ok(None);
        }
        let frag: u16 = ctx.load(ETH_HLEN + 6)?;
        if u16::from_be(frag) & 0x1fff != 0 {
            return Ok(None);
        }
        let l4 = ETH_HLEN + ihl;
        Ok(Some(Self {
            saddr: ctx.load(ETH_HLEN + 12)?,
            daddr: ctx.load(ETH_HLEN + 16)?,
            sport: ctx.load(l4)?,
            dport: ctx.load(l4 + 2)?,
            flags: ctx.load(l4 + 13)?,
        }))
    }

    /// A connection request: SYN without ACK.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// The tuple `bpf_skc_lookup_tcp` expects, seen from the receiver.
    #[inline(always)]
    pub fn tuple(&self) -> bpf_sock_tuple {
        bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                    saddr: self.saddr,
                    daddr: self.daddr,
                    sport: self.sport,
                    dport: self.dport,
                },
            },
        }
    }
}
