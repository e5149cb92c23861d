//! The allow/deny decision for one inbound connection, with the reason, as ztunnel decides it.
//!
//! Order (Istio's): any matching DENY policy denies; else, with no ALLOW policy on the workload,
//! the connection is allowed; else an ALLOW policy must match. AUDIT policies are ignored (the
//! agent keeps no audit log); dry-run policies never decide, their outcome is reported instead.

use serde::Serialize;

use crate::state::{Action, AuthorizationPolicy, Snapshot, Workload};

use super::attachment::{WaypointTarget, waypoint_authorization_policies};
use super::connection::ConnectionAttributes;
use super::matching::{Attributes, l7_rules_skipped, matching_rule_for};
use super::request::RequestAttributes;
use super::scope::authorization_policies;

/// What was decided and why; served by the admin API and written to access logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided; `None` for the default allow or deny.
    pub policy: Option<String>,
    /// The index of the rule that matched in that policy.
    pub rule: Option<usize>,
    /// One sentence, e.g. `denied by DENY policy shop/no-batch rule 0`.
    pub reason: String,
    /// What each dry-run policy would have done, then the decision with them enforced.
    pub dry_run: Vec<String>,
}

/// Decides whether `conn` may reach `destination`. Policies come from `snapshot`; those without
/// a selector in `root_namespace` apply to the whole mesh.
pub fn authorize(
    snapshot: &Snapshot,
    root_namespace: &str,
    destination: &Workload,
    conn: &ConnectionAttributes,
) -> Decision {
    let policies =
        authorization_policies(snapshot, root_namespace, destination).map(|(policy, _)| policy);
    decide_all(policies, Attributes::Connection(conn))
}

/// Decides whether a waypoint lets `request` through at `target`: the same order over the
/// policies attached to the waypoint, the Service or the `istio-waypoint` class.
pub fn authorize_request(
    snapshot: &Snapshot,
    root_namespace: &str,
    target: WaypointTarget<'_>,
    request: &RequestAttributes<'_>,
) -> Decision {
    let policies = waypoint_authorization_policies(snapshot, root_namespace, target);
    decide_all(policies, Attributes::Request(request))
}

/// Decides whether a waypoint passes a TCP connection (a port that is not HTTP) at `target`:
/// the policies attached there, with L4 semantics (an ALLOW rule naming HTTP attributes never
/// matches, a DENY rule ignores them), as Istio's waypoint applies them to TCP.
pub fn authorize_at_waypoint(
    snapshot: &Snapshot,
    root_namespace: &str,
    target: WaypointTarget<'_>,
    conn: &ConnectionAttributes,
) -> Decision {
    let policies = waypoint_authorization_policies(snapshot, root_namespace, target);
    decide_all(policies, Attributes::Connection(conn))
}

/// Istio's order over `policies`, dry-run ones reported beside the decision.
fn decide_all<'a>(
    policies: impl Iterator<Item = &'a AuthorizationPolicy>,
    conn: Attributes<'_>,
) -> Decision {
    let (dry_run, enforced): (Vec<&AuthorizationPolicy>, Vec<&AuthorizationPolicy>) = policies
        .filter(|policy| policy.action != Action::Audit)
        .partition(|policy| policy.dry_run);
    let mut decision = decide(&enforced, conn);
    if !dry_run.is_empty() {
        decision.dry_run = dry_run.iter().map(|policy| would(policy, conn)).collect();
        let all: Vec<&AuthorizationPolicy> = enforced.iter().chain(&dry_run).copied().collect();
        let enforced_too = decide(&all, conn);
        decision.dry_run.push(format!(
            "with dry-run policies enforced: {}",
            enforced_too.reason
        ));
    }
    decision
}

/// Istio's order over the enforced policies that apply.
fn decide(policies: &[&AuthorizationPolicy], conn: Attributes<'_>) -> Decision {
    let at_l4 = matches!(conn, Attributes::Connection(_));
    let by_action = |action: Action| policies.iter().filter(move |p| p.action == action);
    for policy in by_action(Action::Deny) {
        if let Some(rule) = matching_rule_for(policy, conn) {
            if let Some(invalid) = &policy.invalid {
                let reason = format!(
                    "denied: policy {} cannot be understood ({invalid}), so it denies all traffic to the workloads it selects",
                    policy.key()
                );
                return decided(false, policy, rule, reason);
            }
            let mut reason = format!("denied by DENY policy {} rule {rule}", policy.key());
            if at_l4 && policy.rules[rule].uses_l7() {
                reason.push_str(" (its L7 conditions cannot be checked at L4 and are ignored)");
            }
            return decided(false, policy, rule, reason);
        }
    }
    let allows: Vec<&&AuthorizationPolicy> = by_action(Action::Allow).collect();
    if allows.is_empty() {
        return Decision {
            allowed: true,
            policy: None,
            rule: None,
            reason: "allowed: no ALLOW policy applies".into(),
            dry_run: Vec::new(),
        };
    }
    for policy in &allows {
        if let Some(rule) = matching_rule_for(policy, conn) {
            let reason = format!("allowed by ALLOW policy {} rule {rule}", policy.key());
            return decided(true, policy, rule, reason);
        }
    }
    let mut reason = format!("denied: no ALLOW policy matched ({} applied", allows.len());
    let skipped: usize = allows.iter().map(|policy| l7_rules_skipped(policy)).sum();
    if at_l4 && skipped > 0 {
        let rules = if skipped == 1 {
            "rule uses"
        } else {
            "rules use"
        };
        reason.push_str(&format!(
            "; {skipped} {rules} L7 attributes and never match at L4"
        ));
    }
    reason.push(')');
    Decision {
        allowed: false,
        policy: None,
        rule: None,
        reason,
        dry_run: Vec::new(),
    }
}

fn decided(allowed: bool, policy: &AuthorizationPolicy, rule: usize, reason: String) -> Decision {
    Decision {
        allowed,
        policy: Some(policy.key()),
        rule: Some(rule),
        reason,
        dry_run: Vec::new(),
    }
}

/// What one dry-run policy would do on its own.
fn would(policy: &AuthorizationPolicy, conn: Attributes<'_>) -> String {
    let name = format!("dry-run {} policy {}", policy.action, policy.key());
    match (policy.action, matching_rule_for(policy, conn)) {
        (Action::Deny, Some(rule)) => format!("{name} would deny: rule {rule} matches"),
        (Action::Allow, Some(rule)) => format!("{name} would allow: rule {rule} matches"),
        // Filtered out before: AUDIT policies are not evaluated.
        (Action::Audit, Some(rule)) => format!("{name} would audit: rule {rule} matches"),
        (_, None) => format!("{name}: no rule matches"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::policy::testing::{authorization, snapshot, workload};

    const CART: &str = "cluster.local/ns/shop/sa/cart";
    const JOB: &str = "cluster.local/ns/batch/sa/default";

    fn from(principal: Option<&str>, port: u16) -> ConnectionAttributes {
        let source = Ipv4Addr::new(10, 0, 9, 9);
        let destination = Ipv4Addr::new(10, 0, 1, 1);
        match principal {
            Some(principal) => ConnectionAttributes::mtls(source, principal, destination, port),
            None => ConnectionAttributes::plaintext(source, destination, port),
        }
    }

    /// Decides a connection to `shop/cart` under `policies`.
    fn decide_cart(policies: &[String], conn: &ConnectionAttributes) -> Decision {
        let state = snapshot(&policies.concat());
        authorize(
            &state,
            "istio-system",
            workload(&state, "shop", "cart"),
            conn,
        )
    }

    fn outcome(decision: &Decision) -> (bool, &str) {
        (decision.allowed, decision.reason.as_str())
    }

    #[test]
    fn a_policy_that_cannot_be_understood_denies_what_it_selects() {
        // Broken ALLOW for `app: cart`, next to a good DENY of another namespace's traffic.
        let (state, errors) = crate::policy::testing::assembled(&format!(
            "{}{}",
            authorization(
                "shop",
                "broken",
                "{selector: {matchLabels: {app: cart}}, rules: [{to: [{operation: {ports: [http]}}]}]}"
            ),
            authorization(
                "istio-system",
                "no-batch",
                "{action: DENY, rules: [{from: [{source: {namespaces: [batch]}}]}]}"
            ),
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        // Whatever the source: denied, naming the policy and why it cannot be read.
        for conn in [from(Some(CART), 80), from(None, 8080)] {
            let decision = authorize(
                &state,
                "istio-system",
                workload(&state, "shop", "cart"),
                &conn,
            );
            assert!(!decision.allowed, "{decision:?}");
            assert_eq!(decision.policy.as_deref(), Some("shop/broken"));
            assert!(
                decision.reason.contains("cannot be understood")
                    && decision
                        .reason
                        .contains("spec.rules[0].to[0].operation.ports[0]"),
                "{}",
                decision.reason
            );
        }
        // A workload it does not select is untouched; the other policy still applies to it.
        let job = workload(&state, "batch", "job");
        assert!(authorize(&state, "istio-system", job, &from(Some(CART), 80)).allowed);
        let denied = authorize(&state, "istio-system", job, &from(Some(JOB), 80));
        assert_eq!(denied.policy.as_deref(), Some("istio-system/no-batch"));
    }

    #[test]
    fn no_policy_allows() {
        let decision = decide_cart(&[], &from(None, 80));
        assert_eq!(
            decision,
            Decision {
                allowed: true,
                policy: None,
                rule: None,
                reason: "allowed: no ALLOW policy applies".into(),
                dry_run: vec![],
            }
        );
    }

    #[test]
    fn deny_first_then_allow_then_default_deny() {
        let policies = [
            authorization(
                "shop",
                "no-batch",
                "{action: DENY, rules: [{from: [{source: {namespaces: [batch]}}]}]}",
            ),
            authorization(
                "shop",
                "all-mtls",
                "{rules: [{from: [{source: {principals: [\"*\"]}}]}]}",
            ),
            authorization(
                "shop",
                "port-80",
                "{rules: [{to: [{operation: {ports: [\"80\"]}}]}]}",
            ),
        ];
        let decision = decide_cart(&policies, &from(Some(JOB), 80));
        assert_eq!(
            (decision.allowed, decision.policy.as_deref(), decision.rule),
            (false, Some("shop/no-batch"), Some(0))
        );
        assert_eq!(
            decision.reason,
            "denied by DENY policy shop/no-batch rule 0"
        );

        let decision = decide_cart(&policies, &from(Some(CART), 8080));
        assert_eq!(
            outcome(&decision),
            (true, "allowed by ALLOW policy shop/all-mtls rule 0")
        );
        assert_eq!(decision.policy.as_deref(), Some("shop/all-mtls"));

        let decision = decide_cart(&policies, &from(None, 80));
        assert_eq!(
            outcome(&decision),
            (true, "allowed by ALLOW policy shop/port-80 rule 0")
        );

        let decision = decide_cart(&policies, &from(None, 8080));
        assert_eq!(
            outcome(&decision),
            (false, "denied: no ALLOW policy matched (2 applied)")
        );
        assert_eq!((decision.policy, decision.rule), (None, None));
    }

    #[test]
    fn deny_without_match_and_no_allow_allows() {
        let policies = [authorization(
            "shop",
            "no-batch",
            "{action: DENY, rules: [{from: [{source: {namespaces: [batch]}}]}]}",
        )];
        let decision = decide_cart(&policies, &from(Some(CART), 80));
        assert_eq!(
            outcome(&decision),
            (true, "allowed: no ALLOW policy applies")
        );
    }

    #[test]
    fn empty_policies() {
        // ALLOW with no rules: applies, matches nothing, so everything is denied.
        let allow_nothing = [authorization("shop", "allow-nothing", "{}")];
        let decision = decide_cart(&allow_nothing, &from(Some(CART), 80));
        assert_eq!(
            outcome(&decision),
            (false, "denied: no ALLOW policy matched (1 applied)")
        );
        // DENY with no rules denies nothing.
        let deny_nothing = [authorization("shop", "deny-nothing", "{action: DENY}")];
        let decision = decide_cart(&deny_nothing, &from(None, 80));
        assert_eq!(
            outcome(&decision),
            (true, "allowed: no ALLOW policy applies")
        );
        // A `{}` rule matches everything.
        let allow_all = [
            authorization("shop", "allow-nothing", "{}"),
            authorization("shop", "allow-all", "{rules: [{}]}"),
        ];
        let decision = decide_cart(&allow_all, &from(None, 80));
        assert_eq!(
            outcome(&decision),
            (true, "allowed by ALLOW policy shop/allow-all rule 0")
        );
    }

    #[test]
    fn scopes_mesh_namespace_and_selector() {
        let policies = [
            // Mesh-wide: deny plaintext everywhere.
            authorization(
                "istio-system",
                "require-mtls",
                "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}",
            ),
            // Root namespace with a selector: every `app: cart` workload, any namespace.
            authorization(
                "istio-system",
                "cart-port",
                "{action: DENY, selector: {matchLabels: {app: cart}}, rules: [{to: [{operation: {ports: [\"9090\"]}}]}]}",
            ),
            // Another namespace's policies never apply to shop/cart.
            authorization("batch", "deny-all", "{action: DENY, rules: [{}]}"),
            // Selector that does not match shop/cart.
            authorization(
                "shop",
                "db-only",
                "{selector: {matchLabels: {app: db}}, rules: [{}]}",
            ),
        ];
        let decision = decide_cart(&policies, &from(None, 80));
        assert_eq!(
            outcome(&decision),
            (
                false,
                "denied by DENY policy istio-system/require-mtls rule 0"
            )
        );
        let decision = decide_cart(&policies, &from(Some(CART), 9090));
        assert_eq!(
            outcome(&decision),
            (false, "denied by DENY policy istio-system/cart-port rule 0")
        );
        let decision = decide_cart(&policies, &from(Some(CART), 80));
        assert_eq!(
            outcome(&decision),
            (true, "allowed: no ALLOW policy applies")
        );

        // batch/job: batch's deny-all and the mesh-wide ones apply.
        let state = snapshot(&policies.concat());
        let job = workload(&state, "batch", "job");
        let decision = authorize(&state, "istio-system", job, &from(Some(CART), 80));
        assert_eq!(
            outcome(&decision),
            (false, "denied by DENY policy batch/deny-all rule 0")
        );
        // With another root namespace, istio-system's policies no longer reach shop/cart.
        let cart = workload(&state, "shop", "cart");
        let decision = authorize(&state, "mesh-root", cart, &from(None, 9090));
        assert_eq!(
            outcome(&decision),
            (true, "allowed: no ALLOW policy applies")
        );
    }

    #[test]
    fn l7_rules_fail_closed() {
        // ALLOW on methods: never matches at L4, so the workload denies everything.
        let allow_get = [authorization(
            "shop",
            "get-only",
            "{rules: [{to: [{operation: {methods: [GET]}}]}, {when: [{key: \"request.headers[x]\", values: [y]}]}]}",
        )];
        let decision = decide_cart(&allow_get, &from(Some(CART), 80));
        assert_eq!(
            outcome(&decision),
            (
                false,
                "denied: no ALLOW policy matched (1 applied; 2 rules use L7 attributes and never match at L4)"
            )
        );
        // DENY on a path: the path is ignored, so it denies the whole port.
        let deny_admin = [authorization(
            "shop",
            "no-admin",
            "{action: DENY, rules: [{to: [{operation: {paths: [/admin], ports: [\"80\"]}}]}]}",
        )];
        let decision = decide_cart(&deny_admin, &from(Some(CART), 80));
        assert_eq!(
            outcome(&decision),
            (
                false,
                "denied by DENY policy shop/no-admin rule 0 (its L7 conditions cannot be checked at L4 and are ignored)"
            )
        );
        let decision = decide_cart(&deny_admin, &from(Some(CART), 81));
        assert!(decision.allowed);
    }

    #[test]
    fn audit_is_ignored() {
        let policies = [
            authorization("shop", "audit-all", "{action: AUDIT, rules: [{}]}"),
            authorization("istio-system", "audit-mesh", "{action: AUDIT}"),
        ];
        let decision = decide_cart(&policies, &from(None, 80));
        assert_eq!(
            outcome(&decision),
            (true, "allowed: no ALLOW policy applies")
        );
        assert!(decision.dry_run.is_empty());
    }

    #[test]
    fn dry_run_policies_only_report() {
        let dry = |name: &str, spec: &str| {
            authorization("shop", name, spec).replace(
                "namespace: shop}",
                "namespace: shop, annotations: {istio.io/dry-run: \"true\"}}",
            )
        };
        let policies = [
            dry(
                "deny-plaintext",
                "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}",
            ),
            dry(
                "allow-batch",
                "{rules: [{from: [{source: {namespaces: [batch]}}]}]}",
            ),
        ];
        let decision = decide_cart(&policies, &from(None, 80));
        assert_eq!(
            outcome(&decision),
            (true, "allowed: no ALLOW policy applies")
        );
        assert_eq!(
            decision.dry_run,
            [
                "dry-run ALLOW policy shop/allow-batch: no rule matches",
                "dry-run DENY policy shop/deny-plaintext would deny: rule 0 matches",
                "with dry-run policies enforced: denied by DENY policy shop/deny-plaintext rule 0",
            ]
        );

        let decision = decide_cart(&policies, &from(Some(CART), 80));
        assert!(decision.allowed);
        assert_eq!(
            decision.dry_run,
            [
                "dry-run ALLOW policy shop/allow-batch: no rule matches",
                "dry-run DENY policy shop/deny-plaintext: no rule matches",
                "with dry-run policies enforced: denied: no ALLOW policy matched (1 applied)",
            ]
        );

        // An enforced DENY still decides; dry-run ones are reported beside it.
        let mut with_enforced = policies.to_vec();
        with_enforced.push(authorization(
            "shop",
            "deny-all",
            "{action: DENY, rules: [{}]}",
        ));
        let decision = decide_cart(&with_enforced, &from(Some(JOB), 80));
        assert_eq!(
            outcome(&decision),
            (false, "denied by DENY policy shop/deny-all rule 0")
        );
        assert_eq!(
            decision.dry_run[0],
            "dry-run ALLOW policy shop/allow-batch would allow: rule 0 matches"
        );
    }

    #[test]
    fn serializes_for_the_admin_api() {
        let decision = decide_cart(&[], &from(None, 80));
        assert_eq!(
            serde_json::to_value(&decision).expect("serializes"),
            serde_json::json!({
                "allowed": true, "policy": null, "rule": null,
                "reason": "allowed: no ALLOW policy applies", "dry_run": []
            })
        );
    }

    /// Requests at the waypoint `shop/wp` for the Service `shop/echo`.
    mod at_a_waypoint {
        use std::net::Ipv4Addr;

        use http::HeaderMap;

        use super::*;
        use crate::policy::{RequestAttributes, RequestAuth, WaypointTarget};
        use crate::state::WaypointRef;

        const ISSUER: &str = "https://issuer.example";

        /// A request from `shop/cart` as the waypoint sees it.
        struct Ask {
            method: &'static str,
            path: &'static str,
            host: &'static str,
            headers: HeaderMap,
            auth: Option<RequestAuth>,
        }

        fn get(path: &'static str) -> Ask {
            Ask {
                method: "GET",
                path,
                host: "echo.shop.svc.cluster.local:80",
                headers: HeaderMap::new(),
                auth: None,
            }
        }

        impl Ask {
            fn token(mut self, subject: &str, claims: serde_json::Value) -> Ask {
                self.auth = Some(RequestAuth {
                    principal: format!("{ISSUER}/{subject}"),
                    audiences: vec!["shop".into()],
                    presenter: None,
                    claims: claims.as_object().cloned().unwrap_or_default(),
                });
                self
            }

            fn header(mut self, name: &'static str, value: &'static str) -> Ask {
                self.headers
                    .append(name, http::HeaderValue::from_static(value));
                self
            }
        }

        /// Decides `ask` under `policies` (documents).
        fn decide(policies: &[String], ask: &Ask) -> Decision {
            let (state, errors) = crate::policy::testing::assembled(&policies.concat());
            assert!(
                errors.iter().all(|e| e.to_string().contains("shop/broken")),
                "{errors:?}"
            );
            let conn = ConnectionAttributes::mtls(
                Ipv4Addr::new(10, 0, 1, 1),
                CART,
                Ipv4Addr::new(10, 96, 0, 10),
                80,
            );
            let request = RequestAttributes {
                connection: &conn,
                remote_ip: conn.source_ip.into(),
                method: ask.method,
                path: ask.path,
                host: ask.host,
                headers: &ask.headers,
                auth: ask.auth.as_ref(),
            };
            let gateway = WaypointRef {
                namespace: "shop".into(),
                name: "wp".into(),
            };
            authorize_request(
                &state,
                "istio-system",
                WaypointTarget {
                    gateway: &gateway,
                    service: Some(("shop", "echo")),
                },
                &request,
            )
        }

        fn on_echo(name: &str, spec: &str) -> String {
            authorization(
                "shop",
                name,
                &format!("{{targetRefs: [{{kind: Service, name: echo}}], {spec}}}"),
            )
        }

        /// Istio's TestL7JWT table: a token is required except on /healthz, and only one
        /// subject is allowed.
        #[test]
        fn istio_jwt_table() {
            let policies = [on_echo(
                "require-jwt",
                &format!(
                    "rules: [{{from: [{{source: {{requestPrincipals: [\"{ISSUER}/allowed\"]}}}}]}}, {{to: [{{operation: {{paths: [/healthz]}}}}]}}]"
                ),
            )];
            let cases = [
                (
                    get("/"),
                    false,
                    "denied: no ALLOW policy matched (1 applied)",
                ),
                (
                    get("/").token("allowed", serde_json::json!({})),
                    true,
                    "allowed by ALLOW policy shop/require-jwt rule 0",
                ),
                (
                    get("/").token("other", serde_json::json!({})),
                    false,
                    "denied: no ALLOW policy matched (1 applied)",
                ),
                (
                    get("/healthz"),
                    true,
                    "allowed by ALLOW policy shop/require-jwt rule 1",
                ),
            ];
            for (ask, allowed, reason) in cases {
                let decision = decide(&policies, &ask);
                assert_eq!(
                    (decision.allowed, decision.reason.as_str()),
                    (allowed, reason),
                    "{} {:?}",
                    ask.path,
                    ask.auth.map(|a| a.principal)
                );
            }
        }

        #[test]
        fn operations_match_methods_paths_hosts_and_ports() {
            let deny = |operation: &str| {
                [on_echo(
                    "deny",
                    &format!("action: DENY, rules: [{{to: [{{operation: {operation}}}]}}]"),
                )]
            };
            let denied = |operation: &str, ask: &Ask| !decide(&deny(operation), ask).allowed;
            assert!(denied(
                "{methods: [DELETE]}",
                &Ask {
                    method: "DELETE",
                    ..get("/")
                }
            ));
            assert!(!denied("{methods: [DELETE]}", &get("/")));
            assert!(denied(
                "{notMethods: [GET]}",
                &Ask {
                    method: "POST",
                    ..get("/")
                }
            ));
            assert!(denied("{paths: [/admin*]}", &get("/admin/users")));
            assert!(!denied("{paths: [/admin*]}", &get("/public")));
            assert!(denied(
                "{paths: [\"/users/{*}/orders\"]}",
                &get("/users/7/orders")
            ));
            assert!(!denied(
                "{paths: [\"/users/{*}/orders\"]}",
                &get("/users/7/x/orders")
            ));
            assert!(denied("{paths: [\"/files/{**}\"]}", &get("/files/a/b")));
            assert!(denied("{notPaths: [/public*]}", &get("/private")));
            // Hosts ignore case and, when the pattern has none, the port.
            assert!(denied("{hosts: [ECHO.shop.svc.cluster.local]}", &get("/")));
            assert!(denied("{hosts: [\"*.svc.cluster.local\"]}", &get("/")));
            assert!(denied(
                "{hosts: [\"echo.shop.svc.cluster.local:80\"]}",
                &get("/")
            ));
            assert!(!denied(
                "{hosts: [\"echo.shop.svc.cluster.local:8080\"]}",
                &get("/")
            ));
            assert!(!denied("{hosts: [other.example]}", &get("/")));
            // Ports are the Service port the client dialed.
            assert!(denied("{ports: [\"80\"]}", &get("/")));
            assert!(!denied("{ports: [\"8080\"]}", &get("/")));
        }

        #[test]
        fn sources_match_principals_request_principals_and_addresses() {
            let allow = |source: &str| {
                [on_echo(
                    "allow",
                    &format!("rules: [{{from: [{{source: {source}}}]}}]"),
                )]
            };
            let allowed = |source: &str, ask: &Ask| decide(&allow(source), ask).allowed;
            assert!(allowed(
                "{principals: [cluster.local/ns/shop/sa/cart]}",
                &get("/")
            ));
            assert!(!allowed(
                "{principals: [cluster.local/ns/shop/sa/web]}",
                &get("/")
            ));
            assert!(allowed("{namespaces: [shop]}", &get("/")));
            assert!(allowed("{ipBlocks: [10.0.1.0/24]}", &get("/")));
            assert!(!allowed("{ipBlocks: [10.0.2.0/24]}", &get("/")));
            assert!(allowed("{remoteIpBlocks: [10.0.1.1]}", &get("/")));
            assert!(!allowed("{notRemoteIpBlocks: [10.0.0.0/8]}", &get("/")));
            assert!(!allowed("{requestPrincipals: [\"*\"]}", &get("/")));
            assert!(allowed(
                "{requestPrincipals: [\"*\"]}",
                &get("/").token("x", serde_json::json!({}))
            ));
            assert!(allowed("{notRequestPrincipals: [\"*\"]}", &get("/")));
            assert!(allowed(
                "{requestPrincipals: [\"https://issuer.example/*\"]}",
                &get("/").token("x", serde_json::json!({}))
            ));
        }

        #[test]
        fn conditions_on_headers_claims_and_what_cannot_be_evaluated() {
            let allow = |key: &str, values: &str| {
                [on_echo(
                    "allow",
                    &format!("rules: [{{when: [{{key: \"{key}\", {values}}}]}}]"),
                )]
            };
            let allowed =
                |key: &str, values: &str, ask: &Ask| decide(&allow(key, values), ask).allowed;
            let admin = || get("/").header("x-user", "admin");
            assert!(allowed(
                "request.headers[X-User]",
                "values: [admin]",
                &admin()
            ));
            assert!(allowed(
                "request.headers[x-user]",
                "values: [\"adm*\"]",
                &admin()
            ));
            assert!(!allowed(
                "request.headers[x-user]",
                "values: [admin]",
                &get("/")
            ));
            assert!(allowed(
                "request.headers[x-user]",
                "notValues: [admin]",
                &get("/")
            ));
            // Repeated headers are matched joined with a comma, as Envoy does.
            assert!(allowed(
                "request.headers[x-user]",
                "values: [\"a,b\"]",
                &get("/").header("x-user", "a").header("x-user", "b")
            ));
            let token = || {
                get("/").token(
                    "alice",
                    serde_json::json!({"groups": ["dev", "ops"], "org": {"team": "pay"}}),
                )
            };
            assert!(allowed(
                "request.auth.claims[groups]",
                "values: [ops]",
                &token()
            ));
            assert!(!allowed(
                "request.auth.claims[groups]",
                "values: [admin]",
                &token()
            ));
            assert!(allowed(
                "request.auth.claims[org][team]",
                "values: [pay]",
                &token()
            ));
            assert!(!allowed(
                "request.auth.claims[groups]",
                "values: [ops]",
                &get("/")
            ));
            assert!(allowed(
                "request.auth.principal",
                "values: [\"https://issuer.example/alice\"]",
                &token()
            ));
            assert!(allowed(
                "request.auth.audiences",
                "values: [shop]",
                &token()
            ));
            assert!(allowed("source.namespace", "values: [shop]", &get("/")));
            assert!(allowed(
                "source.serviceAccount",
                "values: [shop/cart]",
                &get("/")
            ));
            assert!(allowed("destination.port", "values: [\"80\"]", &get("/")));
            assert!(allowed("destination.ip", "values: [10.96.0.10]", &get("/")));
            // What the mesh cannot evaluate never allows, and always denies.
            assert!(!allowed("connection.sni", "values: [x]", &get("/")));
            let deny = [on_echo(
                "deny",
                "action: DENY, rules: [{when: [{key: connection.sni, values: [x]}]}]",
            )];
            assert!(!decide(&deny, &get("/")).allowed);
        }

        #[test]
        fn only_policies_that_target_this_waypoint_or_service_apply() {
            let selector = authorization(
                "shop",
                "by-selector",
                "{selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: wp}}, action: DENY, rules: [{}]}",
            );
            let namespace_wide =
                authorization("shop", "namespace-wide", "{action: DENY, rules: [{}]}");
            let other_service = authorization(
                "shop",
                "other",
                "{targetRefs: [{kind: Service, name: cart}], action: DENY, rules: [{}]}",
            );
            let decision = decide(&[selector, namespace_wide, other_service], &get("/"));
            assert_eq!(
                (decision.allowed, decision.reason.as_str()),
                (true, "allowed: no ALLOW policy applies")
            );
            let gateway = authorization(
                "shop",
                "gateway",
                "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}], action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}",
            );
            let decision = decide(&[gateway], &get("/admin"));
            assert_eq!(decision.reason, "denied by DENY policy shop/gateway rule 0");
        }

        #[test]
        fn a_targeted_policy_that_cannot_be_understood_denies_at_its_targets() {
            let broken = on_echo(
                "broken",
                "rules: [{to: [{operation: {paths: [\"/a{*}\"]}}]}]",
            );
            let decision = decide(&[broken], &get("/"));
            assert!(!decision.allowed);
            assert!(
                decision.reason.contains("shop/broken cannot be understood")
                    && decision
                        .reason
                        .contains("spec.rules[0].to[0].operation.paths[0]"),
                "{}",
                decision.reason
            );
        }

        /// A node agent never applies a targeted policy, even one that denies everything.
        #[test]
        fn node_agents_leave_targeted_policies_alone() {
            let state =
                crate::policy::testing::snapshot(&on_echo("deny", "action: DENY, rules: [{}]"));
            let decision = authorize(
                &state,
                "istio-system",
                workload(&state, "shop", "cart"),
                &from(Some(JOB), 80),
            );
            assert_eq!(decision.reason, "allowed: no ALLOW policy applies");
        }
    }
}
