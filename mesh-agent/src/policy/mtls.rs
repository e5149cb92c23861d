//! The mTLS mode `PeerAuthentication`s require for a workload's port, resolved as Istio does.
//!
//! The most specific level wins: the workload's selector policy (its port-level setting first),
//! then the namespace-wide policy, then the mesh-wide one in the root namespace, then PERMISSIVE.
//! `UNSET` at a level inherits from the level below it. When several policies compete at one
//! level, the oldest wins (then the first by name), as in Istio.

use crate::state::{MtlsMode, PeerAuthentication, Snapshot, Workload};

use super::scope::{Scope, peer_authentications};

/// The mode inbound connections to `workload` on `port` (the pod's port, not a service port) must
/// use: `Strict`, `Permissive` or `Disable`, never `Unset`.
pub fn mtls_mode(
    snapshot: &Snapshot,
    root_namespace: &str,
    workload: &Workload,
    port: u16,
) -> MtlsMode {
    let mut levels: [Option<&PeerAuthentication>; 3] = [None; 3];
    for (policy, scope) in peer_authentications(snapshot, root_namespace, workload) {
        let slot = &mut levels[match scope {
            Scope::Mesh => 0,
            Scope::Namespace => 1,
            Scope::Workload => 2,
        }];
        if slot.is_none_or(|current| older(policy, current)) {
            *slot = Some(policy);
        }
    }
    let [mesh, namespace, selected] = levels;
    let mut mode = MtlsMode::Permissive;
    for policy in [mesh, namespace, selected].into_iter().flatten() {
        mode = inherit(policy.mode, mode);
    }
    if let Some(port_mode) = selected.and_then(|policy| policy.port_level.get(&port)) {
        mode = inherit(*port_mode, mode);
    }
    mode
}

fn inherit(mode: MtlsMode, parent: MtlsMode) -> MtlsMode {
    match mode {
        MtlsMode::Unset => parent,
        mode => mode,
    }
}

/// Istio's tie-break: the oldest policy, then the first by name. Policies without a creation
/// time (hand-written files) count as newer than any that has one.
fn older(candidate: &PeerAuthentication, current: &PeerAuthentication) -> bool {
    let key = |policy: &PeerAuthentication| {
        (
            policy.created.is_none(),
            policy.created.clone(),
            policy.name.clone(),
        )
    };
    key(candidate) < key(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{snapshot, workload};

    fn peer(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        )
    }

    fn cart_mode(policies: &[String], port: u16) -> MtlsMode {
        let state = snapshot(&policies.concat());
        mtls_mode(
            &state,
            "istio-system",
            workload(&state, "shop", "cart"),
            port,
        )
    }

    #[test]
    fn resolution_order() {
        let mesh = |mode: &str| {
            peer(
                "istio-system",
                "default",
                &format!("{{mtls: {{mode: {mode}}}}}"),
            )
        };
        let namespace =
            |mode: &str| peer("shop", "default", &format!("{{mtls: {{mode: {mode}}}}}"));
        let selected = |mode: &str| {
            peer(
                "shop",
                "cart",
                &format!(
                    "{{selector: {{matchLabels: {{app: cart}}}}, mtls: {{mode: {mode}}}, portLevelMtls: {{8080: {{mode: DISABLE}}, 9090: {{mode: UNSET}}}}}}"
                ),
            )
        };
        let cases: [(&[String], u16, MtlsMode); 12] = [
            (&[], 80, MtlsMode::Permissive),
            (&[mesh("STRICT")], 80, MtlsMode::Strict),
            (&[mesh("UNSET")], 80, MtlsMode::Permissive),
            (&[mesh("DISABLE")], 80, MtlsMode::Disable),
            (
                &[mesh("STRICT"), namespace("PERMISSIVE")],
                80,
                MtlsMode::Permissive,
            ),
            (&[mesh("STRICT"), namespace("UNSET")], 80, MtlsMode::Strict),
            (
                &[mesh("DISABLE"), namespace("STRICT"), selected("PERMISSIVE")],
                80,
                MtlsMode::Permissive,
            ),
            (
                &[mesh("PERMISSIVE"), namespace("STRICT"), selected("UNSET")],
                80,
                MtlsMode::Strict,
            ),
            // Port-level first, on the selector policy.
            (
                &[namespace("STRICT"), selected("STRICT")],
                8080,
                MtlsMode::Disable,
            ),
            // Port-level UNSET inherits the policy's own (resolved) mode.
            (
                &[namespace("STRICT"), selected("UNSET")],
                9090,
                MtlsMode::Strict,
            ),
            (&[selected("PERMISSIVE")], 9090, MtlsMode::Permissive),
            (
                &[namespace("STRICT"), selected("UNSET")],
                443,
                MtlsMode::Strict,
            ),
        ];
        for (policies, port, expected) in cases {
            assert_eq!(
                cart_mode(policies, port),
                expected,
                "{policies:?} port {port}"
            );
        }
    }

    #[test]
    fn other_namespaces_and_root_selectors() {
        let policies = [
            peer("batch", "default", "{mtls: {mode: STRICT}}"),
            // A root-namespace selector only reaches root-namespace workloads.
            peer(
                "istio-system",
                "carts",
                "{selector: {matchLabels: {app: cart}}, mtls: {mode: STRICT}}",
            ),
            // Another workload's selector.
            peer(
                "shop",
                "db",
                "{selector: {matchLabels: {app: db}}, mtls: {mode: DISABLE}}",
            ),
        ];
        assert_eq!(cart_mode(&policies, 80), MtlsMode::Permissive);
        let state = snapshot(&policies.concat());
        let job = workload(&state, "batch", "job");
        assert_eq!(mtls_mode(&state, "istio-system", job, 80), MtlsMode::Strict);
    }

    #[test]
    fn the_oldest_policy_of_a_level_wins() {
        let dated = |name: &str, when: &str, mode: &str| {
            peer("shop", name, &format!("{{mtls: {{mode: {mode}}}}}")).replace(
                "namespace: shop}",
                &format!("namespace: shop, creationTimestamp: \"{when}\"}}"),
            )
        };
        let policies = [
            dated("a-new", "2025-06-01T00:00:00Z", "DISABLE"),
            dated("b-old", "2025-01-01T00:00:00Z", "STRICT"),
            peer("shop", "0-undated", "{mtls: {mode: PERMISSIVE}}"),
        ];
        assert_eq!(cart_mode(&policies, 80), MtlsMode::Strict);
        let undated = [
            peer("shop", "b", "{mtls: {mode: DISABLE}}"),
            peer("shop", "a", "{mtls: {mode: STRICT}}"),
        ];
        assert_eq!(cart_mode(&undated, 80), MtlsMode::Strict);
    }
}
