//! Keeps only the fields the mesh reads of each watched object, before it enters a reflector's
//! store: a node's agent holds every pod of the cluster, and a Pod as the API server sends it
//! (managed fields, env, volumes, conditions, container statuses) is mostly what we never read.

use k8s_openapi::api::{
    core::v1::{Container, Namespace, Pod, PodSpec, PodStatus, Service},
    discovery::v1::EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;

use crate::state::DRY_RUN_ANNOTATION;

/// Metadata the model uses: name, namespace, uid, labels, creation time (PeerAuthentication's
/// tie-break), resourceVersion (the reflector's), and only the annotations asked for.
fn metadata(meta: &mut ObjectMeta, keep_annotations: &[&str]) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| keep_annotations.contains(&key.as_str()));
    }
}

pub fn namespace(ns: &mut Namespace) {
    metadata(&mut ns.metadata, &[]);
    ns.spec = None;
    ns.status = None;
}

/// A pod keeps its node, service account, host networking, containers' ports, phase and IPs.
pub fn pod(pod: &mut Pod) {
    metadata(&mut pod.metadata, &[]);
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            host_network: spec.host_network,
            containers: spec
                .containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports,
                    ..Container::default()
                })
                .collect(),
            ..PodSpec::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            host_ip: status.host_ip,
            ..PodStatus::default()
        });
    }
}

pub fn service(service: &mut Service) {
    metadata(&mut service.metadata, &[]);
    service.status = None;
}

pub fn endpoint_slice(slice: &mut EndpointSlice) {
    metadata(&mut slice.metadata, &[]);
}

/// Istio policies keep their spec whole (it is small) and the dry-run annotation.
pub fn istio(object: &mut DynamicObject) {
    metadata(&mut object.metadata, &[DRY_RUN_ANNOTATION]);
    if let Some(map) = object.data.as_object_mut() {
        map.remove("status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_keeps_what_the_mesh_reads() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-1", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{…}"},
                "managedFields": [{"manager": "kubectl"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "r"}]
            },
            "spec": {
                "nodeName": "n1", "serviceAccountName": "web",
                "containers": [{"name": "app", "image": "nginx", "env": [{"name": "A", "value": "b"}],
                                "ports": [{"name": "http", "containerPort": 8080}]}],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {"phase": "Running", "podIP": "10.0.0.1", "hostIP": "192.168.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("a pod");
        super::pod(&mut pod);
        let json = serde_json::to_value(&pod).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                             "labels": {"app": "web"}, "annotations": {}},
                "spec": {"nodeName": "n1", "serviceAccountName": "web",
                         "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": "10.0.0.1", "hostIP": "192.168.0.1"}
            })
        );
    }

    #[test]
    fn an_istio_policy_keeps_its_spec_and_dry_run() {
        let mut object: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop",
                         "annotations": {"istio.io/dry-run": "true", "other": "x"}},
            "spec": {"action": "DENY"},
            "status": {"conditions": []}
        }))
        .expect("an object");
        istio(&mut object);
        let annotations = object.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["istio.io/dry-run"]);
        assert_eq!(object.data["spec"]["action"], "DENY");
        assert!(object.data.get("status").is_none());
    }
}
