//! The mesh's view of a Kubernetes Service: virtual IP, ports and the selector that picks its workloads.

use super::small_map::Labels;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use super::namespace::namespace_of;
use super::workload::Workload;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `spec.clusterIP`; `None` for headless (`None`) and unallocated (empty) services.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// `spec.selector`. Empty means the service selects no pod (its endpoints are managed by hand).
    pub selector: Labels,
    /// `metadata.labels`: `istio.io/use-waypoint` and its namespace live here.
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// `None` when unset: Kubernetes then uses `port`.
    pub target_port: Option<TargetPort>,
    pub protocol: Protocol,
    /// What the port carries, from `appProtocol` or the name's prefix ([`AppProtocol::of`]).
    pub app_protocol: AppProtocol,
}

/// What a Service port carries, as Istio selects it: `appProtocol` first, else the port name's
/// prefix before the first `-` (`http-web`, `grpc`); anything else is plain TCP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    Http,
    Http2,
    Grpc,
    #[default]
    Tcp,
}

impl AppProtocol {
    pub fn of(name: Option<&str>, app_protocol: Option<&str>) -> AppProtocol {
        let by_name = || {
            let name = name?;
            let prefix = name.split_once('-').map_or(name, |(prefix, _)| prefix);
            Self::named(prefix)
        };
        app_protocol
            .and_then(Self::named)
            .or_else(by_name)
            .unwrap_or_default()
    }

    fn named(value: &str) -> Option<AppProtocol> {
        Some(match value.to_ascii_lowercase().as_str() {
            "http" => AppProtocol::Http,
            "http2" | "kubernetes.io/h2c" => AppProtocol::Http2,
            "grpc" | "grpc-web" => AppProtocol::Grpc,
            // Named, and not HTTP to a waypoint: TLS passes through as bytes.
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => AppProtocol::Tcp,
            _ => return None,
        })
    }

    /// Whether a waypoint handles the port as HTTP (else it passes it as TCP).
    pub fn is_http(self) -> bool {
        self != AppProtocol::Tcp
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    /// A named container port, resolved per pod.
    Name(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

/// A Service that cannot be used; `field()` says where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("{0:?} is not an IPv4 address (nor \"None\")")]
    ClusterIpNotAnIp(String),
    #[error("{0} is an IPv6 address; only IPv4 is supported for now")]
    ClusterIpV6(String),
    #[error("{port} is out of range 1-65535")]
    PortOutOfRange { index: usize, port: i32 },
    #[error("{port} is out of range 1-65535")]
    TargetPortOutOfRange { index: usize, port: i32 },
    #[error("must not be empty")]
    EmptyTargetPortName { index: usize },
    #[error("{value:?} is not a supported protocol (TCP, UDP, SCTP)")]
    UnknownProtocol { index: usize, value: String },
}

impl ServiceError {
    pub fn field(&self) -> String {
        match self {
            ServiceError::ClusterIpNotAnIp(_) | ServiceError::ClusterIpV6(_) => {
                "spec.clusterIP".into()
            }
            ServiceError::PortOutOfRange { index, .. } => format!("spec.ports[{index}].port"),
            ServiceError::TargetPortOutOfRange { index, .. }
            | ServiceError::EmptyTargetPortName { index } => {
                format!("spec.ports[{index}].targetPort")
            }
            ServiceError::UnknownProtocol { index, .. } => format!("spec.ports[{index}].protocol"),
        }
    }
}

impl Service {
    /// Whether the service sends traffic to this workload: same namespace, every selector label matches.
    pub fn selects(&self, workload: &Workload) -> bool {
        !self.selector.is_empty()
            && workload.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(key, value)| workload.labels.get(key) == Some(value))
    }

    /// Builds the model of a Service; every problem is returned. `metadata.name` is checked by the caller.
    pub fn from_k8s(service: &k8s::Service) -> Result<Service, Vec<ServiceError>> {
        let mut errors = Vec::new();
        let spec = service.spec.as_ref();
        let cluster_ip = spec
            .and_then(|spec| spec.cluster_ip.as_deref())
            .and_then(|ip| parse_cluster_ip(ip).map_err(|e| errors.push(e)).ok())
            .flatten();
        let ports = spec
            .and_then(|spec| spec.ports.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(index, port)| {
                port_from_k8s(index, port)
                    .map_err(|e| errors.extend(e))
                    .ok()
            })
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Service {
            name: service.metadata.name.clone().unwrap_or_default(),
            namespace: namespace_of(&service.metadata).to_string(),
            cluster_ip,
            ports,
            selector: spec
                .and_then(|spec| spec.selector.clone())
                .unwrap_or_default()
                .into(),
            labels: service.metadata.labels.clone().unwrap_or_default().into(),
        })
    }
}

/// `None` and empty mean "no virtual IP"; anything else must be an IPv4 address.
fn parse_cluster_ip(raw: &str) -> Result<Option<Ipv4Addr>, ServiceError> {
    if raw.is_empty() || raw == "None" {
        return Ok(None);
    }
    match raw.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => Ok(Some(ip)),
        Ok(IpAddr::V6(_)) => Err(ServiceError::ClusterIpV6(raw.to_string())),
        Err(_) => Err(ServiceError::ClusterIpNotAnIp(raw.to_string())),
    }
}

fn port_from_k8s(index: usize, port: &k8s::ServicePort) -> Result<ServicePort, Vec<ServiceError>> {
    let mut errors = Vec::new();
    let number = valid_port(port.port);
    if number.is_none() {
        errors.push(ServiceError::PortOutOfRange {
            index,
            port: port.port,
        });
    }
    let target_port = match &port.target_port {
        None => None,
        Some(IntOrString::Int(target)) => match valid_port(*target) {
            Some(target) => Some(TargetPort::Number(target)),
            None => {
                errors.push(ServiceError::TargetPortOutOfRange {
                    index,
                    port: *target,
                });
                None
            }
        },
        Some(IntOrString::String(name)) if name.is_empty() => {
            errors.push(ServiceError::EmptyTargetPortName { index });
            None
        }
        Some(IntOrString::String(name)) => Some(TargetPort::Name(name.clone())),
    };
    let protocol = match port.protocol.as_deref() {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            errors.push(ServiceError::UnknownProtocol {
                index,
                value: other.to_string(),
            });
            Protocol::Tcp
        }
    };
    match number {
        Some(number) if errors.is_empty() => Ok(ServicePort {
            name: port.name.clone().filter(|name| !name.is_empty()),
            port: number,
            target_port,
            protocol,
            app_protocol: AppProtocol::of(port.name.as_deref(), port.app_protocol.as_deref()),
        }),
        _ => Err(errors),
    }
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn service(cluster_ip: Option<&str>, ports: Vec<k8s::ServicePort>) -> k8s::Service {
        k8s::Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("demo".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: cluster_ip.map(Into::into),
                ports: Some(ports),
                selector: Some([("app".to_string(), "web".to_string())].into()),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    fn port(port: i32, target: Option<IntOrString>) -> k8s::ServicePort {
        k8s::ServicePort {
            port,
            target_port: target,
            ..k8s::ServicePort::default()
        }
    }

    #[test]
    fn builds_a_service() {
        let svc = service(
            Some("10.96.0.10"),
            vec![
                port(80, Some(IntOrString::Int(8080))),
                port(443, Some(IntOrString::String("https".into()))),
                port(53, None),
            ],
        );
        let model = Service::from_k8s(&svc).expect("must succeed");
        assert_eq!(model.cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!(model.ports.len(), 3);
        assert_eq!(model.ports[0].target_port, Some(TargetPort::Number(8080)));
        assert_eq!(
            model.ports[1].target_port,
            Some(TargetPort::Name("https".into()))
        );
        assert_eq!(model.ports[2].target_port, None);
        assert_eq!(model.ports[2].protocol, Protocol::Tcp);
    }

    #[test]
    fn app_protocol_from_app_protocol_then_name() {
        let cases = [
            (Some("http-web"), None, AppProtocol::Http),
            (Some("http"), None, AppProtocol::Http),
            (Some("http2"), None, AppProtocol::Http2),
            (Some("grpc-api"), None, AppProtocol::Grpc),
            (Some("GRPC"), None, AppProtocol::Grpc),
            (Some("web"), Some("http"), AppProtocol::Http),
            (
                Some("http-web"),
                Some("kubernetes.io/h2c"),
                AppProtocol::Http2,
            ),
            (Some("http-web"), Some("tcp"), AppProtocol::Tcp),
            (Some("http-web"), Some("custom"), AppProtocol::Http),
            (Some("httpx"), None, AppProtocol::Tcp),
            (Some("tcp-db"), None, AppProtocol::Tcp),
            (None, None, AppProtocol::Tcp),
        ];
        for (name, app, expected) in cases {
            assert_eq!(AppProtocol::of(name, app), expected, "{name:?} {app:?}");
        }
    }

    #[test]
    fn headless_and_unallocated_have_no_cluster_ip() {
        for ip in [Some("None"), Some(""), None] {
            let model = Service::from_k8s(&service(ip, vec![])).expect("must succeed");
            assert_eq!(model.cluster_ip, None);
        }
    }

    #[test]
    fn rejects_bad_cluster_ip() {
        let errors =
            Service::from_k8s(&service(Some("10.96.0.300"), vec![])).expect_err("must fail");
        assert_eq!(
            errors,
            vec![ServiceError::ClusterIpNotAnIp("10.96.0.300".into())]
        );
        assert_eq!(errors[0].field(), "spec.clusterIP");
        let errors = Service::from_k8s(&service(Some("fd00::1"), vec![])).expect_err("must fail");
        assert_eq!(errors, vec![ServiceError::ClusterIpV6("fd00::1".into())]);
    }

    #[test]
    fn rejects_ports_out_of_range_all_at_once() {
        let mut udp = port(53, None);
        udp.protocol = Some("QUIC".into());
        let svc = service(
            Some("10.96.0.10"),
            vec![
                port(0, None),
                port(70000, Some(IntOrString::Int(-1))),
                udp,
                port(80, Some(IntOrString::String(String::new()))),
            ],
        );
        let errors = Service::from_k8s(&svc).expect_err("must fail");
        let fields: Vec<String> = errors.iter().map(ServiceError::field).collect();
        assert_eq!(
            fields,
            [
                "spec.ports[0].port",
                "spec.ports[1].port",
                "spec.ports[1].targetPort",
                "spec.ports[2].protocol",
                "spec.ports[3].targetPort",
            ]
        );
        assert_eq!(errors[1].to_string(), "70000 is out of range 1-65535");
    }

    #[test]
    fn selects_by_namespace_and_labels() {
        let model = Service::from_k8s(&service(None, vec![])).expect("must succeed");
        let mut workload = Workload {
            uid: "u".into(),
            name: "web-1".into(),
            namespace: "demo".into(),
            node: "n".into(),
            service_account: "default".into(),
            ip: Ipv4Addr::new(10, 0, 0, 1),
            labels: [("app", Box::from("web"))].into_iter().collect(),
            host_network: false,
            phase: None,
            enrollment: crate::state::Enrollment::NotEnrolled { reason: "r" },
            named_ports: Default::default(),
        };
        assert!(model.selects(&workload));
        workload.namespace = "other".into();
        assert!(!model.selects(&workload));
        let no_selector = Service {
            selector: Default::default(),
            ..model
        };
        workload.namespace = "demo".into();
        assert!(!no_selector.selects(&workload));
    }
}
