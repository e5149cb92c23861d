//! Which policies apply to a workload, and at what scope: mesh-wide, namespace-wide or by selector.

use crate::state::Labels;
use serde::Serialize;

use crate::state::{AuthorizationPolicy, PeerAuthentication, Snapshot, Workload};

/// How a policy reaches a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// In the root namespace, without a selector.
    Mesh,
    /// In the workload's namespace, without a selector.
    Namespace,
    /// Its selector matches the workload's labels.
    Workload,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Mesh => "mesh",
            Scope::Namespace => "namespace",
            Scope::Workload => "workload",
        }
    }
}

/// The `AuthorizationPolicy`s that apply to `workload`, with their scope, in snapshot order.
/// As in ztunnel, a root-namespace policy with a selector applies to matching workloads of every
/// namespace. Policies with `targetRefs` are waypoints' and never apply here (istiod never sends
/// them to ztunnel).
pub fn authorization_policies<'a>(
    snapshot: &'a Snapshot,
    root_namespace: &'a str,
    workload: &'a Workload,
) -> impl Iterator<Item = (&'a AuthorizationPolicy, Scope)> + 'a {
    snapshot
        .authorization_policies
        .iter()
        .filter(|policy| !policy.is_for_waypoints())
        .filter_map(move |policy| {
            let in_root = policy.namespace == root_namespace;
            let in_own = policy.namespace == workload.namespace;
            let scope = if policy.selector.is_empty() {
                if in_root {
                    Scope::Mesh
                } else if in_own {
                    Scope::Namespace
                } else {
                    return None;
                }
            } else if (in_root || in_own) && selects(&policy.selector, workload) {
                Scope::Workload
            } else {
                return None;
            };
            Some((&**policy, scope))
        })
}

/// The `PeerAuthentication`s that apply to `workload`, with their scope. Unlike authorization, a
/// selector only reaches workloads of the policy's own namespace (Istio's rule, root included).
pub fn peer_authentications<'a>(
    snapshot: &'a Snapshot,
    root_namespace: &'a str,
    workload: &'a Workload,
) -> impl Iterator<Item = (&'a PeerAuthentication, Scope)> + 'a {
    snapshot
        .peer_authentications
        .iter()
        .filter_map(move |policy| {
            let scope = if policy.selector.is_empty() {
                if policy.namespace == root_namespace {
                    Scope::Mesh
                } else if policy.namespace == workload.namespace {
                    Scope::Namespace
                } else {
                    return None;
                }
            } else if policy.namespace == workload.namespace && selects(&policy.selector, workload)
            {
                Scope::Workload
            } else {
                return None;
            };
            Some((&**policy, scope))
        })
}

/// Every selector label is on the workload with the same value.
fn selects(selector: &Labels, workload: &Workload) -> bool {
    selector
        .iter()
        .all(|(key, value)| workload.labels.get(key) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{authorization, snapshot, workload};

    fn peer(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        )
    }

    #[test]
    fn authorization_scopes() {
        let state = snapshot(
            &[
                authorization("istio-system", "mesh", "{}"),
                authorization(
                    "istio-system",
                    "root-cart",
                    "{selector: {matchLabels: {app: cart}}}",
                ),
                authorization(
                    "istio-system",
                    "root-other",
                    "{selector: {matchLabels: {app: x}}}",
                ),
                authorization("shop", "ns", "{}"),
                authorization("shop", "empty-selector", "{selector: {matchLabels: {}}}"),
                authorization("shop", "web", "{selector: {matchLabels: {tier: web}}}"),
                authorization(
                    "shop",
                    "web-db",
                    "{selector: {matchLabels: {tier: web, app: db}}}",
                ),
                authorization("batch", "ns", "{}"),
            ]
            .concat(),
        );
        let applied = |namespace: &str, name: &str| -> Vec<(String, Scope)> {
            authorization_policies(&state, "istio-system", workload(&state, namespace, name))
                .map(|(policy, scope)| (policy.key(), scope))
                .collect()
        };
        assert_eq!(
            applied("shop", "cart"),
            [
                ("istio-system/mesh".to_string(), Scope::Mesh),
                ("istio-system/root-cart".to_string(), Scope::Workload),
                ("shop/empty-selector".to_string(), Scope::Namespace),
                ("shop/ns".to_string(), Scope::Namespace),
                ("shop/web".to_string(), Scope::Workload),
            ]
        );
        assert_eq!(
            applied("batch", "job"),
            [
                ("batch/ns".to_string(), Scope::Namespace),
                ("istio-system/mesh".to_string(), Scope::Mesh),
                ("istio-system/root-cart".to_string(), Scope::Workload),
            ]
        );
        // Another root namespace: istio-system's policies become ordinary namespace policies.
        let cart = workload(&state, "shop", "cart");
        let keys: Vec<String> = authorization_policies(&state, "shop", cart)
            .map(|(policy, scope)| format!("{} {}", policy.key(), scope.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                "shop/empty-selector mesh",
                "shop/ns mesh",
                "shop/web workload"
            ]
        );
    }

    #[test]
    fn peer_authentication_selectors_stay_in_their_namespace() {
        let state = snapshot(
            &[
                peer("istio-system", "mesh", "{}"),
                peer(
                    "istio-system",
                    "root-cart",
                    "{selector: {matchLabels: {app: cart}}}",
                ),
                peer("shop", "ns", "{}"),
                peer("shop", "cart", "{selector: {matchLabels: {app: cart}}}"),
            ]
            .concat(),
        );
        let applied = |namespace: &str, name: &str| -> Vec<(String, Scope)> {
            peer_authentications(&state, "istio-system", workload(&state, namespace, name))
                .map(|(policy, scope)| (policy.key(), scope))
                .collect()
        };
        assert_eq!(
            applied("shop", "cart"),
            [
                ("istio-system/mesh".to_string(), Scope::Mesh),
                ("shop/cart".to_string(), Scope::Workload),
                ("shop/ns".to_string(), Scope::Namespace),
            ]
        );
        assert_eq!(
            applied("batch", "job"),
            [("istio-system/mesh".to_string(), Scope::Mesh)]
        );
    }
}
