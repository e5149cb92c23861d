//! The watched core kinds as the API server sends them, deserialized into only the fields the
//! mesh reads. A Pod on the wire is mostly what we never read (managed fields, env, volumes,
//! conditions, container statuses); parsing it whole for each of a cluster's pods costs time at
//! every list and leaves the allocator fragmented around the records that stay. Unknown fields
//! are skipped by the parser without being built.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    self as core, Container, ContainerPort, PodSpec, PodStatus, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{self as discovery, Endpoint, EndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::{Deserialize, Deserializer};

/// The metadata the model and the watcher read: names, uid, labels, creation time, and the
/// resourceVersion a watch resumes from.
fn metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        creation_timestamp: Option<Time>,
    }
    let wire = Option::<Wire>::deserialize(deserializer)?;
    Ok(wire.map_or_else(ObjectMeta::default, |wire| ObjectMeta {
        name: wire.name,
        namespace: wire.namespace,
        uid: wire.uid,
        resource_version: wire.resource_version,
        labels: wire.labels,
        creation_timestamp: wire.creation_timestamp,
        ..ObjectMeta::default()
    }))
}

/// Implements the Kubernetes resource traits for a wire type with those of the full type, so
/// that kube-rs lists and watches it at the full type's URL.
macro_rules! resource {
    ($wire:ty, $full:ty) => {
        impl k8s_openapi::Resource for $wire {
            const API_VERSION: &'static str = <$full as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$full as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$full as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$full as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$full as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::Metadata for $wire {
            type Ty = ObjectMeta;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
}
resource!(Namespace, core::Namespace);

impl From<Namespace> for core::Namespace {
    fn from(wire: Namespace) -> Self {
        core::Namespace {
            metadata: wire.metadata,
            ..core::Namespace::default()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Pod {
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    pub spec: Option<PodWireSpec>,
    pub status: Option<PodWireStatus>,
}
resource!(Pod, core::Pod);

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodWireSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    host_network: Option<bool>,
    #[serde(default)]
    containers: Vec<PodWireContainer>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PodWireContainer {
    #[serde(default)]
    name: String,
    ports: Option<Vec<ContainerPort>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodWireStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
}

impl From<Pod> for core::Pod {
    fn from(wire: Pod) -> Self {
        core::Pod {
            metadata: wire.metadata,
            spec: wire.spec.map(|spec| PodSpec {
                node_name: spec.node_name,
                service_account_name: spec.service_account_name,
                host_network: spec.host_network,
                containers: spec
                    .containers
                    .into_iter()
                    .map(|container| Container {
                        name: container.name,
                        ports: container.ports,
                        ..Container::default()
                    })
                    .collect(),
                ..PodSpec::default()
            }),
            status: wire.status.map(|status| PodStatus {
                phase: status.phase,
                pod_ip: status.pod_ip,
                ..PodStatus::default()
            }),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceWireSpec>,
}
resource!(Service, core::Service);

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceWireSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    ports: Option<Vec<ServicePort>>,
    selector: Option<BTreeMap<String, String>>,
}

impl From<Service> for core::Service {
    fn from(wire: Service) -> Self {
        core::Service {
            metadata: wire.metadata,
            spec: wire.spec.map(|spec| ServiceSpec {
                cluster_ip: spec.cluster_ip,
                ports: spec.ports,
                selector: spec.selector,
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    address_type: String,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
    ports: Option<Vec<EndpointPort>>,
}
resource!(EndpointSlice, discovery::EndpointSlice);

impl From<EndpointSlice> for discovery::EndpointSlice {
    fn from(wire: EndpointSlice) -> Self {
        discovery::EndpointSlice {
            metadata: wire.metadata,
            address_type: wire.address_type,
            endpoints: wire.endpoints,
            ports: wire.ports,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_keeps_what_the_mesh_reads_and_nothing_else() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                         "labels": {"app": "web"}, "annotations": {"a": "b"},
                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "hostNetwork": false,
                     "containers": [{"name": "app", "image": "web:1", "env": [{"name": "X", "value": "y"}],
                                     "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.0.1.5", "podIPs": [{"ip": "10.0.1.5"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("a pod");
        let pod = core::Pod::from(pod);
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("42"));
        assert!(pod.metadata.annotations.is_none() && pod.metadata.managed_fields.is_none());
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(
            spec.containers[0].ports.as_ref().expect("ports")[0].container_port,
            8080
        );
        assert!(spec.containers[0].env.is_none() && spec.volumes.is_none());
        let status = pod.status.as_ref().expect("status");
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.1.5"));
        assert!(status.conditions.is_none());
        let workload = crate::state::record::pod(crate::state::Origin::new("k", "d"), &pod);
        let workload = workload.model.expect("a workload");
        assert_eq!(workload.named_ports.get("http"), Some(&8080));
        assert_eq!(workload.service_account, "web");
    }

    #[test]
    fn a_service_and_a_slice_keep_their_ports_and_addresses() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "type": "ClusterIP",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
            "status": {"loadBalancer": {}}
        }))
        .expect("a service");
        let service =
            crate::state::Service::from_k8s(&core::Service::from(service)).expect("valid");
        assert_eq!(service.cluster_ip, Some([10, 96, 0, 10].into()));
        assert_eq!(service.selector.value("app"), Some("web"));
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.1.5"], "conditions": {"ready": true}, "nodeName": "n1"}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
        .expect("a slice");
        let slice = crate::state::EndpointSlice::from_k8s(&discovery::EndpointSlice::from(slice))
            .expect("valid")
            .expect("IPv4");
        assert_eq!(slice.ready, [std::net::Ipv4Addr::new(10, 0, 1, 5)]);
        assert_eq!(slice.ports.get("http"), Some(&8080));
    }
}
