//! Checks across objects that Kubernetes itself guarantees: every object is named, names are unique,
//! namespaces exist and running pods do not share an IP.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::Metadata;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::error::{Origin, StateError};
use super::namespace::namespace_of;
use super::object::{Sourced, object_label};
use super::record::Record;
use super::workload::Workload;

/// A state that Kubernetes could not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("is required for a {kind}")]
    MissingName { kind: &'static str },
    #[error("defined more than once: first in {first}")]
    Duplicate { first: Origin },
    #[error("namespace {0:?} has no Namespace object")]
    MissingNamespace(String),
    #[error("{ip} is also the IP of {other} in {origin}")]
    IpConflict {
        ip: Ipv4Addr,
        other: String,
        origin: Origin,
    },
}

impl ValidationError {
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ValidationError::MissingName { .. } => Some("metadata.name"),
            ValidationError::Duplicate { .. } => None,
            ValidationError::MissingNamespace(_) => Some("metadata.namespace"),
            ValidationError::IpConflict { .. } => Some("status.podIP"),
        }
    }
}

/// An object that has a name, with the label used in messages (`Pod demo/client`).
#[derive(Debug)]
pub struct Named<'a, T> {
    pub label: String,
    pub origin: &'a Origin,
    pub object: &'a T,
}

impl<T> Named<'_, T> {
    pub fn error(&self, field: Option<&str>, reason: impl std::fmt::Display) -> StateError {
        StateError::new(
            self.origin.file.clone(),
            self.label.clone(),
            field.map(str::to_string),
            reason,
        )
    }
}

/// Keeps the objects that have a name; reports unnamed ones and later copies of a name.
pub fn named<'a, T>(
    objects: &'a [Sourced<T>],
    namespaced: bool,
    errors: &mut Vec<StateError>,
) -> Vec<Named<'a, T>>
where
    T: Metadata<Ty = ObjectMeta>,
{
    let mut seen: BTreeMap<(Option<&str>, &str), &Origin> = BTreeMap::new();
    let mut kept = Vec::new();
    for Sourced { origin, object } in objects {
        let metadata = object.metadata();
        let namespace = namespaced.then(|| namespace_of(metadata));
        let name = metadata.name.as_deref().filter(|name| !name.is_empty());
        let label = object_label(T::KIND, namespace, name, origin);
        let Some(name) = name else {
            let error = ValidationError::MissingName { kind: T::KIND };
            errors.push(StateError::new(
                origin.file.clone(),
                label,
                error.field().map(Into::into),
                error,
            ));
            continue;
        };
        let named = Named {
            label,
            origin,
            object,
        };
        match seen.entry((namespace, name)) {
            Entry::Occupied(first) => {
                let error = ValidationError::Duplicate {
                    first: (*first.get()).clone(),
                };
                errors.push(named.error(error.field(), error));
            }
            Entry::Vacant(slot) => {
                slot.insert(origin);
                kept.push(named);
            }
        }
    }
    kept
}

/// Keeps the first running pod to claim an IP and reports (and drops) each later one.
/// hostNetwork and terminal pods are left out: they legitimately share or free their IP.
pub fn unique_ips<'r>(
    workloads: Vec<(Arc<Workload>, &'r Record<Workload>)>,
    errors: &mut Vec<StateError>,
) -> Vec<(Arc<Workload>, &'r Record<Workload>)> {
    let mut owners: BTreeMap<Ipv4Addr, &Record<Workload>> = BTreeMap::new();
    workloads
        .into_iter()
        .filter(|(workload, pod)| {
            if !workload.owns_ip() {
                return true;
            }
            match owners.entry(workload.ip) {
                Entry::Occupied(first) => {
                    let error = ValidationError::IpConflict {
                        ip: workload.ip,
                        other: first.get().label.clone(),
                        origin: first.get().origin.clone(),
                    };
                    errors.push(pod.error(error.field(), error));
                    false
                }
                Entry::Vacant(slot) => {
                    slot.insert(pod);
                    true
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1 as k8s;

    fn pod(name: Option<&str>, namespace: Option<&str>, file: &str) -> Sourced<k8s::Pod> {
        Sourced {
            origin: Origin::new(file, "document 1"),
            object: k8s::Pod {
                metadata: ObjectMeta {
                    name: name.map(Into::into),
                    namespace: namespace.map(Into::into),
                    ..ObjectMeta::default()
                },
                ..k8s::Pod::default()
            },
        }
    }

    #[test]
    fn reports_unnamed_and_duplicates_across_files() {
        let pods = [
            pod(Some("a"), Some("demo"), "one.yaml"),
            pod(None, Some("demo"), "one.yaml"),
            pod(Some("a"), Some("demo"), "two.yaml"),
            pod(Some("a"), Some("other"), "two.yaml"),
        ];
        let mut errors = Vec::new();
        let kept = named(&pods, true, &mut errors);
        assert_eq!(kept.len(), 2);
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            [
                "one.yaml: document 1: metadata.name: is required for a Pod",
                "two.yaml: Pod demo/a: defined more than once: first in one.yaml (document 1)",
            ]
        );
    }
}
