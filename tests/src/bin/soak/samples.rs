//! What the soak watches while it runs: each agent's resident memory, open descriptors and CPU
//! from `/proc/<pid>`, every [`EVERY`], printed as a table; and the verdict on memory at the end.

use std::{fs, time::Duration};

use mesh_tests::Agent;

/// How often the agents are sampled.
pub const EVERY: Duration = Duration::from_secs(10);
/// Memory is judged after this warm-up (less in runs shorter than three times it).
const WARMUP: Duration = Duration::from_secs(60);
/// The span averaged at each end of the judged part: its first minute and the run's last.
const WINDOW: Duration = Duration::from_secs(60);
/// The last minute may hold this much more than the first minute after the warm-up...
const GROWTH_ALLOWED: f64 = 0.10;
/// ...plus this, in KiB: jemalloc's decay of freed pages moves RSS by a few MiB either way.
const SLACK_KIB: f64 = 4.0 * 1024.0;

/// One agent at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentSample {
    pub rss_kib: Option<u64>,
    pub fds: Option<usize>,
    /// User plus system CPU time since the agent started, in clock ticks.
    cpu_ticks: Option<u64>,
}

impl AgentSample {
    pub fn of(agent: &Agent) -> Self {
        let pid = agent.pid();
        Self {
            rss_kib: agent.rss_kib(),
            fds: fs::read_dir(format!("/proc/{pid}/fd"))
                .ok()
                .map(|d| d.count()),
            cpu_ticks: cpu_ticks(pid),
        }
    }
}

/// utime + stime of `/proc/<pid>/stat` (fields 14 and 15; the command name may hold spaces).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A row of the table.
#[derive(Clone, Debug)]
pub struct Sample {
    pub elapsed: Duration,
    pub agents: [AgentSample; 2],
    /// Client connections holding.
    pub open: usize,
    pub echoed: u64,
    pub failures: usize,
}

pub fn print_header() {
    println!(
        "{:>7} {:>11} {:>11} {:>8} {:>8} {:>6} {:>6} {:>7} {:>12} {:>8}",
        "elapsed",
        "RSS n0 MiB",
        "RSS n1 MiB",
        "fds n0",
        "fds n1",
        "CPU0%",
        "CPU1%",
        "open",
        "echoed MiB",
        "failures"
    );
}

/// Prints `sample`, with each agent's CPU share since `previous`.
pub fn print_row(sample: &Sample, previous: Option<&Sample>) {
    let mib = |a: &AgentSample| {
        a.rss_kib
            .map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
    };
    let fds = |a: &AgentSample| a.fds.map_or("?".into(), |n| n.to_string());
    let cpu = |node: usize| -> String {
        let Some(previous) = previous else {
            return "-".into();
        };
        let (Some(now), Some(before)) = (
            sample.agents[node].cpu_ticks,
            previous.agents[node].cpu_ticks,
        ) else {
            return "?".into();
        };
        let wall = (sample.elapsed - previous.elapsed).as_secs_f64();
        // SAFETY: sysconf only reads a configuration value.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        format!("{:.0}", (now - before) as f64 / per_second / wall * 100.0)
    };
    println!(
        "{:>6.0}s {:>11} {:>11} {:>8} {:>8} {:>6} {:>6} {:>7} {:>12.1} {:>8}",
        sample.elapsed.as_secs_f64(),
        mib(&sample.agents[0]),
        mib(&sample.agents[1]),
        fds(&sample.agents[0]),
        fds(&sample.agents[1]),
        cpu(0),
        cpu(1),
        sample.open,
        sample.echoed as f64 / (1024.0 * 1024.0),
        sample.failures,
    );
}

/// The memory verdict for one agent.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// Average RSS over the first window after the warm-up, KiB.
    pub baseline_kib: f64,
    /// Average RSS over the run's last window, KiB.
    pub last_kib: f64,
    /// What `last_kib` may reach.
    pub limit_kib: f64,
    /// Least-squares slope over everything after the warm-up, MiB per hour (for the report).
    pub trend_mib_per_hour: f64,
    pub flat: bool,
}

impl Verdict {
    pub fn describe(&self) -> String {
        let mib = |k: f64| k / 1024.0;
        format!(
            "{:.1} MiB after warm-up, {:.1} MiB in the last window (limit {:.1}), trend {:+.1} MiB/h: {}",
            mib(self.baseline_kib),
            mib(self.last_kib),
            mib(self.limit_kib),
            self.trend_mib_per_hour,
            if self.flat { "flat" } else { "GREW" }
        )
    }
}

/// Judges one agent's RSS samples, `(elapsed, KiB)`, of a run of `total`: the average of the
/// last window must stay within [`GROWTH_ALLOWED`] plus [`SLACK_KIB`] of the average of the
/// first window after the warm-up. `None` if the run is too short to have two samples in each.
pub fn judge(samples: &[(Duration, u64)], total: Duration) -> Option<Verdict> {
    let warmup = WARMUP.min(total / 3);
    let window = WINDOW.min(total / 3);
    let average = |keep: &dyn Fn(Duration) -> bool| -> Option<f64> {
        let picked: Vec<f64> = samples
            .iter()
            .filter(|(t, _)| keep(*t))
            .map(|(_, kib)| *kib as f64)
            .collect();
        (picked.len() >= 2).then(|| picked.iter().sum::<f64>() / picked.len() as f64)
    };
    let baseline_kib = average(&|t| t >= warmup && t < warmup + window)?;
    let last_kib = average(&|t| t + window > total)?;
    let limit_kib = baseline_kib * (1.0 + GROWTH_ALLOWED) + SLACK_KIB;
    let judged: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(t, _)| *t >= warmup)
        .map(|(t, kib)| (t.as_secs_f64() / 3600.0, *kib as f64 / 1024.0))
        .collect();
    Some(Verdict {
        baseline_kib,
        last_kib,
        limit_kib,
        trend_mib_per_hour: slope(&judged),
        flat: last_kib <= limit_kib,
    })
}

/// Least-squares slope of `points`; 0 when it is undefined.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let var: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if points.len() < 2 || var == 0.0 {
        return 0.0;
    }
    points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / var
}

/// The limit of [`judge`] in words, for the report.
pub fn rule() -> String {
    format!(
        "after a {}-s warm-up, the last {}-s average RSS within +{:.0}% + {:.0} MiB of the first {}-s average after it (both shorter in runs under {} s)",
        WARMUP.as_secs(),
        WINDOW.as_secs(),
        GROWTH_ALLOWED * 100.0,
        SLACK_KIB / 1024.0,
        WINDOW.as_secs(),
        3 * WARMUP.as_secs(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kib_at: impl Fn(u64) -> u64) -> Vec<(Duration, u64)> {
        (0..=60)
            .map(|i| (Duration::from_secs(i * 10), kib_at(i * 10)))
            .collect()
    }

    #[test]
    fn flat_memory_passes_and_growth_fails() {
        let total = Duration::from_secs(600);
        let flat = judge(&run(|t| 100_000 + (t % 30) * 100), total).unwrap();
        assert!(flat.flat, "{flat:?}");
        assert!(flat.trend_mib_per_hour.abs() < 5.0, "{flat:?}");
        // 2 MiB a minute: about 16 MiB between the two windows, over 10% + 4 MiB of ~100 MiB.
        let leak = judge(&run(|t| 100_000 + t * 2048 / 60), total).unwrap();
        assert!(!leak.flat, "{leak:?}");
        assert!((leak.trend_mib_per_hour - 120.0).abs() < 1.0, "{leak:?}");
    }

    #[test]
    fn warm_up_growth_is_not_held_against_the_agent() {
        let total = Duration::from_secs(600);
        let verdict = judge(
            &run(|t| if t < 60 { 20_000 + t * 1000 } else { 90_000 }),
            total,
        )
        .unwrap();
        assert!(verdict.flat, "{verdict:?}");
    }

    #[test]
    fn a_short_trial_scales_its_windows_and_a_tiny_one_has_no_verdict() {
        let short: Vec<_> = (0..=6)
            .map(|i| (Duration::from_secs(i * 10), 50_000))
            .collect();
        assert!(judge(&short, Duration::from_secs(60)).unwrap().flat);
        let tiny: Vec<_> = (0..=2)
            .map(|i| (Duration::from_secs(i * 10), 50_000))
            .collect();
        assert!(judge(&tiny, Duration::from_secs(20)).is_none());
    }
}
