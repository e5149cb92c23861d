//! Lists the authorization policies that apply to a workload, for `mesh-agent policies`.

use serde::Serialize;

use crate::state::{Action, Snapshot, Workload};

use super::scope::{Scope, authorization_policies};

/// One `AuthorizationPolicy` as it applies to a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppliedPolicy {
    pub name: String,
    pub namespace: String,
    /// AUDIT policies are listed, though they never change a decision.
    pub action: Action,
    pub scope: Scope,
    pub dry_run: bool,
    pub rules: usize,
}

/// The policies that apply to `workload`: mesh-wide first, then namespace-wide, then by selector;
/// by namespace and name within a scope.
pub fn policies_for(
    snapshot: &Snapshot,
    root_namespace: &str,
    workload: &Workload,
) -> Vec<AppliedPolicy> {
    let mut applied: Vec<AppliedPolicy> =
        authorization_policies(snapshot, root_namespace, workload)
            .map(|(policy, scope)| AppliedPolicy {
                name: policy.name.clone(),
                namespace: policy.namespace.clone(),
                action: policy.action,
                scope,
                dry_run: policy.dry_run,
                rules: policy.rules.len(),
            })
            .collect();
    // Stable: snapshot order (namespace, name) is kept within a scope.
    applied.sort_by_key(|policy| policy.scope);
    applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{authorization, snapshot, workload};

    #[test]
    fn lists_by_scope() {
        let state = snapshot(
            &[
                authorization(
                    "shop",
                    "web",
                    "{selector: {matchLabels: {tier: web}}, action: DENY, rules: [{}, {}]}",
                ),
                authorization("shop", "ns", "{action: AUDIT, rules: [{}]}"),
                authorization("istio-system", "mesh", "{}"),
                authorization(
                    "istio-system",
                    "carts",
                    "{selector: {matchLabels: {app: cart}}, rules: [{}]}",
                ),
                authorization("batch", "other", "{}"),
            ]
            .concat()
            .replace(
                "name: web, namespace: shop}",
                "name: web, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}",
            ),
        );
        let applied = policies_for(&state, "istio-system", workload(&state, "shop", "cart"));
        let summary: Vec<String> = applied
            .iter()
            .map(|p| {
                format!(
                    "{}/{} {} {} dry_run={} rules={}",
                    p.namespace,
                    p.name,
                    p.action,
                    p.scope.as_str(),
                    p.dry_run,
                    p.rules
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                "istio-system/mesh ALLOW mesh dry_run=false rules=0",
                "shop/ns AUDIT namespace dry_run=false rules=1",
                "istio-system/carts ALLOW workload dry_run=false rules=1",
                "shop/web DENY workload dry_run=true rules=2",
            ]
        );
        assert_eq!(
            serde_json::to_value(&applied[0]).expect("serializes"),
            serde_json::json!({"name": "mesh", "namespace": "istio-system", "action": "ALLOW",
                "scope": "mesh", "dry_run": false, "rules": 0})
        );
    }
}
