//! CPU time the whole machine spent busy (every process, the kernel and its softirq work), from
//! `/proc/stat`: the bench divides it by the connections made, which says what one connection
//! costs in work regardless of how long the wake-ups between the processes took. And the CPU
//! time of one process (all its threads), from `/proc/<pid>/stat`: what a proxy spent, whatever
//! else the machine was doing meanwhile.

use std::{fs, time::Duration};

use anyhow::{Context, Result, anyhow};

/// Busy time summed over all CPUs since boot: user, nice, system, irq and softirq (not idle,
/// I/O wait, or time the hypervisor gave to someone else).
pub fn machine_busy() -> Result<Duration> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    ticks_to_time(busy_ticks(&stat)?)
}

/// User and system time of process `pid`, all its threads, since it started.
pub fn process_busy(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    ticks_to_time(process_ticks(&stat).with_context(|| format!("parsing {path}"))?)
}

fn ticks_to_time(ticks: u64) -> Result<Duration> {
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        return Err(anyhow!("sysconf(_SC_CLK_TCK) failed"));
    }
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// `utime + stime` of a `/proc/<pid>/stat` line: fields 14 and 15, counted after the command
/// name, which is in parentheses and may itself hold spaces and parentheses.
fn process_ticks(stat: &str) -> Result<u64> {
    let (_, rest) = stat
        .rsplit_once(") ")
        .ok_or_else(|| anyhow!("no command name in {stat:?}"))?;
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        let value = fields
            .get(i)
            .ok_or_else(|| anyhow!("{} fields after the command name", fields.len()))?;
        value
            .parse()
            .with_context(|| format!("field {} {value:?}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// The busy ticks of the aggregate `cpu` line of `/proc/stat`.
fn busy_ticks(stat: &str) -> Result<u64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("/proc/stat has no aggregate cpu line"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().with_context(|| format!("/proc/stat field {f:?}")))
        .collect::<Result<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let field = |i: usize| {
        fields
            .get(i)
            .copied()
            .ok_or_else(|| anyhow!("/proc/stat cpu line has {} fields", fields.len()))
    };
    Ok(field(0)? + field(1)? + field(2)? + field(5)? + field(6)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_busy_fields_only() {
        let stat = "cpu  100 2 30 5000 7 1 4 9 0 0\ncpu0 50 1 15 2500 3 0 2 4 0 0\n";
        assert_eq!(busy_ticks(stat).unwrap(), 100 + 2 + 30 + 1 + 4);
    }

    #[test]
    fn sums_a_process_user_and_system_time() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 99 1 2\n";
        assert_eq!(process_ticks(stat).unwrap(), 250 + 75);
        assert!(process_ticks("42 (x) S 1 2\n").is_err());
    }

    #[test]
    fn a_short_line_is_an_error() {
        assert!(busy_ticks("cpu  1 2 3\n").is_err());
        assert!(busy_ticks("intr 5\n").is_err());
    }
}
