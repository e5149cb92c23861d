//! Whether an `AuthorizationPolicy`'s rules match a connection, with ztunnel's L4 semantics.
//!
//! Within a rule every part present must match: `from` (any source), `to` (any operation) and
//! `when` (every condition); within a source or operation, every field present must match.
//! An attribute the connection lacks (a plaintext peer has no principal, so no namespace)
//! matches no positive field (`principals`, `namespaces`) and every negative one
//! (`notPrincipals`, `notNamespaces`), as in Istio: `notPrincipals: ["*"]` catches plaintext.
//!
//! Attributes only an L7 proxy sees (request principals, remote IPs — `remoteIpBlocks` and the
//! `remote.ip` condition —, hosts, methods, paths, `request.*` and unknown `when` keys) fail
//! closed, as in ztunnel: an ALLOW rule using any of them never matches; in a DENY rule they are
//! ignored, so it denies more, never less. (ztunnel goes one step further for a DENY source or
//! operation made only of such fields: it drops the empty match, and the rule then denies
//! nothing; we deny instead, since what cannot be enforced fails closed.)

use std::net::IpAddr;

use crate::state::{
    Action, AuthorizationPolicy, Cidr, Condition, ConditionTest, Operation, Rule, Source,
    StringMatch, Values,
};

use super::connection::ConnectionAttributes;

/// The index of the first rule of `policy` that matches `conn`, if any.
pub fn matching_rule(policy: &AuthorizationPolicy, conn: &ConnectionAttributes) -> Option<usize> {
    policy
        .rules
        .iter()
        .position(|rule| rule_matches(policy.action, rule, conn))
}

/// How many of the policy's rules can never match because ALLOW cannot check their L7 parts.
pub fn l7_rules_skipped(policy: &AuthorizationPolicy) -> usize {
    match policy.action {
        Action::Allow => policy.rules.iter().filter(|rule| rule.uses_l7()).count(),
        Action::Deny | Action::Audit => 0,
    }
}

fn rule_matches(action: Action, rule: &Rule, conn: &ConnectionAttributes) -> bool {
    if action == Action::Allow && rule.uses_l7() {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|source| source_matches(source, conn)))
        && (rule.to.is_empty()
            || rule
                .to
                .iter()
                .any(|operation| operation_matches(operation, conn)))
        && rule
            .when
            .iter()
            .all(|condition| condition_matches(condition, conn))
}

/// L4 fields only: request principals and remote IPs are left to the caller (see the module docs).
fn source_matches(source: &Source, conn: &ConnectionAttributes) -> bool {
    let principal = conn.source_principal.as_deref();
    let namespace = conn.source_namespace.as_deref();
    let ip = Some(IpAddr::V4(conn.source_ip));
    // The trust domain is the principal's first segment (`td/ns/<ns>/sa/<sa>`).
    let trust_domain = principal.and_then(|p| p.split_once('/')).map(|(td, _)| td);
    check(
        &source.trust_domains,
        &source.not_trust_domains,
        trust_domain,
        pattern,
    ) && check(
        &source.principals,
        &source.not_principals,
        principal,
        pattern,
    ) && check(
        &source.namespaces,
        &source.not_namespaces,
        namespace,
        pattern,
    ) && check(
        &source.service_accounts,
        &source.not_service_accounts,
        conn.source_service_account(),
        |expected, (namespace, account)| expected.split_once('/') == Some((namespace, account)),
    ) && check(&source.ip_blocks, &source.not_ip_blocks, ip, Cidr::contains)
}

/// L4 fields only: hosts, methods and paths are left to the caller.
fn operation_matches(operation: &Operation, conn: &ConnectionAttributes) -> bool {
    check(
        &operation.ports,
        &operation.not_ports,
        Some(conn.destination_port),
        |port, actual| *port == actual,
    )
}

fn condition_matches(condition: &Condition, conn: &ConnectionAttributes) -> bool {
    let source_ip = Some(IpAddr::V4(conn.source_ip));
    let destination_ip = Some(IpAddr::V4(conn.destination_ip));
    match &condition.test {
        ConditionTest::SourceIp(values) => values_match(values, source_ip, Cidr::contains),
        ConditionTest::DestinationIp(values) => {
            values_match(values, destination_ip, Cidr::contains)
        }
        ConditionTest::SourceNamespace(values) => {
            values_match(values, conn.source_namespace.as_deref(), pattern)
        }
        ConditionTest::SourcePrincipal(values) => {
            values_match(values, conn.source_principal.as_deref(), pattern)
        }
        ConditionTest::DestinationPort(values) => {
            values_match(values, Some(conn.destination_port), |port, actual| {
                *port == actual
            })
        }
        // Only reached in DENY policies: ALLOW rules with L7 conditions never get here.
        ConditionTest::L7(_) => true,
    }
}

fn values_match<T, A: Copy>(
    values: &Values<T>,
    actual: Option<A>,
    matches: impl Fn(&T, A) -> bool,
) -> bool {
    check(&values.values, &values.not_values, actual, matches)
}

/// One positive/negative pair of fields: an empty list is absent; `actual` is `None` when the
/// connection lacks the attribute.
fn check<T, A: Copy>(
    values: &[T],
    not_values: &[T],
    actual: Option<A>,
    matches: impl Fn(&T, A) -> bool,
) -> bool {
    let any = |list: &[T]| actual.is_some_and(|actual| list.iter().any(|v| matches(v, actual)));
    (values.is_empty() || any(values)) && (not_values.is_empty() || !any(not_values))
}

fn pattern(pattern: &StringMatch, actual: &str) -> bool {
    pattern.matches(actual)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{policy::testing::authorization, source::local::testing::load_text};

    const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

    /// The policy `shop/p` with this action and rules (YAML flow list).
    fn policy(action: &str, rules: &str) -> AuthorizationPolicy {
        let text = format!(
            "{NAMESPACES}{}",
            authorization(
                "shop",
                "p",
                &format!("{{action: {action}, rules: {rules}}}")
            )
        );
        let state = load_text(&text).unwrap_or_else(|errors| panic!("{errors}"));
        AuthorizationPolicy::clone(&state.authorization_policies[0])
    }

    fn mtls(principal: &str, source: [u8; 4], port: u16) -> ConnectionAttributes {
        ConnectionAttributes::mtls(source.into(), principal, Ipv4Addr::new(10, 0, 1, 1), port)
    }

    fn plaintext(source: [u8; 4], port: u16) -> ConnectionAttributes {
        ConnectionAttributes::plaintext(source.into(), Ipv4Addr::new(10, 0, 1, 1), port)
    }

    const CART: &str = "cluster.local/ns/shop/sa/cart";
    const JOB: &str = "cluster.local/ns/batch/sa/default";
    const OTHER_TD: &str = "example.org/ns/shop/sa/cart";

    /// `(rules, connection, ALLOW matches, DENY matches)`, each rule list evaluated under both actions.
    fn cases() -> Vec<(&'static str, ConnectionAttributes, bool, bool)> {
        let src = [10, 0, 9, 9];
        vec![
            // An empty rule matches everything; no rules match nothing.
            ("[{}]", plaintext(src, 80), true, true),
            ("[]", mtls(CART, src, 80), false, false),
            // principals: exact, prefix, suffix, presence; plaintext has none.
            (
                "[{from: [{source: {principals: [cluster.local/ns/shop/sa/cart]}}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {principals: [cluster.local/ns/shop/sa/cart]}}]}]",
                mtls(JOB, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {principals: [\"cluster.local/ns/shop/*\"]}}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {principals: [\"cluster.local/ns/shop/*\"]}}]}]",
                mtls(JOB, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {principals: [\"*/sa/cart\"]}}]}]",
                mtls(OTHER_TD, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {principals: [\"*\"]}}]}]",
                mtls(JOB, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {principals: [\"*\"]}}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            // notPrincipals: a plaintext peer has no principal, so it is "not" any of them.
            (
                "[{from: [{source: {notPrincipals: [\"*\"]}}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {notPrincipals: [\"*\"]}}]}]",
                mtls(CART, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {notPrincipals: [\"cluster.local/ns/batch/*\"]}}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {notPrincipals: [\"cluster.local/ns/batch/*\"]}}]}]",
                mtls(JOB, src, 80),
                false,
                false,
            ),
            // namespaces / notNamespaces, from the principal.
            (
                "[{from: [{source: {namespaces: [shop]}}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {namespaces: [shop]}}]}]",
                mtls(JOB, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {namespaces: [\"sh*\"]}}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {namespaces: [shop]}}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {notNamespaces: [batch]}}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {notNamespaces: [batch]}}]}]",
                mtls(JOB, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {notNamespaces: [batch]}}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            // serviceAccounts, in any trust domain.
            (
                "[{from: [{source: {serviceAccounts: [shop/cart]}}]}]",
                mtls(OTHER_TD, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {serviceAccounts: [shop/cart]}}]}]",
                mtls(JOB, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {serviceAccounts: [shop/cart]}}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {notServiceAccounts: [shop/cart]}}]}]",
                mtls(CART, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {notServiceAccounts: [shop/cart]}}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            // ipBlocks / notIpBlocks / remoteIpBlocks / notRemoteIpBlocks: CIDR or one address.
            (
                "[{from: [{source: {ipBlocks: [10.0.0.0/16]}}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {ipBlocks: [10.1.0.0/16, 10.0.9.9]}}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {notIpBlocks: [10.0.9.0/24]}}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {notIpBlocks: [10.1.0.0/16]}}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            // Remote IPs are L7 (what a proxy in front forwarded), matching or not: ALLOW
            // never matches, DENY ignores them — alone, or beside an L4 field that decides.
            (
                "[{from: [{source: {remoteIpBlocks: [10.0.9.9]}}]}]",
                plaintext(src, 80),
                false,
                true,
            ),
            (
                "[{from: [{source: {remoteIpBlocks: [10.1.0.0/16]}}]}]",
                plaintext(src, 80),
                false,
                true,
            ),
            (
                "[{from: [{source: {notRemoteIpBlocks: [10.0.0.0/8]}}]}]",
                plaintext(src, 80),
                false,
                true,
            ),
            (
                "[{from: [{source: {namespaces: [shop], remoteIpBlocks: [10.1.0.0/16]}}]}]",
                mtls(CART, src, 80),
                false,
                true,
            ),
            (
                "[{from: [{source: {namespaces: [batch], remoteIpBlocks: [10.0.9.9]}}]}]",
                mtls(CART, src, 80),
                false,
                false,
            ),
            (
                "[{when: [{key: remote.ip, values: [10.0.9.9]}]}]",
                plaintext(src, 80),
                false,
                true,
            ),
            (
                "[{when: [{key: remote.ip, values: [10.1.0.0/16]}]}]",
                plaintext(src, 80),
                false,
                true,
            ),
            (
                "[{from: [{source: {ipBlocks: [\"fd00::/8\"]}}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            // trustDomains / notTrustDomains: the principal's trust domain; plaintext has none.
            (
                "[{from: [{source: {trustDomains: [cluster.local]}}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {trustDomains: [cluster.local]}}]}]",
                mtls(OTHER_TD, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {trustDomains: [\"*.org\"]}}]}]",
                mtls(OTHER_TD, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {trustDomains: [cluster.local]}}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {notTrustDomains: [example.org]}}]}]",
                mtls(OTHER_TD, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {notTrustDomains: [example.org]}}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            // Every field of a source must match; any source of a rule may.
            (
                "[{from: [{source: {namespaces: [shop], ipBlocks: [10.1.0.0/16]}}]}]",
                mtls(CART, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {namespaces: [batch]}}, {source: {ipBlocks: [10.0.0.0/8]}}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            // ports / notPorts; any operation of a rule may match.
            (
                "[{to: [{operation: {ports: [\"80\", \"443\"]}}]}]",
                plaintext(src, 443),
                true,
                true,
            ),
            (
                "[{to: [{operation: {ports: [\"80\"]}}]}]",
                plaintext(src, 8080),
                false,
                false,
            ),
            (
                "[{to: [{operation: {notPorts: [\"80\"]}}]}]",
                plaintext(src, 8080),
                true,
                true,
            ),
            (
                "[{to: [{operation: {notPorts: [\"80\"]}}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            (
                "[{to: [{operation: {ports: [\"81\"]}}, {operation: {ports: [80]}}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            // from and to must both match.
            (
                "[{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: [\"80\"]}}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            (
                "[{from: [{source: {namespaces: [shop]}}], to: [{operation: {ports: [\"80\"]}}]}]",
                mtls(CART, src, 81),
                false,
                false,
            ),
            // when: every condition, values and notValues.
            (
                "[{when: [{key: source.ip, values: [10.0.0.0/16]}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            (
                "[{when: [{key: source.ip, notValues: [10.0.0.0/16]}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            (
                "[{when: [{key: destination.ip, values: [10.0.1.1]}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            (
                "[{when: [{key: destination.ip, values: [10.0.1.2]}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            (
                "[{when: [{key: destination.port, values: [\"80\"]}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            (
                "[{when: [{key: destination.port, notValues: [\"80\"]}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            (
                "[{when: [{key: source.namespace, values: [shop]}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            (
                "[{when: [{key: source.namespace, values: [shop]}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            (
                "[{when: [{key: source.namespace, notValues: [shop]}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
            (
                "[{when: [{key: source.principal, values: [\"*/sa/cart\"]}]}]",
                mtls(CART, src, 80),
                true,
                true,
            ),
            (
                "[{when: [{key: source.principal, values: [\"*\"], notValues: [\"cluster.local/ns/shop/*\"]}]}]",
                mtls(CART, src, 80),
                false,
                false,
            ),
            (
                "[{when: [{key: source.ip, values: [10.0.0.0/8]}, {key: destination.port, values: [\"81\"]}]}]",
                plaintext(src, 80),
                false,
                false,
            ),
            // L7 attributes: an ALLOW rule never matches; a DENY rule ignores them.
            (
                "[{from: [{source: {requestPrincipals: [\"*\"]}}]}]",
                mtls(CART, src, 80),
                false,
                true,
            ),
            (
                "[{from: [{source: {notRequestPrincipals: [\"*\"], namespaces: [batch]}}]}]",
                mtls(CART, src, 80),
                false,
                false,
            ),
            (
                "[{from: [{source: {notRequestPrincipals: [\"*\"], namespaces: [batch]}}]}]",
                mtls(JOB, src, 80),
                false,
                true,
            ),
            (
                "[{to: [{operation: {methods: [GET]}}]}]",
                plaintext(src, 80),
                false,
                true,
            ),
            (
                "[{to: [{operation: {paths: [/admin], ports: [\"80\"]}}]}]",
                plaintext(src, 80),
                false,
                true,
            ),
            (
                "[{to: [{operation: {hosts: [a.example], ports: [\"80\"]}}]}]",
                plaintext(src, 81),
                false,
                false,
            ),
            (
                "[{to: [{operation: {notHosts: [a], notMethods: [b], notPaths: [c]}}]}]",
                plaintext(src, 80),
                false,
                true,
            ),
            (
                "[{when: [{key: \"request.headers[x-user]\", values: [admin]}]}]",
                plaintext(src, 80),
                false,
                true,
            ),
            (
                "[{when: [{key: connection.sni, values: [a.example]}]}]",
                plaintext(src, 80),
                false,
                true,
            ),
            // One L7 rule does not stop another rule of the same ALLOW policy.
            (
                "[{to: [{operation: {methods: [GET]}}]}, {to: [{operation: {ports: [\"80\"]}}]}]",
                plaintext(src, 80),
                true,
                true,
            ),
        ]
    }

    #[test]
    fn rules_under_allow_and_deny() {
        for (rules, conn, allow, deny) in cases() {
            for (action, expected) in [("ALLOW", allow), ("DENY", deny)] {
                let policy = policy(action, rules);
                assert_eq!(
                    matching_rule(&policy, &conn).is_some(),
                    expected,
                    "{action} {rules} for {conn:?}"
                );
            }
        }
    }

    #[test]
    fn reports_the_first_matching_rule() {
        let policy = policy(
            "DENY",
            "[{to: [{operation: {ports: [\"81\"]}}]}, {from: [{source: {namespaces: [shop]}}]}, {}]",
        );
        assert_eq!(
            matching_rule(&policy, &mtls(CART, [10, 0, 9, 9], 80)),
            Some(1)
        );
        assert_eq!(
            matching_rule(&policy, &plaintext([10, 0, 9, 9], 80)),
            Some(2)
        );
    }

    #[test]
    fn counts_allow_rules_skipped_for_l7() {
        let rules = "[{to: [{operation: {methods: [GET]}}]}, {}, {when: [{key: request.auth.principal, values: [x]}]}]";
        assert_eq!(l7_rules_skipped(&policy("ALLOW", rules)), 2);
        assert_eq!(l7_rules_skipped(&policy("DENY", rules)), 0);
    }
}
