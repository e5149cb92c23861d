//! Captures with `tcpdump -w` in a namespace, and reads the TCP segments out of the classic pcap
//! file it writes on an Ethernet device.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

/// A running `tcpdump -w FILE` (stopped with SIGTERM by [`Capture::finish`], killed on drop).
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts tcpdump on `device` of `netns` with a capture `filter`, and returns once tcpdump
    /// says it is listening, so that nothing sent afterwards can be missed.
    pub fn start(
        netns: &mesh_tests::Netns,
        device: &str,
        file: &Path,
        filter: &str,
    ) -> Result<Capture> {
        let mut child = netns
            .command("tcpdump")
            .args(["-i", device, "-n", "-U", "-s", "0", "-w"])
            .arg(file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        let stderr = child.stderr.take().context("tcpdump's stderr")?;
        let (tx, rx) = mpsc::channel();
        // Drains tcpdump's stderr for its whole life; the first line that says it listens wakes us.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let capture = Capture {
            child,
            file: file.to_owned(),
        };
        let deadline = std::time::Instant::now() + super::SETTLE;
        let mut said = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) if line.contains("listening on") => return Ok(capture),
                Ok(line) => said.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("tcpdump exited before listening: {said:?}")
                }
                Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                    bail!("tcpdump not listening after {:?}: {said:?}", super::SETTLE)
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Stops tcpdump (it writes out what it holds on SIGTERM) and reads the capture.
    pub fn finish(mut self) -> Result<Vec<Segment>> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        self.child.wait()?;
        tcp_segments(&std::fs::read(&self.file)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
