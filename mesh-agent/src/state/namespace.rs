//! The mesh's view of a Kubernetes Namespace: its name and the labels that drive enrollment.

use super::small_map::Labels;
use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

/// Where namespaced objects without `metadata.namespace` go, as with `kubectl apply`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The namespace of a namespaced object, `default` when unset.
pub fn namespace_of(metadata: &ObjectMeta) -> &str {
    metadata
        .namespace
        .as_deref()
        .filter(|namespace| !namespace.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Namespace {
    /// Builds the model; the caller has checked that `metadata.name` is set.
    pub fn from_k8s(namespace: &k8s::Namespace) -> Self {
        Namespace {
            name: namespace.metadata.name.clone().unwrap_or_default(),
            labels: namespace.metadata.labels.clone().unwrap_or_default().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_name_and_labels() {
        let namespace = k8s::Namespace {
            metadata: ObjectMeta {
                name: Some("demo".into()),
                labels: Some([("a".to_string(), "b".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..k8s::Namespace::default()
        };
        let model = Namespace::from_k8s(&namespace);
        assert_eq!(model.name, "demo");
        assert_eq!(model.labels.value("a"), Some("b"));
    }

    #[test]
    fn namespace_defaults_to_default() {
        assert_eq!(namespace_of(&ObjectMeta::default()), "default");
        let empty = ObjectMeta {
            namespace: Some(String::new()),
            ..ObjectMeta::default()
        };
        assert_eq!(namespace_of(&empty), "default");
        let demo = ObjectMeta {
            namespace: Some("demo".into()),
            ..ObjectMeta::default()
        };
        assert_eq!(namespace_of(&demo), "demo");
    }
}
