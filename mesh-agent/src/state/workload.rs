//! The mesh's view of a running pod: identity, address, node and enrollment, built from a Kubernetes Pod.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1 as k8s;
use serde::Serialize;

use super::enrollment::{self, Enrollment, PodFacts};
use super::namespace::namespace_of;
use super::small_map::{Labels, SmallMap};

/// Kubernetes' service account for pods that name none.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// `metadata.uid`, or `<namespace>/<name>` when the source has none (hand-written files).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// `spec.nodeName`.
    pub node: String,
    /// `spec.serviceAccountName`, `default` when unset: the workload's identity.
    pub service_account: String,
    /// `status.podIP`.
    pub ip: Ipv4Addr,
    pub labels: Labels,
    /// `spec.hostNetwork`: the pod's IP is the node's.
    pub host_network: bool,
    /// `status.phase` (`Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`).
    pub phase: Option<String>,
    pub enrollment: Enrollment,
    /// The pod's named TCP container ports (`spec.containers[].ports[]`): what a Service's
    /// named `targetPort` means on this pod.
    pub named_ports: SmallMap<u16>,
}

/// A Pod that cannot be turned into a workload; `field()` says where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("{0:?} is not an IPv4 address")]
    NotAnIp(String),
    #[error("{0} is an IPv6 address; only IPv4 is supported for now")]
    Ipv6(String),
    #[error("is required on a pod that has status.podIP")]
    MissingNode,
}

impl WorkloadError {
    pub fn field(&self) -> &'static str {
        match self {
            WorkloadError::NotAnIp(_) | WorkloadError::Ipv6(_) => "status.podIP",
            WorkloadError::MissingNode => "spec.nodeName",
        }
    }
}

impl Workload {
    pub fn is_enrolled(&self) -> bool {
        self.enrollment.is_enrolled()
    }

    pub fn is_terminal(&self) -> bool {
        enrollment::is_terminal(self.phase.as_deref())
    }

    /// Whether traffic from `self.ip` can be attributed to this pod: not for hostNetwork pods
    /// (they share the node's IP) nor for terminal ones (their IP may already be reused).
    pub fn owns_ip(&self) -> bool {
        !self.host_network && !self.is_terminal()
    }

    /// The enrollment this pod has in a namespace with these labels (a record of the pod alone
    /// has it decided without them).
    pub fn enrollment_with(&self, namespace_labels: &Labels) -> Enrollment {
        let facts = PodFacts {
            labels: &self.labels,
            host_network: self.host_network,
            phase: self.phase.as_deref(),
        };
        enrollment::evaluate(facts, namespace_labels)
    }

    /// Whether both are the same pod in the same state, whatever their enrollment.
    pub fn same_pod(&self, other: &Workload) -> bool {
        let Workload {
            uid,
            name,
            namespace,
            node,
            service_account,
            ip,
            labels,
            host_network,
            phase,
            enrollment: _,
            named_ports,
        } = self;
        (uid, name, namespace, node, service_account, ip)
            == (
                &other.uid,
                &other.name,
                &other.namespace,
                &other.node,
                &other.service_account,
                &other.ip,
            )
            && (labels, host_network, phase, named_ports)
                == (
                    &other.labels,
                    &other.host_network,
                    &other.phase,
                    &other.named_ports,
                )
    }

    /// Builds the workload of a pod. `Ok(None)` for a pod without `status.podIP` (not running yet).
    /// Every problem is returned, not only the first. `metadata.name` is checked by the caller.
    /// Enrollment is what the pod alone decides; its namespace's part is added when records are
    /// joined ([`Workload::enrollment_with`]).
    pub fn from_pod(pod: &k8s::Pod) -> Result<Option<Workload>, Vec<WorkloadError>> {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let Some(raw_ip) = status
            .and_then(|status| status.pod_ip.as_deref())
            .filter(|ip| !ip.is_empty())
        else {
            return Ok(None);
        };
        let mut errors = Vec::new();
        let ip = match raw_ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => Some(ip),
            Ok(IpAddr::V6(_)) => {
                errors.push(WorkloadError::Ipv6(raw_ip.to_string()));
                None
            }
            Err(_) => {
                errors.push(WorkloadError::NotAnIp(raw_ip.to_string()));
                None
            }
        };
        let node = spec
            .and_then(|spec| spec.node_name.as_deref())
            .filter(|node| !node.is_empty());
        if node.is_none() {
            errors.push(WorkloadError::MissingNode);
        }
        let (Some(ip), Some(node)) = (ip, node) else {
            return Err(errors);
        };

        let metadata = &pod.metadata;
        let name = metadata.name.clone().unwrap_or_default();
        let namespace = namespace_of(metadata).to_string();
        let labels: Labels = metadata.labels.clone().unwrap_or_default().into();
        let host_network = spec.and_then(|spec| spec.host_network).unwrap_or(false);
        let phase = status.and_then(|status| status.phase.clone());
        let facts = PodFacts {
            labels: &labels,
            host_network,
            phase: phase.as_deref(),
        };
        let enrollment = enrollment::evaluate(facts, &Labels::default());
        let named_ports = spec.map(named_tcp_ports).unwrap_or_default();
        Ok(Some(Workload {
            uid: metadata
                .uid
                .clone()
                .filter(|uid| !uid.is_empty())
                .unwrap_or_else(|| format!("{namespace}/{name}")),
            service_account: spec
                .and_then(|spec| spec.service_account_name.as_deref())
                .filter(|account| !account.is_empty())
                .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
                .to_string(),
            node: node.to_string(),
            name,
            namespace,
            ip,
            labels,
            host_network,
            phase,
            enrollment,
            named_ports,
        }))
    }
}

/// Named TCP ports of a pod's containers (the first of a name wins, as the API server forbids
/// duplicates anyway); unnamed, non-TCP and out-of-range ports are not addressable by name.
fn named_tcp_ports(spec: &k8s::PodSpec) -> SmallMap<u16> {
    let mut ports = BTreeMap::new();
    let declared = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten());
    for port in declared {
        let tcp = port.protocol.as_deref().is_none_or(|p| p == "TCP");
        if let (Some(name), true, Ok(number)) =
            (&port.name, tcp, u16::try_from(port.container_port))
            && number != 0
        {
            ports.entry(name.clone()).or_insert(number);
        }
    }
    ports.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(ip: Option<&str>, node: Option<&str>) -> k8s::Pod {
        k8s::Pod {
            metadata: ObjectMeta {
                name: Some("client".into()),
                namespace: Some("demo".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(Into::into),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(Into::into),
                phase: Some("Running".into()),
                ..PodStatus::default()
            }),
        }
    }

    fn ambient() -> Labels {
        [(enrollment::MODE_LABEL, Box::from("ambient"))].into()
    }

    #[test]
    fn builds_a_workload_with_defaults() {
        let workload = Workload::from_pod(&pod(Some("10.0.0.5"), Some("node-a")))
            .expect("valid")
            .expect("has an IP");
        assert_eq!(workload.uid, "demo/client");
        assert_eq!(workload.service_account, "default");
        assert_eq!(workload.ip, Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(workload.node, "node-a");
        assert!(!workload.is_enrolled(), "no namespace has spoken yet");
        assert!(workload.enrollment_with(&ambient()).is_enrolled());
        assert!(workload.owns_ip());
    }

    #[test]
    fn uses_uid_and_service_account() {
        let mut pod = pod(Some("10.0.0.5"), Some("node-a"));
        pod.metadata.uid = Some("1234".into());
        if let Some(spec) = pod.spec.as_mut() {
            spec.service_account_name = Some("web".into());
        }
        let workload = Workload::from_pod(&pod)
            .expect("must succeed")
            .expect("must succeed");
        assert_eq!(workload.uid, "1234");
        assert_eq!(workload.service_account, "web");
        assert!(!workload.is_enrolled());
    }

    #[test]
    fn named_tcp_ports_are_kept() {
        use k8s_openapi::api::core::v1::{Container, ContainerPort};
        let port = |name: Option<&str>, number: i32, protocol: Option<&str>| ContainerPort {
            name: name.map(Into::into),
            container_port: number,
            protocol: protocol.map(Into::into),
            ..ContainerPort::default()
        };
        let mut pod = pod(Some("10.0.0.5"), Some("node-a"));
        if let Some(spec) = pod.spec.as_mut() {
            spec.containers = vec![
                Container {
                    name: "app".into(),
                    ports: Some(vec![
                        port(Some("http"), 8080, None),
                        port(Some("dns"), 53, Some("UDP")),
                        port(None, 9000, Some("TCP")),
                    ]),
                    ..Container::default()
                },
                Container {
                    name: "sidecar".into(),
                    ports: Some(vec![
                        port(Some("admin"), 9901, Some("TCP")),
                        port(Some("bad"), 70000, None),
                    ]),
                    ..Container::default()
                },
            ];
        }
        let workload = Workload::from_pod(&pod).expect("valid").expect("has an IP");
        assert_eq!(
            workload.named_ports,
            [("admin", 9901), ("http", 8080)].into()
        );
    }

    #[test]
    fn pod_without_ip_is_skipped() {
        assert_eq!(Workload::from_pod(&pod(None, None)), Ok(None));
        assert_eq!(Workload::from_pod(&pod(Some(""), None)), Ok(None));
    }

    #[test]
    fn rejects_bad_ip_and_missing_node_together() {
        let errors = Workload::from_pod(&pod(Some("10.0.0.x"), None)).expect_err("must fail");
        assert_eq!(
            errors,
            vec![
                WorkloadError::NotAnIp("10.0.0.x".into()),
                WorkloadError::MissingNode
            ]
        );
        assert_eq!(errors[0].to_string(), "\"10.0.0.x\" is not an IPv4 address");
        assert_eq!(errors[0].field(), "status.podIP");
        assert_eq!(errors[1].field(), "spec.nodeName");
    }

    #[test]
    fn rejects_ipv6() {
        let errors = Workload::from_pod(&pod(Some("fd00::1"), Some("n"))).expect_err("must fail");
        assert_eq!(errors, vec![WorkloadError::Ipv6("fd00::1".into())]);
    }

    #[test]
    fn terminal_pod_does_not_own_its_ip() {
        let mut pod = pod(Some("10.0.0.5"), Some("node-a"));
        if let Some(status) = pod.status.as_mut() {
            status.phase = Some("Succeeded".into());
        }
        let workload = Workload::from_pod(&pod)
            .expect("must succeed")
            .expect("must succeed");
        assert!(!workload.owns_ip());
        assert!(!workload.enrollment_with(&ambient()).is_enrolled());
    }
}
