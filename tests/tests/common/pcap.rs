//! Reads TCP segments out of a classic pcap file (as `tcpdump -w` writes on an Ethernet device).

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Result, bail, ensure};

pub struct Segment {
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub payload: Vec<u8>,
}

/// Every IPv4 TCP segment in the capture, in order.
pub fn tcp_segments(file: &[u8]) -> Result<Vec<Segment>> {
    ensure!(file.len() >= 24, "pcap too short");
    let magic = u32::from_le_bytes([file[0], file[1], file[2], file[3]]);
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        other => bail!("not a pcap file (magic {other:#x})"),
    };
    let u32_at = |b: &[u8], i: usize| {
        let v = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    let linktype = u32_at(file, 20);
    ensure!(
        linktype == 1,
        "expected an Ethernet capture, got link type {linktype}"
    );
    let mut segments = Vec::new();
    let mut at = 24;
    while at + 16 <= file.len() {
        let caplen = u32_at(file, at + 8) as usize;
        let start = at + 16;
        let end = start + caplen;
        ensure!(end <= file.len(), "truncated packet record");
        if let Some(s) = parse_ethernet(&file[start..end]) {
            segments.push(s);
        }
        at = end;
    }
    Ok(segments)
}

fn parse_ethernet(frame: &[u8]) -> Option<Segment> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    if ip[9] != 6 || ip.len() < ihl + 20 || total < ihl + 20 {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = &ip[ihl..total];
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    let payload = tcp.get(data_offset..).unwrap_or_default().to_vec();
    Some(Segment {
        source: SocketAddrV4::new(src, sport),
        destination: SocketAddrV4::new(dst, dport),
        payload,
    })
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
