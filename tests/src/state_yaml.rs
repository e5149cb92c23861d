//! The cluster state the agent reads: ordinary Kubernetes `Namespace` and `Pod` YAML, one file
//! per object, each written atomically (temp file + rename) so the agent never sees half a file.

use std::{collections::BTreeMap, fmt::Write as _, fs, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};

pub type Labels = BTreeMap<String, String>;

/// What the state says about one pod.
#[derive(Clone, Debug)]
pub struct PodObject {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: Labels,
    /// The Kubernetes node name, which is the node's netns name.
    pub node_name: String,
    pub service_account: String,
    pub pod_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
}

/// `namespace-<name>.yaml`.
pub fn namespace_file(name: &str) -> String {
    format!("namespace-{name}.yaml")
}

/// `pod-<namespace>-<name>.yaml`.
pub fn pod_file(namespace: &str, name: &str) -> String {
    format!("pod-{namespace}-{name}.yaml")
}

/// A `v1/Namespace`; like the API server, adds `kubernetes.io/metadata.name`.
pub fn namespace_yaml(name: &str, labels: &Labels) -> String {
    let mut labels = labels.clone();
    labels
        .entry("kubernetes.io/metadata.name".into())
        .or_insert_with(|| name.into());
    let mut y = String::new();
    y.push_str("apiVersion: v1\nkind: Namespace\nmetadata:\n");
    let _ = writeln!(y, "  name: {}", q(name));
    push_labels(&mut y, &labels);
    y.push_str("status:\n  phase: Active\n");
    y
}

/// A running `v1/Pod` with one container.
pub fn pod_yaml(pod: &PodObject) -> String {
    let mut y = String::new();
    y.push_str("apiVersion: v1\nkind: Pod\nmetadata:\n");
    let _ = writeln!(y, "  name: {}", q(&pod.name));
    let _ = writeln!(y, "  namespace: {}", q(&pod.namespace));
    let _ = writeln!(y, "  uid: {}", q(&pod.uid));
    push_labels(&mut y, &pod.labels);
    y.push_str("spec:\n");
    let _ = writeln!(y, "  nodeName: {}", q(&pod.node_name));
    let _ = writeln!(y, "  serviceAccountName: {}", q(&pod.service_account));
    y.push_str("  containers:\n  - name: app\n    image: registry.invalid/app:latest\n");
    y.push_str("status:\n  phase: Running\n");
    let _ = writeln!(y, "  hostIP: {}", q(&pod.host_ip.to_string()));
    let _ = writeln!(y, "  podIP: {}", q(&pod.pod_ip.to_string()));
    let _ = writeln!(y, "  podIPs:\n  - ip: {}", q(&pod.pod_ip.to_string()));
    y
}

/// Writes `dir/file` through a hidden temp file in the same directory and a rename.
pub fn write_atomic(dir: &Path, file: &str, contents: &str) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    let dest = dir.join(file);
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

fn push_labels(y: &mut String, labels: &Labels) {
    if labels.is_empty() {
        y.push_str("  labels: {}\n");
        return;
    }
    y.push_str("  labels:\n");
    for (k, v) in labels {
        let _ = writeln!(y, "    {}: {}", q(k), q(v));
    }
}

/// A YAML double-quoted scalar: JSON string escapes are valid YAML escapes.
fn q(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_yaml_reads_as_a_kubernetes_pod() {
        let pod = PodObject {
            namespace: "shop".into(),
            name: "web-1".into(),
            uid: "0000-1".into(),
            labels: [("app".to_owned(), "web: \"x\"".to_owned())].into(),
            node_name: "mtabcdef-n1".into(),
            service_account: "web".into(),
            pod_ip: Ipv4Addr::new(10, 7, 1, 10),
            host_ip: Ipv4Addr::new(192, 168, 7, 1),
        };
        let pod: k8s_openapi::api::core::v1::Pod = serde_yaml::from_str(&pod_yaml(&pod)).unwrap();
        assert_eq!(pod.metadata.labels.unwrap()["app"], "web: \"x\"");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("mtabcdef-n1"));
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        let status = pod.status.unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some("10.7.1.10"));
        assert_eq!(status.phase.as_deref(), Some("Running"));
    }

    #[test]
    fn namespace_yaml_reads_as_a_kubernetes_namespace() {
        let labels = [("mesh-agent.dev/mode".to_owned(), "ambient".to_owned())].into();
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_yaml::from_str(&namespace_yaml("shop", &labels)).unwrap();
        let labels = ns.metadata.labels.unwrap();
        assert_eq!(labels["mesh-agent.dev/mode"], "ambient");
        assert_eq!(labels["kubernetes.io/metadata.name"], "shop");
        let empty: k8s_openapi::api::core::v1::Namespace =
            serde_yaml::from_str(&namespace_yaml("legacy", &Labels::new())).unwrap();
        assert_eq!(empty.metadata.name.as_deref(), Some("legacy"));
    }
}
