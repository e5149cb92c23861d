//! The Linux capabilities the agent needs, checked at start: a missing one is named in one line,
//! instead of surfacing later as an `EPERM` deep inside a map creation, a verifier log or a bind.
//!
//! What needs which (the DaemonSet in `deploy/` grants exactly these, and `tests/tests/privileges.rs`
//! runs the agent with exactly these):
//! - `CAP_BPF`: creating the eBPF maps and loading the programs;
//! - `CAP_NET_ADMIN`: attaching TCX and sock_ops programs, the transparent listeners
//!   (`IP_TRANSPARENT`), marking the proxy's sockets (`SO_MARK`), the policy rule and route;
//! - `CAP_PERFMON`: the verifier accepts `capture_egress`'s pointer arithmetic only from a loader
//!   it does not treat as unprivileged (its Spectre mitigations).
//!
//! `CAP_SYS_ADMIN` stands in for `CAP_BPF` and `CAP_PERFMON`, as it does in the kernel (older
//! runtimes that do not know the two newer capabilities).

/// A capability the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needed {
    pub name: &'static str,
    pub bit: u32,
    pub why: &'static str,
    /// Whether `CAP_SYS_ADMIN` grants it too.
    pub sys_admin_will_do: bool,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub const NEEDED: [Needed; 3] = [
    Needed {
        name: "CAP_BPF",
        bit: CAP_BPF,
        why: "to create eBPF maps and load the capture programs",
        sys_admin_will_do: true,
    },
    Needed {
        name: "CAP_NET_ADMIN",
        bit: CAP_NET_ADMIN,
        why: "to attach TC and sock_ops programs, bind transparent listeners, mark sockets and set the policy route",
        sys_admin_will_do: false,
    },
    Needed {
        name: "CAP_PERFMON",
        bit: CAP_PERFMON,
        why: "so the verifier accepts the capture programs' pointer arithmetic",
        sys_admin_will_do: true,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error("missing capabilit{}: {}", if .0.len() == 1 { "y" } else { "ies" }, describe(.0))]
    Missing(Vec<Needed>),
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Unreadable(String),
}

fn describe(missing: &[Needed]) -> String {
    missing
        .iter()
        .map(|n| format!("{} ({})", n.name, n.why))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fails naming every needed capability this process does not have in its effective set.
pub fn check() -> Result<(), CapabilityError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| CapabilityError::Unreadable(e.to_string()))?;
    let effective = effective_set(&status).ok_or_else(|| {
        CapabilityError::Unreadable("no CapEff line with a hexadecimal mask".into())
    })?;
    let missing = missing(effective);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CapabilityError::Missing(missing))
    }
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
pub fn effective_set(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
}

/// The needed capabilities `effective` lacks.
pub fn missing(effective: u64) -> Vec<Needed> {
    let has = |bit: u32| effective & (1u64 << bit) != 0;
    NEEDED
        .iter()
        .filter(|n| !(has(n.bit) || (n.sys_admin_will_do && has(CAP_SYS_ADMIN))))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(bits: &[u32]) -> u64 {
        bits.iter().fold(0, |m, b| m | (1 << b))
    }

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tmesh-agent\nCapInh:\t0000000000000000\nCapPrm:\t000000c000001000\nCapEff:\t000000c000001000\nCapBnd:\t000000c000001000\n";
        assert_eq!(effective_set(status), Some(mask(&[12, 38, 39])));
        assert_eq!(effective_set("CapEff:\tzz\n"), None);
        assert_eq!(effective_set("Name: x\n"), None);
    }

    #[test]
    fn names_what_is_missing() {
        assert!(missing(mask(&[12, 38, 39])).is_empty());
        assert!(missing(u64::MAX).is_empty());
        // SYS_ADMIN stands in for BPF and PERFMON, never for NET_ADMIN.
        assert!(missing(mask(&[12, 21])).is_empty());
        let names = |m: u64| missing(m).iter().map(|n| n.name).collect::<Vec<_>>();
        assert_eq!(names(mask(&[21])), ["CAP_NET_ADMIN"]);
        assert_eq!(names(mask(&[12, 39])), ["CAP_PERFMON"]);
        assert_eq!(names(0), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
        let error = CapabilityError::Missing(missing(mask(&[12, 38]))).to_string();
        assert_eq!(
            error,
            "missing capability: CAP_BPF (to create eBPF maps and load the capture programs)"
        );
    }
}
