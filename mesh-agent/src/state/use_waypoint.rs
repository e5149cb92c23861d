//! Which waypoint a Service or a pod uses: `istio.io/use-waypoint` (with
//! `istio.io/use-waypoint-namespace`) on the object, else on its namespace, as Istio resolves it.

use serde::Serialize;

use super::small_map::Labels;
use super::waypoint::{MANAGED_BY_MESH, MANAGED_LABEL, Waypoint};

pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// The value that opts an object out of its namespace's waypoint.
const NONE: &str = "none";

/// What asks for a waypoint: a Service takes waypoints `for` services, a pod those for workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Consumer {
    Service,
    #[serde(rename = "Pod")]
    Workload,
}

/// A Service or pod that names a waypoint, and whether it can use it. One that cannot is not
/// sent around its waypoint: its connections are refused, since the waypoint's policies cannot
/// be enforced without it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaypointUse {
    pub kind: Consumer,
    pub namespace: String,
    pub name: String,
    pub waypoint: WaypointRef,
    /// Why the waypoint cannot be used; `None` when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl WaypointUse {
    pub fn is_usable(&self) -> bool {
        self.problem.is_none()
    }

    /// The entry for a resolution, `None` when the object uses no waypoint.
    pub fn of(
        kind: Consumer,
        namespace: &str,
        name: &str,
        resolved: &Result<Option<&Waypoint>, UseWaypointError>,
    ) -> Option<WaypointUse> {
        let (waypoint, problem) = match resolved {
            Ok(None) => return None,
            Ok(Some(waypoint)) => (
                WaypointRef {
                    namespace: waypoint.namespace.clone(),
                    name: waypoint.name.clone(),
                },
                None,
            ),
            Err(error) => (error.waypoint().clone(), Some(error.to_string())),
        };
        Some(WaypointUse {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            waypoint,
            problem,
        })
    }
}

/// The waypoint a Service or pod uses, as `mesh-agent` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WaypointRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for WaypointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a waypoint asked for is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UseWaypointError {
    #[error("{inherited}names waypoint {waypoint}, which is not a valid istio-waypoint Gateway")]
    NoSuchWaypoint {
        waypoint: WaypointRef,
        inherited: Inherited,
    },
    #[error(
        "{inherited}names waypoint {waypoint}, which does not take {wanted} traffic (istio.io/waypoint-for: {takes})"
    )]
    WrongTraffic {
        waypoint: WaypointRef,
        wanted: &'static str,
        takes: &'static str,
        inherited: Inherited,
    },
    #[error(
        "{inherited}names waypoint {waypoint}, whose HBONE listener does not allow namespace {namespace}"
    )]
    NotAllowed {
        waypoint: WaypointRef,
        namespace: String,
        inherited: Inherited,
    },
}

impl UseWaypointError {
    pub fn field(&self) -> String {
        format!("metadata.labels[{USE_WAYPOINT_LABEL}]")
    }

    pub fn waypoint(&self) -> &WaypointRef {
        match self {
            UseWaypointError::NoSuchWaypoint { waypoint, .. }
            | UseWaypointError::WrongTraffic { waypoint, .. }
            | UseWaypointError::NotAllowed { waypoint, .. } => waypoint,
        }
    }
}

/// Whether the label came from the object's namespace; shown at the start of a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inherited(bool);

impl std::fmt::Display for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 {
            f.write_str("its namespace's label ")
        } else {
            Ok(())
        }
    }
}

/// The waypoint an object of `namespace` with `labels` uses, among `waypoints`: `Ok(None)` when
/// it uses none (no label, `none`, a waypoint's own object, or a namespace-wide waypoint that
/// does not take this kind of traffic), an error when the label names one it cannot use.
pub fn resolve<'a>(
    consumer: Consumer,
    namespace: &str,
    labels: &Labels,
    namespace_labels: &Labels,
    waypoints: &'a [std::sync::Arc<Waypoint>],
) -> Result<Option<&'a Waypoint>, UseWaypointError> {
    // A waypoint's own pods and Service never go through a waypoint.
    if labels.value(MANAGED_LABEL) == Some(MANAGED_BY_MESH)
        || waypoints.iter().any(|w| w.runs_as(namespace, labels))
    {
        return Ok(None);
    }
    let (source, inherited) = match labels.value(USE_WAYPOINT_LABEL) {
        Some(_) => (labels, false),
        None if namespace_labels.value(USE_WAYPOINT_LABEL).is_some() => (namespace_labels, true),
        None => return Ok(None),
    };
    let name = source.value(USE_WAYPOINT_LABEL).unwrap_or_default();
    if name == NONE {
        return Ok(None);
    }
    let waypoint = WaypointRef {
        namespace: source
            .value(USE_WAYPOINT_NAMESPACE_LABEL)
            .filter(|ns| !ns.is_empty())
            .unwrap_or(namespace)
            .to_string(),
        name: name.to_string(),
    };
    let inherited = Inherited(inherited);
    let found = waypoints
        .iter()
        .find(|w| w.namespace == waypoint.namespace && w.name == waypoint.name);
    let Some(found) = found else {
        return Err(UseWaypointError::NoSuchWaypoint {
            waypoint,
            inherited,
        });
    };
    let (wanted, takes_this) = match consumer {
        Consumer::Service => ("service", found.traffic.takes_services()),
        Consumer::Workload => ("workload", found.traffic.takes_workloads()),
    };
    if !takes_this {
        // Istio skips a namespace's waypoint that does not fit, and flags an explicit one.
        if inherited.0 {
            return Ok(None);
        }
        return Err(UseWaypointError::WrongTraffic {
            waypoint,
            wanted,
            takes: found.traffic.as_str(),
            inherited,
        });
    }
    if !found
        .allowed
        .allows(&found.namespace, namespace, namespace_labels)
    {
        return Err(UseWaypointError::NotAllowed {
            waypoint,
            namespace: namespace.to_string(),
            inherited,
        });
    }
    Ok(Some(found))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::waypoint::{AllowedNamespaces, GATEWAY_NAME_LABEL, WaypointFor};

    fn waypoint(namespace: &str, name: &str, traffic: WaypointFor) -> Arc<Waypoint> {
        Arc::new(Waypoint {
            name: name.into(),
            namespace: namespace.into(),
            traffic,
            allowed: AllowedNamespaces::Same,
        })
    }

    fn labels<const N: usize>(entries: [(&str, &str); N]) -> Labels {
        entries.map(|(k, v)| (k, Box::<str>::from(v))).into()
    }

    #[test]
    fn the_objects_label_beats_its_namespaces() {
        let waypoints = [
            waypoint("shop", "ns-wide", WaypointFor::Service),
            waypoint("shop", "own", WaypointFor::Service),
        ];
        let namespace = labels([(USE_WAYPOINT_LABEL, "ns-wide")]);
        let found = |object: &Labels| {
            resolve(Consumer::Service, "shop", object, &namespace, &waypoints)
                .expect("usable")
                .map(|w| w.name.clone())
        };
        assert_eq!(found(&Labels::default()).as_deref(), Some("ns-wide"));
        assert_eq!(
            found(&labels([(USE_WAYPOINT_LABEL, "own")])).as_deref(),
            Some("own")
        );
        assert_eq!(found(&labels([(USE_WAYPOINT_LABEL, "none")])), None);
        let plain = resolve(
            Consumer::Service,
            "shop",
            &Labels::default(),
            &Labels::default(),
            &waypoints,
        );
        assert_eq!(plain, Ok(None));
    }

    #[test]
    fn another_namespaces_waypoint_needs_its_permission() {
        let mut shared = Waypoint::clone(&waypoint("infra", "shared", WaypointFor::All));
        let waypoints = [Arc::new(shared.clone())];
        let object = labels([
            (USE_WAYPOINT_LABEL, "shared"),
            (USE_WAYPOINT_NAMESPACE_LABEL, "infra"),
        ]);
        let refused = resolve(
            Consumer::Service,
            "shop",
            &object,
            &Labels::default(),
            &waypoints,
        );
        let error = refused.expect_err("Same namespace only");
        assert_eq!(
            error.to_string(),
            "names waypoint infra/shared, whose HBONE listener does not allow namespace shop"
        );
        assert_eq!(error.field(), "metadata.labels[istio.io/use-waypoint]");
        shared.allowed = AllowedNamespaces::All;
        let waypoints = [Arc::new(shared)];
        let used = resolve(
            Consumer::Service,
            "shop",
            &object,
            &Labels::default(),
            &waypoints,
        );
        assert_eq!(
            used.expect("allowed").map(|w| w.name.as_str()),
            Some("shared")
        );
    }

    #[test]
    fn traffic_kind_mismatch_is_skipped_from_the_namespace_and_flagged_on_the_object() {
        let waypoints = [waypoint("shop", "w", WaypointFor::Service)];
        let namespace = labels([(USE_WAYPOINT_LABEL, "w")]);
        let pod = resolve(
            Consumer::Workload,
            "shop",
            &Labels::default(),
            &namespace,
            &waypoints,
        );
        assert_eq!(pod, Ok(None));
        let explicit = resolve(
            Consumer::Workload,
            "shop",
            &labels([(USE_WAYPOINT_LABEL, "w")]),
            &Labels::default(),
            &waypoints,
        );
        assert_eq!(
            explicit.expect_err("service-only").to_string(),
            "names waypoint shop/w, which does not take workload traffic (istio.io/waypoint-for: service)"
        );
        let service = resolve(
            Consumer::Service,
            "shop",
            &Labels::default(),
            &namespace,
            &waypoints,
        );
        assert!(matches!(service, Ok(Some(_))));
    }

    #[test]
    fn a_missing_waypoint_is_a_problem() {
        let error = resolve(
            Consumer::Service,
            "shop",
            &Labels::default(),
            &labels([(USE_WAYPOINT_LABEL, "gone")]),
            &[],
        )
        .expect_err("no such waypoint");
        assert_eq!(
            error.to_string(),
            "its namespace's label names waypoint shop/gone, which is not a valid istio-waypoint Gateway"
        );
    }

    #[test]
    fn waypoints_own_objects_use_no_waypoint() {
        let waypoints = [waypoint("shop", "w", WaypointFor::All)];
        let namespace = labels([(USE_WAYPOINT_LABEL, "w")]);
        let own_pod = labels([(GATEWAY_NAME_LABEL, "w")]);
        assert_eq!(
            resolve(Consumer::Workload, "shop", &own_pod, &namespace, &waypoints),
            Ok(None)
        );
        let managed = labels([(MANAGED_LABEL, MANAGED_BY_MESH)]);
        assert_eq!(
            resolve(Consumer::Service, "shop", &managed, &namespace, &waypoints),
            Ok(None)
        );
    }
}
