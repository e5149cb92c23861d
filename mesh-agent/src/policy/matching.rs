//! Whether an `AuthorizationPolicy`'s rules match a connection (a node agent, ztunnel's L4
//! semantics) or an HTTP request (a waypoint, Envoy RBAC's semantics as Istio configures it).
//!
//! Within a rule every part present must match: `from` (any source), `to` (any operation) and
//! `when` (every condition); within a source or operation, every field present must match.
//! An attribute that is absent (a plaintext peer has no principal, so no namespace; a request
//! without a JWT has no request principal; a missing header) matches no positive field
//! (`principals`, `values`) and every negative one (`notPrincipals`, `notValues`), as in Istio:
//! `notPrincipals: ["*"]` catches plaintext, `notRequestPrincipals: ["*"]` a request without a
//! token.
//!
//! At a node agent, attributes only an L7 proxy sees (request principals, remote IPs —
//! `remoteIpBlocks` and the `remote.ip` condition —, hosts, methods, paths, `request.*` and
//! unknown `when` keys) fail closed, as in ztunnel: an ALLOW rule using any of them never
//! matches; in a DENY rule they are ignored, so it denies more, never less. (ztunnel goes one
//! step further for a DENY source or operation made only of such fields: it drops the empty
//! match, and the rule then denies nothing; we deny instead, since what cannot be enforced fails
//! closed.) At a waypoint every attribute is seen, but keys the mesh cannot evaluate
//! (`connection.sni`, `experimental.*`) fail closed the same way.

use std::net::IpAddr;

use http::HeaderMap;

use crate::state::{
    Action, AuthField, AuthorizationPolicy, Cidr, Condition, ConditionTest, Operation, PathPattern,
    Rule, Source, StringMatch, Values,
};

use super::connection::ConnectionAttributes;
use super::request::RequestAttributes;

/// What rules are matched against.
#[derive(Debug, Clone, Copy)]
pub enum Attributes<'a> {
    /// A connection at a node agent: L4 only.
    Connection(&'a ConnectionAttributes),
    /// A request at a waypoint.
    Request(&'a RequestAttributes<'a>),
}

impl<'a> Attributes<'a> {
    fn connection(&self) -> &'a ConnectionAttributes {
        match self {
            Attributes::Connection(conn) => conn,
            Attributes::Request(request) => request.connection,
        }
    }

    fn request(&self) -> Option<&'a RequestAttributes<'a>> {
        match self {
            Attributes::Connection(_) => None,
            Attributes::Request(request) => Some(request),
        }
    }
}

/// The index of the first rule of `policy` that matches `conn`, if any.
#[cfg(test)]
pub fn matching_rule(policy: &AuthorizationPolicy, conn: &ConnectionAttributes) -> Option<usize> {
    matching_rule_for(policy, Attributes::Connection(conn))
}

/// The index of the first rule of `policy` that matches `seen`, if any.
pub fn matching_rule_for(policy: &AuthorizationPolicy, seen: Attributes<'_>) -> Option<usize> {
    policy
        .rules
        .iter()
        .position(|rule| rule_matches(policy.action, rule, seen))
}

/// How many of the policy's rules can never match at a node agent because ALLOW cannot check
/// their L7 parts.
pub fn l7_rules_skipped(policy: &AuthorizationPolicy) -> usize {
    match policy.action {
        Action::Allow => policy.rules.iter().filter(|rule| rule.uses_l7()).count(),
        Action::Deny | Action::Audit => 0,
    }
}

fn rule_matches(action: Action, rule: &Rule, seen: Attributes<'_>) -> bool {
    if action == Action::Allow && seen.request().is_none() && rule.uses_l7() {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|source| source_matches(source, seen)))
        && (rule.to.is_empty()
            || rule
                .to
                .iter()
                .any(|operation| operation_matches(operation, seen)))
        && rule
            .when
            .iter()
            .all(|condition| condition_matches(action, condition, seen))
}

fn source_matches(source: &Source, seen: Attributes<'_>) -> bool {
    let conn = seen.connection();
    let principal = conn.source_principal.as_deref();
    let namespace = conn.source_namespace.as_deref();
    let ip = Some(IpAddr::V4(conn.source_ip));
    let l4 = check(
        &source.trust_domains,
        &source.not_trust_domains,
        trust_domain(principal),
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
        service_account,
    ) && check(&source.ip_blocks, &source.not_ip_blocks, ip, Cidr::contains);
    // At a node agent request principals and remote IPs are left to the caller (module docs).
    let Some(request) = seen.request() else {
        return l4;
    };
    l4 && check(
        &source.request_principals,
        &source.not_request_principals,
        request.auth.map(|auth| auth.principal.as_str()),
        pattern,
    ) && check(
        &source.remote_ip_blocks,
        &source.not_remote_ip_blocks,
        Some(request.remote_ip),
        Cidr::contains,
    )
}

fn operation_matches(operation: &Operation, seen: Attributes<'_>) -> bool {
    let ports = check(
        &operation.ports,
        &operation.not_ports,
        Some(seen.connection().destination_port),
        |port, actual| *port == actual,
    );
    // At a node agent hosts, methods and paths are left to the caller (module docs).
    let Some(request) = seen.request() else {
        return ports;
    };
    ports
        && check(
            &operation.methods,
            &operation.not_methods,
            Some(request.method),
            |method, actual| method == actual,
        )
        && check(
            &operation.paths,
            &operation.not_paths,
            Some(request.path),
            PathPattern::matches,
        )
        && (operation.hosts.is_empty() && operation.not_hosts.is_empty()
            || check(
                &operation.hosts,
                &operation.not_hosts,
                Some(request.host.to_ascii_lowercase().as_str()),
                host,
            ))
}

fn condition_matches(action: Action, condition: &Condition, seen: Attributes<'_>) -> bool {
    let conn = seen.connection();
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
        test => match seen.request() {
            // At a node agent only DENY rules get here (ALLOW rules with L7 conditions never
            // match): the condition is ignored.
            None => true,
            Some(request) => request_condition_matches(action, test, request),
        },
    }
}

fn request_condition_matches(
    action: Action,
    test: &ConditionTest,
    request: &RequestAttributes<'_>,
) -> bool {
    let conn = request.connection;
    let auth = request.auth;
    match test {
        ConditionTest::SourceServiceAccount(values) => {
            values_match(values, conn.source_service_account(), service_account)
        }
        ConditionTest::SourceTrustDomain(values) => values_match(
            values,
            trust_domain(conn.source_principal.as_deref()),
            pattern,
        ),
        ConditionTest::RemoteIp(values) => {
            values_match(values, Some(request.remote_ip), Cidr::contains)
        }
        ConditionTest::RequestHeader { name, values } => {
            let joined = header_value(request.headers, name);
            values_match(values, joined.as_deref(), pattern)
        }
        ConditionTest::RequestAuth { field, values } => match field {
            AuthField::Principal => {
                values_match(values, auth.map(|a| a.principal.as_str()), pattern)
            }
            AuthField::Presenter => {
                values_match(values, auth.and_then(|a| a.presenter.as_deref()), pattern)
            }
            AuthField::Audiences => {
                check_list(values, auth.map(|a| a.audiences.as_slice()).unwrap_or(&[]))
            }
        },
        ConditionTest::RequestClaim { path, values } => {
            let claimed = auth.map(|a| a.claim(path)).unwrap_or_default();
            check_list(values, &claimed)
        }
        // What cannot be evaluated fails closed: an ALLOW never matches, a DENY always does.
        ConditionTest::Unsupported(_) => action != Action::Allow,
        // Matched by `condition_matches` before.
        ConditionTest::SourceIp(_)
        | ConditionTest::DestinationIp(_)
        | ConditionTest::SourceNamespace(_)
        | ConditionTest::SourcePrincipal(_)
        | ConditionTest::DestinationPort(_) => false,
    }
}

/// A header's values joined with `,`, as Envoy matches a header that appears more than once.
fn header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
    for value in values {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
    }
    Some(joined)
}

/// The trust domain is the principal's first segment (`td/ns/<ns>/sa/<sa>`).
fn trust_domain(principal: Option<&str>) -> Option<&str> {
    principal.and_then(|p| p.split_once('/')).map(|(td, _)| td)
}

fn service_account<S: AsRef<str>>(expected: &S, (namespace, account): (&str, &str)) -> bool {
    expected.as_ref().split_once('/') == Some((namespace, account))
}

/// Hosts ignore case (the request's is lowercased by the caller, patterns when read) and, for a
/// pattern without a port, the request's port.
fn host(expected: &StringMatch, actual: &str) -> bool {
    if expected.matches(actual) {
        return true;
    }
    match actual.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            expected.matches(name)
        }
        _ => false,
    }
}

fn values_match<T, A: Copy>(
    values: &Values<T>,
    actual: Option<A>,
    matches: impl Fn(&T, A) -> bool,
) -> bool {
    check(&values.values, &values.not_values, actual, matches)
}

/// Values against an attribute with several values (audiences, a list claim): a positive value
/// must match one of them, no negative value may.
fn check_list(values: &Values<StringMatch>, actual: &[String]) -> bool {
    let any = |list: &[StringMatch]| {
        actual
            .iter()
            .any(|item| list.iter().any(|value| value.matches(item)))
    };
    (values.values.is_empty() || any(&values.values))
        && (values.not_values.is_empty() || !any(&values.not_values))
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
