//! Which policies a waypoint applies to a request: those whose `targetRefs` name its Gateway,
//! the Service the request is for, or (from the root namespace) the `istio-waypoint` class.
//! Selector and namespace-wide policies never apply at a waypoint (Istio's `ShouldAttachPolicy`).

use std::sync::Arc;

use crate::state::{AuthorizationPolicy, PolicyTarget, Snapshot, WaypointRef};

/// A policy that can attach to waypoints by `targetRefs`.
pub trait Targeted {
    fn namespace(&self) -> &str;
    /// `None` for a policy without `targetRefs`, which no waypoint applies.
    fn targets(&self) -> Option<&[PolicyTarget]>;
}

impl Targeted for AuthorizationPolicy {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn targets(&self) -> Option<&[PolicyTarget]> {
        self.targets.as_deref()
    }
}

/// What a waypoint is handling: itself, and the Service the request is for (`None` when the
/// request was addressed to a pod).
#[derive(Debug, Clone, Copy)]
pub struct WaypointTarget<'a> {
    pub gateway: &'a WaypointRef,
    /// `(namespace, name)`.
    pub service: Option<(&'a str, &'a str)>,
}

impl WaypointTarget<'_> {
    /// Whether `policy` attaches here; `root` is the mesh's root namespace.
    pub fn attaches(&self, policy: &impl Targeted, root: &str) -> bool {
        let gateway = (self.gateway.namespace.as_str(), self.gateway.name.as_str());
        policy.targets().is_some_and(|targets| {
            targets
                .iter()
                .any(|target| target.attaches(policy.namespace(), root, gateway, self.service))
        })
    }
}

/// The policies of `list` that attach at `target`, in list order.
pub fn attached<'a, T: Targeted>(
    list: &'a [Arc<T>],
    root: &'a str,
    target: WaypointTarget<'a>,
) -> impl Iterator<Item = &'a T> + 'a {
    list.iter()
        .map(|policy| &**policy)
        .filter(move |policy| target.attaches(*policy, root))
}

/// The `AuthorizationPolicy`s the waypoint applies at `target`, in snapshot order.
pub fn waypoint_authorization_policies<'a>(
    snapshot: &'a Snapshot,
    root: &'a str,
    target: WaypointTarget<'a>,
) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
    attached(&snapshot.authorization_policies, root, target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{authorization, snapshot};

    #[test]
    fn a_waypoint_applies_only_policies_that_target_it() {
        let state = snapshot(
            &[
                authorization(
                    "shop",
                    "gateway",
                    "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]}",
                ),
                authorization(
                    "shop",
                    "other-gateway",
                    "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: other}]}",
                ),
                authorization("shop", "service", "{targetRefs: [{kind: Service, name: echo}]}"),
                authorization("batch", "service-elsewhere", "{targetRefs: [{kind: Service, name: echo}]}"),
                authorization(
                    "istio-system",
                    "class",
                    "{targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}]}",
                ),
                authorization(
                    "shop",
                    "class-outside-root",
                    "{targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}]}",
                ),
                authorization("shop", "namespace-wide", "{}"),
                authorization("istio-system", "mesh-wide", "{}"),
                authorization(
                    "shop",
                    "selector",
                    "{selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: wp}}}",
                ),
            ]
            .concat(),
        );
        let gateway = WaypointRef {
            namespace: "shop".into(),
            name: "wp".into(),
        };
        let names = |service| {
            waypoint_authorization_policies(
                &state,
                "istio-system",
                WaypointTarget {
                    gateway: &gateway,
                    service,
                },
            )
            .map(|policy| policy.key())
            .collect::<Vec<_>>()
        };
        assert_eq!(
            names(Some(("shop", "echo"))),
            ["istio-system/class", "shop/gateway", "shop/service"]
        );
        assert_eq!(names(None), ["istio-system/class", "shop/gateway"]);
        assert_eq!(
            names(Some(("shop", "cart"))),
            ["istio-system/class", "shop/gateway"]
        );
    }
}
