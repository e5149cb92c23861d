//! Whether a pod is captured by the mesh, with Istio ambient semantics, and why.

use std::collections::BTreeMap;

use serde::Serialize;

/// The project's own enrollment label, on namespaces (`ambient`) and pods (`none`).
pub const MODE_LABEL: &str = "mesh-agent.dev/mode";
/// Istio's label, honoured the same way so Istio manifests work unchanged.
pub const ISTIO_MODE_LABEL: &str = "istio.io/dataplane-mode";

const MODE_LABELS: [&str; 2] = [MODE_LABEL, ISTIO_MODE_LABEL];
const AMBIENT: &str = "ambient";
const NONE: &str = "none";
const TERMINAL_PHASES: [&str; 2] = ["Succeeded", "Failed"];

/// The decision for one pod; the reason is shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Enrollment {
    Enrolled { reason: String },
    NotEnrolled { reason: String },
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
    pub labels: &'a BTreeMap<String, String>,
    pub host_network: bool,
    pub phase: Option<&'a str>,
}

/// Returns true for pod phases that never run again (their IP may already belong to another pod).
pub fn is_terminal(phase: Option<&str>) -> bool {
    phase.is_some_and(|phase| TERMINAL_PHASES.contains(&phase))
}

/// Decides enrollment: exclusions first (hostNetwork, terminal, pod opt-out), then the namespace opt-in.
pub fn evaluate(pod: PodFacts<'_>, namespace_labels: &BTreeMap<String, String>) -> Enrollment {
    let not_enrolled = |reason: String| Enrollment::NotEnrolled { reason };
    if pod.host_network {
        // The pod shares the node's network namespace: capturing it would capture the node.
        return not_enrolled("pod uses hostNetwork".into());
    }
    if let Some(phase) = pod.phase.filter(|phase| is_terminal(Some(phase))) {
        return not_enrolled(format!("pod phase {phase} is terminal"));
    }
    if let Some(label) = MODE_LABELS
        .iter()
        .find(|label| pod.labels.get(**label).map(String::as_str) == Some(NONE))
    {
        return not_enrolled(format!("pod label {label}={NONE}"));
    }
    match MODE_LABELS
        .iter()
        .find(|label| namespace_labels.get(**label).map(String::as_str) == Some(AMBIENT))
    {
        Some(label) => Enrollment::Enrolled {
            reason: format!("namespace label {label}={AMBIENT}"),
        },
        None => not_enrolled("namespace not labelled for ambient".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(labels: &BTreeMap<String, String>) -> PodFacts<'_> {
        PodFacts {
            labels,
            host_network: false,
            phase: Some("Running"),
        }
    }

    fn check(pod: PodFacts<'_>, ns: &BTreeMap<String, String>, enrolled: bool, reason: &str) {
        let enrollment = evaluate(pod, ns);
        assert_eq!(enrollment.is_enrolled(), enrolled, "{enrollment:?}");
        assert_eq!(enrollment.reason(), reason);
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
        let enrollment = Enrollment::Enrolled { reason: "r".into() };
        let json = serde_json::to_string(&enrollment).expect("must succeed");
        assert_eq!(json, r#"{"state":"enrolled","reason":"r"}"#);
    }
}
