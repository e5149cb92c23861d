//! What one wake-up costs on this machine: two threads pinned to given CPUs pass a byte back and
//! forth over a socket pair, each blocking in `read` until the other writes. The bench prints it
//! because a proxied connection is a chain of such wake-ups, so the figure explains its ratios.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};

/// The CPUs this thread may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .collect(),
        Err(_) => vec![0],
    }
}

/// Mean time of one round trip (two wake-ups) between a thread on `a` and a thread on `b`.
pub fn round_trip(a: usize, b: usize, round_trips: u32) -> Result<Duration> {
    let (mut here, mut there) = UnixStream::pair().context("creating a socket pair")?;
    let echo = std::thread::spawn(move || -> Result<()> {
        pin(b)?;
        let mut byte = [0u8; 1];
        for _ in 0..round_trips {
            there.read_exact(&mut byte)?;
            there.write_all(&byte)?;
        }
        Ok(())
    });
    // Moved in, so the socket closes when the measuring thread ends and the echo thread's read
    // returns even if measuring failed early.
    let measured = std::thread::spawn(move || -> Result<Duration> {
        pin(a)?;
        let mut byte = [0u8; 1];
        let start = Instant::now();
        for _ in 0..round_trips {
            here.write_all(&byte)?;
            here.read_exact(&mut byte)?;
        }
        Ok(start.elapsed() / round_trips.max(1))
    })
    .join()
    .map_err(|_| anyhow!("the measuring thread panicked"))?;
    let echoed = echo
        .join()
        .map_err(|_| anyhow!("the echo thread panicked"))?;
    let measured = measured?;
    echoed?;
    Ok(measured)
}

fn pin(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_round_trip() {
        let cpu = allowed_cpus()[0];
        let same = round_trip(cpu, cpu, 200).expect("measures");
        assert!(same > Duration::ZERO && same < Duration::from_millis(50));
    }
}
