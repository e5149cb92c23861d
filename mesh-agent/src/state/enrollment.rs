//! Whether a pod is captured by the mesh, with Istio ambient semantics, and why.

use super::small_map::Labels;
use super::waypoint::{MANAGED_BY_MESH, MANAGED_LABEL};
use serde::Serialize;

/// The project's own enrollment label, on namespaces (`ambient`) and pods (`none`).
pub const MODE_LABEL: &str = "mesh-agent.dev/mode";
/// Istio's label, honoured the same way so Istio manifests work unchanged.
pub const ISTIO_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// Each mode label with the reasons it gives, as static text: every workload holds one.
const MODE_LABELS: [ModeLabel; 2] = [
    ModeLabel {
        name: MODE_LABEL,
        opted_out: "pod label mesh-agent.dev/mode=none",
        opted_in: "namespace label mesh-agent.dev/mode=ambient",
    },
    ModeLabel {
        name: ISTIO_MODE_LABEL,
        opted_out: "pod label istio.io/dataplane-mode=none",
        opted_in: "namespace label istio.io/dataplane-mode=ambient",
    },
];

struct ModeLabel {
    name: &'static str,
    opted_out: &'static str,
    opted_in: &'static str,
}
const AMBIENT: &str = "ambient";
const NONE: &str = "none";
/// Pod phases that never run again, with the reason each gives.
const TERMINAL_PHASES: [(&str, &str); 2] = [
    ("Succeeded", "pod phase Succeeded is terminal"),
    ("Failed", "pod phase Failed is terminal"),
];

/// The reason a terminal phase gives; `None` for a phase that may still run.
fn terminal_reason(phase: Option<&str>) -> Option<&'static str> {
    let phase = phase?;
    TERMINAL_PHASES
        .iter()
        .find(|(terminal, _)| *terminal == phase)
        .map(|(_, reason)| *reason)
}

/// The decision for one pod; the reason is shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Enrollment {
    Enrolled { reason: &'static str },
    NotEnrolled { reason: &'static str },
}

impl Enrollment {
    pub fn is_enrolled(&self) -> bool {
        matches!(self, Enrollment::Enrolled { .. })
    }

    pub fn reason(&self) -> &str {
        match self {
            Enrollment::Enrolled { reason } | Enrollment::NotEnrolled { reason } => reason,
        }
    }
}

/// What the rules look at on a pod.
#[derive(Debug, Clone, Copy)]
pub struct PodFacts<'a> {
    pub labels: &'a Labels,
    pub host_network: bool,
    pub phase: Option<&'a str>,
}

/// Returns true for pod phases that never run again (their IP may already belong to another pod).
pub fn is_terminal(phase: Option<&str>) -> bool {
    terminal_reason(phase).is_some()
}

/// Decides enrollment: exclusions first (hostNetwork, terminal, pod opt-out), then the namespace opt-in.
pub fn evaluate(pod: PodFacts<'_>, namespace_labels: &Labels) -> Enrollment {
    let not_enrolled = |reason| Enrollment::NotEnrolled { reason };
    if pod.host_network {
        // The pod shares the node's network namespace: capturing it would capture the node.
        return not_enrolled("pod uses hostNetwork");
    }
    if let Some(reason) = terminal_reason(pod.phase) {
        return not_enrolled(reason);
    }
    if let Some(label) = MODE_LABELS
        .iter()
        .find(|label| pod.labels.value(label.name) == Some(NONE))
    {
        return not_enrolled(label.opted_out);
    }
    if pod.labels.value(MANAGED_LABEL) == Some(MANAGED_BY_MESH) {
        // A waypoint terminates and originates HBONE itself (its manifests also say `none`).
        return not_enrolled("waypoint pod (gateway.istio.io/managed=istio.io-mesh-controller)");
    }
    match MODE_LABELS
        .iter()
        .find(|label| namespace_labels.value(label.name) == Some(AMBIENT))
    {
        Some(label) => Enrollment::Enrolled {
            reason: label.opted_in,
        },
        None => not_enrolled("namespace not labelled for ambient"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (*k, Box::from(*v))).collect()
    }

    fn pod(labels: &Labels) -> PodFacts<'_> {
        PodFacts {
            labels,
            host_network: false,
            phase: Some("Running"),
        }
    }

    fn check(pod: PodFacts<'_>, ns: &Labels, enrolled: bool, reason: &str) {
        let enrollment = evaluate(pod, ns);
        assert_eq!(enrollment.is_enrolled(), enrolled, "{enrollment:?}");
        assert_eq!(enrollment.reason(), reason);
    }

    #[test]
    fn waypoint_pods_are_never_captured() {
        check(
            pod(&labels(&[(MANAGED_LABEL, MANAGED_BY_MESH)])),
            &labels(&[(ISTIO_MODE_LABEL, "ambient")]),
            false,
            "waypoint pod (gateway.istio.io/managed=istio.io-mesh-controller)",
        );
    }

    #[test]
    fn namespace_label_enrolls() {
        let none = labels(&[]);
        check(
            pod(&none),
            &labels(&[(MODE_LABEL, "ambient")]),
            true,
            "namespace label mesh-agent.dev/mode=ambient",
        );
        check(
            pod(&none),
            &labels(&[(ISTIO_MODE_LABEL, "ambient")]),
            true,
            "namespace label istio.io/dataplane-mode=ambient",
        );
    }

    #[test]
    fn unlabelled_or_other_value_namespace_does_not_enroll() {
        let none = labels(&[]);
        for ns in [labels(&[]), labels(&[(MODE_LABEL, "sidecar")])] {
            check(pod(&none), &ns, false, "namespace not labelled for ambient");
        }
    }

    #[test]
    fn pod_opt_out_wins_over_namespace() {
        let ns = labels(&[(MODE_LABEL, "ambient")]);
        let ours = labels(&[(MODE_LABEL, "none")]);
        check(pod(&ours), &ns, false, "pod label mesh-agent.dev/mode=none");
        let istio = labels(&[(ISTIO_MODE_LABEL, "none")]);
        check(
            pod(&istio),
            &ns,
            false,
            "pod label istio.io/dataplane-mode=none",
        );
    }

    #[test]
    fn host_network_and_terminal_pods_are_never_enrolled() {
        let ns = labels(&[(MODE_LABEL, "ambient")]);
        let none = labels(&[]);
        let host = PodFacts {
            host_network: true,
            ..pod(&none)
        };
        check(host, &ns, false, "pod uses hostNetwork");
        for phase in ["Succeeded", "Failed"] {
            let done = PodFacts {
                phase: Some(phase),
                ..pod(&none)
            };
            check(done, &ns, false, &format!("pod phase {phase} is terminal"));
        }
        let pending = PodFacts {
            phase: Some("Pending"),
            ..pod(&none)
        };
        assert!(evaluate(pending, &ns).is_enrolled());
    }

    #[test]
    fn serializes_with_a_tag() {
        let enrollment = Enrollment::Enrolled { reason: "r" };
        let json = serde_json::to_string(&enrollment).expect("must succeed");
        assert_eq!(json, r#"{"state":"enrolled","reason":"r"}"#);
    }
}
