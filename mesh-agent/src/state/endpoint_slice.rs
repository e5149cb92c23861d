//! The mesh's view of a Kubernetes EndpointSlice: which addresses and ports back a Service. A
//! Service that has slices is served by them (that is how selector-less Services get endpoints).

use super::small_map::SmallMap;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::discovery::v1 as k8s;
use serde::Serialize;

use super::namespace::namespace_of;

/// The label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    pub name: String,
    pub namespace: String,
    /// The Service (same namespace) from the `kubernetes.io/service-name` label.
    pub service: String,
    /// Ports by name (`""` for the unnamed port of a single-port Service).
    pub ports: SmallMap<u16>,
    /// Addresses of the ready endpoints (`conditions.ready` unset counts as ready, as in
    /// Kubernetes).
    pub ready: Vec<Ipv4Addr>,
}

/// A slice that cannot be used; `field()` says where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointSliceError {
    #[error("is required: it names the Service this slice belongs to")]
    MissingServiceName,
    #[error("{port} is out of range 1-65535")]
    PortOutOfRange { index: usize, port: i32 },
    #[error("{address:?} is not an IPv4 address (the slice's addressType is IPv4)")]
    NotAnIp {
        endpoint: usize,
        index: usize,
        address: String,
    },
}

impl EndpointSliceError {
    pub fn field(&self) -> String {
        match self {
            EndpointSliceError::MissingServiceName => {
                format!("metadata.labels[{SERVICE_NAME_LABEL}]")
            }
            EndpointSliceError::PortOutOfRange { index, .. } => format!("ports[{index}].port"),
            EndpointSliceError::NotAnIp {
                endpoint, index, ..
            } => format!("endpoints[{endpoint}].addresses[{index}]"),
        }
    }
}

impl EndpointSlice {
    /// The slice's model; `Ok(None)` for a slice of another address type (IPv6, FQDN), which a
    /// dual-stack cluster has for every Service and the agent does not use yet. Every problem
    /// is returned, not only the first.
    pub fn from_k8s(slice: &k8s::EndpointSlice) -> Result<Option<Self>, Vec<EndpointSliceError>> {
        if slice.address_type != "IPv4" {
            return Ok(None);
        }
        let mut errors = Vec::new();
        let metadata = &slice.metadata;
        let service = metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .filter(|name| !name.is_empty());
        if service.is_none() {
            errors.push(EndpointSliceError::MissingServiceName);
        }
        let mut ports = BTreeMap::new();
        for (index, port) in slice.ports.iter().flatten().enumerate() {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            // No port means "all ports" in Kubernetes; with nothing to connect to, skip it.
            let Some(number) = port.port else { continue };
            match u16::try_from(number) {
                Ok(n) if n != 0 => {
                    ports.insert(port.name.clone().unwrap_or_default(), n);
                }
                _ => errors.push(EndpointSliceError::PortOutOfRange {
                    index,
                    port: number,
                }),
            }
        }
        let mut ready = Vec::new();
        for (endpoint_index, endpoint) in slice.endpoints.iter().enumerate() {
            let is_ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            for (index, address) in endpoint.addresses.iter().enumerate() {
                match address.parse::<Ipv4Addr>() {
                    Ok(ip) if is_ready => ready.push(ip),
                    Ok(_) => {}
                    Err(_) => errors.push(EndpointSliceError::NotAnIp {
                        endpoint: endpoint_index,
                        index,
                        address: address.clone(),
                    }),
                }
            }
        }
        let Some(service) = service else {
            return Err(errors);
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        ready.sort();
        ready.dedup();
        Ok(Some(EndpointSlice {
            name: metadata.name.clone().unwrap_or_default(),
            namespace: namespace_of(metadata).to_string(),
            service: service.clone(),
            ports: ports.into_iter().collect(),
            ready,
        }))
    }

    /// The port this slice's endpoints serve for the Service port named `name` (`None` for an
    /// unnamed Service port).
    pub fn port_for(&self, name: Option<&str>) -> Option<u16> {
        self.ports.get(name.unwrap_or_default()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(yaml: &str) -> k8s::EndpointSlice {
        serde_yaml::from_str(yaml).expect("a valid EndpointSlice document")
    }

    #[test]
    fn reads_ready_ipv4_endpoints_and_tcp_ports() {
        let model = EndpointSlice::from_k8s(&slice(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, namespace: demo, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 53, protocol: UDP}]
endpoints:
- addresses: [10.1.0.2]
- addresses: [10.1.0.1]
  conditions: {ready: true}
- addresses: [10.1.0.3]
  conditions: {ready: false}
",
        ))
        .expect("valid")
        .expect("IPv4");
        assert_eq!(model.service, "ext");
        assert_eq!(model.namespace, "demo");
        assert_eq!(model.port_for(Some("http")), Some(8080));
        assert_eq!(model.port_for(Some("dns")), None);
        assert_eq!(model.port_for(None), None);
        assert_eq!(
            model.ready,
            [Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 2)]
        );
    }

    #[test]
    fn other_address_types_are_skipped() {
        let model = EndpointSlice::from_k8s(&slice(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-v6, namespace: demo, labels: {kubernetes.io/service-name: ext}}
addressType: IPv6
endpoints: [{addresses: [\"fd00::1\"]}]
",
        ));
        assert_eq!(model, Ok(None));
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let errors = EndpointSlice::from_k8s(&slice(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad, namespace: demo}
addressType: IPv4
ports: [{port: 70000}]
endpoints: [{addresses: [10.1.0.1, not-an-ip]}]
",
        ))
        .expect_err("invalid");
        let fields: Vec<String> = errors.iter().map(EndpointSliceError::field).collect();
        assert_eq!(
            fields,
            [
                "metadata.labels[kubernetes.io/service-name]",
                "ports[0].port",
                "endpoints[0].addresses[1]"
            ]
        );
    }
}
