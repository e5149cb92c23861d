//! A waypoint as Istio ambient describes one: a Gateway of class `istio-waypoint` with an HBONE
//! listener on 15008, whose pods carry `gateway.networking.k8s.io/gateway-name`.

use serde::Serialize;

use super::gateway_api::{GatewayResource, LabelSelectorSpec, ListenerSpec};
use super::namespace::namespace_of;
use super::small_map::Labels;

/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// The port and protocol of the listener that makes a Gateway a waypoint.
pub const HBONE_PORT: i64 = 15008;
pub const HBONE_PROTOCOL: &str = "HBONE";
/// Which traffic a waypoint takes, on the Gateway (or its class): `service`, `workload`, `all`,
/// `none`.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// Set by the Gateway controller on a Gateway's pods (and by `mesh-agent waypoint` manifests).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Istio's mark on the pods and Services it manages for a waypoint: never captured, never
/// given a waypoint themselves.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
pub const MANAGED_BY_MESH: &str = "istio.io-mesh-controller";

/// A waypoint, read from its Gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    /// What the waypoint takes: `istio.io/waypoint-for`, `service` when unset.
    pub traffic: WaypointFor,
    /// The namespaces whose Services and pods may use it: the HBONE listener's
    /// `allowedRoutes.namespaces`.
    pub allowed: AllowedNamespaces,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaypointFor {
    #[default]
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "service" => WaypointFor::Service,
            "workload" => WaypointFor::Workload,
            "all" => WaypointFor::All,
            "none" => WaypointFor::None,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WaypointFor::Service => "service",
            WaypointFor::Workload => "workload",
            WaypointFor::All => "all",
            WaypointFor::None => "none",
        }
    }

    pub fn takes_services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    pub fn takes_workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "from", content = "selector")]
pub enum AllowedNamespaces {
    /// Only the waypoint's own namespace (the Gateway API default).
    #[default]
    Same,
    All,
    /// Namespaces whose labels include all of these.
    Selector(Labels),
}

impl AllowedNamespaces {
    /// Whether objects of `namespace` (with these labels) may use a waypoint of `own`.
    pub fn allows(&self, own: &str, namespace: &str, labels: &Labels) -> bool {
        match self {
            AllowedNamespaces::Same => own == namespace,
            AllowedNamespaces::All => true,
            AllowedNamespaces::Selector(selector) => selector
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value)),
        }
    }
}

/// A waypoint Gateway that cannot be used; `field()` says where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaypointError {
    #[error("has no listener with protocol HBONE on port 15008")]
    NoHboneListener,
    #[error("{0:?} is not one of service, workload, all, none")]
    UnknownWaypointFor(String),
    #[error("{from:?} is not one of Same, All, Selector")]
    UnknownFrom { listener: usize, from: String },
    #[error("is required when from is Selector")]
    MissingSelector { listener: usize },
    #[error("is not supported (use matchLabels)")]
    MatchExpressions { listener: usize },
}

impl WaypointError {
    pub fn field(&self) -> String {
        match self {
            WaypointError::NoHboneListener => "spec.listeners".into(),
            WaypointError::UnknownWaypointFor(_) => {
                format!("metadata.labels[{WAYPOINT_FOR_LABEL}]")
            }
            WaypointError::UnknownFrom { listener, .. } => {
                format!("spec.listeners[{listener}].allowedRoutes.namespaces.from")
            }
            WaypointError::MissingSelector { listener } => {
                format!("spec.listeners[{listener}].allowedRoutes.namespaces.selector")
            }
            WaypointError::MatchExpressions { listener } => format!(
                "spec.listeners[{listener}].allowedRoutes.namespaces.selector.matchExpressions"
            ),
        }
    }
}

impl Waypoint {
    /// The waypoint a Gateway describes; `Ok(None)` for a Gateway of another class (an ingress
    /// gateway, say), which the mesh leaves alone.
    pub fn from_gateway(gateway: &GatewayResource) -> Result<Option<Waypoint>, Vec<WaypointError>> {
        if gateway.spec.gateway_class_name != WAYPOINT_CLASS {
            return Ok(None);
        }
        let mut errors = Vec::new();
        let labels = gateway.metadata.labels.as_ref();
        let traffic = match labels.and_then(|labels| labels.get(WAYPOINT_FOR_LABEL)) {
            None => WaypointFor::default(),
            Some(value) => WaypointFor::parse(value).unwrap_or_else(|| {
                errors.push(WaypointError::UnknownWaypointFor(value.clone()));
                WaypointFor::None
            }),
        };
        // istiod finds the listener by protocol and port, not by name.
        let listener = gateway
            .spec
            .listeners
            .iter()
            .enumerate()
            .find(|(_, l)| l.protocol == HBONE_PROTOCOL && l.port == HBONE_PORT);
        let allowed = match listener {
            None => {
                errors.push(WaypointError::NoHboneListener);
                AllowedNamespaces::Same
            }
            Some((index, listener)) => allowed_namespaces(index, listener).unwrap_or_else(|e| {
                errors.push(e);
                AllowedNamespaces::Same
            }),
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Some(Waypoint {
            name: gateway.metadata.name.clone().unwrap_or_default(),
            namespace: namespace_of(&gateway.metadata).to_string(),
            traffic,
            allowed,
        }))
    }

    /// Whether `workload` is one of this waypoint's own pods.
    pub fn runs_as(&self, namespace: &str, labels: &Labels) -> bool {
        namespace == self.namespace && labels.value(GATEWAY_NAME_LABEL) == Some(&self.name)
    }
}

fn allowed_namespaces(
    index: usize,
    listener: &ListenerSpec,
) -> Result<AllowedNamespaces, WaypointError> {
    let namespaces = listener
        .allowed_routes
        .as_ref()
        .and_then(|routes| routes.namespaces.as_ref());
    let Some(namespaces) = namespaces else {
        return Ok(AllowedNamespaces::Same);
    };
    match namespaces.from.as_deref() {
        None | Some("Same") => Ok(AllowedNamespaces::Same),
        Some("All") => Ok(AllowedNamespaces::All),
        Some("Selector") => match &namespaces.selector {
            None => Err(WaypointError::MissingSelector { listener: index }),
            Some(LabelSelectorSpec {
                match_expressions, ..
            }) if !match_expressions.is_empty() => {
                Err(WaypointError::MatchExpressions { listener: index })
            }
            Some(selector) => Ok(AllowedNamespaces::Selector(
                selector.match_labels.clone().into(),
            )),
        },
        Some(other) => Err(WaypointError::UnknownFrom {
            listener: index,
            from: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(yaml: &str) -> GatewayResource {
        serde_yaml::from_str(yaml).expect("valid Gateway YAML")
    }

    #[test]
    fn reads_a_waypoint_gateway_as_istioctl_writes_it() {
        let waypoint = Waypoint::from_gateway(&gateway(
            "metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]",
        ))
        .expect("valid")
        .expect("a waypoint");
        assert_eq!(waypoint.name, "waypoint");
        assert_eq!(waypoint.namespace, "shop");
        assert_eq!(waypoint.traffic, WaypointFor::All);
        assert_eq!(waypoint.allowed, AllowedNamespaces::Same);
    }

    #[test]
    fn other_classes_are_not_waypoints() {
        let ingress = gateway(
            "metadata: {name: ingress}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}",
        );
        assert_eq!(Waypoint::from_gateway(&ingress), Ok(None));
    }

    #[test]
    fn the_hbone_listener_is_found_by_port_and_protocol_not_name() {
        let any_name = gateway(
            "metadata: {name: w}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: other, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
  - {name: tunnel, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: a}}}}}",
        );
        let waypoint = Waypoint::from_gateway(&any_name)
            .expect("valid")
            .expect("waypoint");
        assert_eq!(
            waypoint.allowed,
            AllowedNamespaces::Selector([("team", "a".into())].into())
        );
        let wrong_port = gateway(
            "metadata: {name: w}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15009, protocol: HBONE}]}",
        );
        let errors = Waypoint::from_gateway(&wrong_port).expect_err("no listener");
        assert_eq!(errors, vec![WaypointError::NoHboneListener]);
        assert_eq!(errors[0].field(), "spec.listeners");
    }

    #[test]
    fn bad_values_name_their_field() {
        let bad = gateway(
            "metadata: {name: w, labels: {istio.io/waypoint-for: services}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Some}}}]",
        );
        let errors = Waypoint::from_gateway(&bad).expect_err("invalid");
        let fields: Vec<String> = errors.iter().map(WaypointError::field).collect();
        assert_eq!(
            fields,
            [
                "metadata.labels[istio.io/waypoint-for]",
                "spec.listeners[0].allowedRoutes.namespaces.from"
            ]
        );
        let expressions = gateway(
            "metadata: {name: w}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Selector, selector: {matchExpressions: [{key: a, operator: Exists}]}}}}]",
        );
        assert_eq!(
            Waypoint::from_gateway(&expressions),
            Err(vec![WaypointError::MatchExpressions { listener: 0 }])
        );
    }

    #[test]
    fn allowed_namespaces() {
        let labels: Labels = [("team", "a".into())].into();
        let none = Labels::default();
        assert!(AllowedNamespaces::Same.allows("shop", "shop", &none));
        assert!(!AllowedNamespaces::Same.allows("shop", "other", &labels));
        assert!(AllowedNamespaces::All.allows("shop", "other", &none));
        let selector = AllowedNamespaces::Selector([("team", "a".into())].into());
        assert!(selector.allows("shop", "other", &labels));
        assert!(!selector.allows("shop", "shop", &none));
    }
}
