//! CPU time the whole machine spent busy (every process, the kernel and its softirq work), from
//! `/proc/stat`: the bench divides it by the connections made, which says what one connection
//! costs in work regardless of how long the wake-ups between the processes took.

use std::{fs, time::Duration};

use anyhow::{Context, Result, anyhow};

/// Busy time summed over all CPUs since boot: user, nice, system, irq and softirq (not idle,
/// I/O wait, or time the hypervisor gave to someone else).
pub fn machine_busy() -> Result<Duration> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = busy_ticks(&stat)?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_second <= 0 {
        return Err(anyhow!("sysconf(_SC_CLK_TCK) failed"));
    }
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
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
    fn a_short_line_is_an_error() {
        assert!(busy_ticks("cpu  1 2 3\n").is_err());
        assert!(busy_ticks("intr 5\n").is_err());
    }
}
