//! Which HTTPRoute rule a request to a Service takes, with Gateway API's precedence: among the
//! matches of every route attached to the Service's port, an Exact path beats a PathPrefix, a
//! longer prefix a shorter one, then a method match, more header matches, more query matches;
//! ties go to the oldest route, then by namespace/name, then to the first rule and match.
//!
//! As in Istio ambient, only producer routes count (in the Service's own namespace); the
//! waypoint routes on the Service the connection was addressed to, never on the Host header.

use std::borrow::Cow;
use std::cmp::Reverse;

use http::HeaderMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::state::{HttpRoute, PathMatch, RouteMatch, RouteRule, Service, Snapshot, ValueMatch};

/// What the request asks for, as the routes look at it.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// The outcome of routing one request.
#[derive(Debug, PartialEq)]
pub enum Selection<'s> {
    /// No route is attached to the Service port: the request goes to the Service itself.
    Unrouted,
    /// Routes are attached and none matches: 404.
    NoMatch,
    Matched(Matched<'s>),
}

#[derive(Debug, PartialEq)]
pub struct Matched<'s> {
    pub route: &'s HttpRoute,
    pub rule_index: usize,
    pub rule: &'s RouteRule,
    pub matched: &'s RouteMatch,
}

/// The routes of `service` that apply to its `port`.
pub fn attached<'s>(
    snapshot: &'s Snapshot,
    service: &'s Service,
    port: u16,
) -> impl Iterator<Item = &'s HttpRoute> + 's {
    snapshot
        .http_routes
        .iter()
        .filter(move |route| route.namespace == service.namespace)
        .filter(move |route| {
            route.parents.iter().any(|parent| {
                parent.namespace == service.namespace
                    && parent.name == service.name
                    && parent.port.is_none_or(|p| p == port)
            })
        })
        .map(|route| &**route)
}

/// The rule a request takes among `routes`.
pub fn select<'s>(
    routes: impl IntoIterator<Item = &'s HttpRoute>,
    request: &RequestView<'_>,
) -> Selection<'s> {
    let mut any = false;
    let mut best: Option<(Precedence<'s>, Matched<'s>)> = None;
    for route in routes {
        any = true;
        for (rule_index, rule) in route.rules.iter().enumerate() {
            for (match_index, matched) in rule.matches.iter().enumerate() {
                if !matches(matched, request) {
                    continue;
                }
                let precedence = Precedence::of(route, rule_index, match_index, matched);
                if best.as_ref().is_none_or(|(held, _)| precedence < *held) {
                    best = Some((
                        precedence,
                        Matched {
                            route,
                            rule_index,
                            rule,
                            matched,
                        },
                    ));
                }
            }
        }
    }
    match best {
        Some((_, matched)) => Selection::Matched(matched),
        None if any => Selection::NoMatch,
        None => Selection::Unrouted,
    }
}

/// Smaller is preferred.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence<'s> {
    /// 0 Exact, 1 PathPrefix, 2 RegularExpression (the Gateway API leaves regular expressions'
    /// place to the implementation; they come after every prefix here).
    path_kind: u8,
    path_len: Reverse<usize>,
    no_method: bool,
    headers: Reverse<usize>,
    query_params: Reverse<usize>,
    /// The oldest route first; a route without a timestamp (a file) after those with one.
    created: (bool, Option<&'s Time>),
    namespace: &'s str,
    name: &'s str,
    rule: usize,
    matched: usize,
}

impl<'s> Precedence<'s> {
    fn of(route: &'s HttpRoute, rule: usize, matched: usize, m: &'s RouteMatch) -> Self {
        let (path_kind, path_len) = match &m.path {
            PathMatch::Exact(path) => (0, path.len()),
            PathMatch::Prefix(prefix) => (1, prefix.len()),
            PathMatch::Regex(pattern) => (2, pattern.as_str().len()),
        };
        let created = route.created.as_ref();
        Precedence {
            path_kind,
            path_len: Reverse(path_len),
            no_method: m.method.is_none(),
            headers: Reverse(m.headers.len()),
            query_params: Reverse(m.query_params.len()),
            created: (created.is_none(), created),
            namespace: &route.namespace,
            name: &route.name,
            rule,
            matched,
        }
    }
}

/// Whether every part of `m` matches the request.
pub fn matches(m: &RouteMatch, request: &RequestView<'_>) -> bool {
    let path = match &m.path {
        PathMatch::Exact(path) => request.path == path,
        PathMatch::Prefix(prefix) => prefix_matches(prefix, request.path),
        PathMatch::Regex(pattern) => pattern.is_match(request.path),
    };
    path && m
        .method
        .as_deref()
        .is_none_or(|method| method == request.method)
        && m.headers.iter().all(|(name, value)| {
            header_value(request.headers, name).is_some_and(|v| value_matches(value, &v))
        })
        && m.query_params.iter().all(|(name, value)| {
            query_value(request.query, name).is_some_and(|v| value_matches(value, &v))
        })
}

/// A PathPrefix matches whole segments: `/v2` matches `/v2` and `/v2/x`, not `/v2example`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn value_matches(matcher: &ValueMatch, value: &str) -> bool {
    match matcher {
        ValueMatch::Exact(expected) => value == expected,
        ValueMatch::Regex(pattern) => pattern.is_match(value),
    }
}

/// A header's value; several of one name are joined with `,` as one list (RFC 9110 5.3).
fn header_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<Cow<'h, str>> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = format!("{first},{second}");
            for more in values {
                joined.push(',');
                joined.push_str(more);
            }
            Some(Cow::Owned(joined))
        }
    }
}

/// A query parameter's first value, percent-decoded.
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<Cow<'q, str>> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conformance suite's echo Service and routes, as YAML.
    fn snapshot(routes: &str) -> Snapshot {
        let text = format!(
            "---
apiVersion: v1
kind: Namespace
metadata: {{name: mesh}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: mesh}}
spec: {{clusterIP: 10.96.0.1, ports: [{{name: http, port: 80}}, {{name: http-alt, port: 8080}}]}}
{routes}"
        );
        crate::source::local::testing::load_text(&text)
            .unwrap_or_else(|errors| panic!("test state must load: {errors}"))
    }

    fn route_of(
        snapshot: &Snapshot,
        port: u16,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> String {
        route_with(snapshot, port, "GET", path_and_query, headers)
    }

    /// `route/rule` (by name or index) the request takes, or `unrouted`, `404`.
    fn route_with(
        snapshot: &Snapshot,
        port: u16,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> String {
        let service = snapshot.service("mesh", "echo").expect("echo");
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.parse().expect("value"),
            );
        }
        let request = RequestView {
            method,
            path,
            query,
            headers: &map,
        };
        match select(attached(snapshot, service, port), &request) {
            Selection::Unrouted => "unrouted".into(),
            Selection::NoMatch => "404".into(),
            Selection::Matched(m) => format!(
                "{}/{}",
                m.route.name,
                m.rule
                    .name
                    .clone()
                    .unwrap_or_else(|| m.rule_index.to_string())
            ),
        }
    }

    #[test]
    fn path_prefixes_match_whole_segments_and_headers_pick_between_equal_paths() {
        // MeshHTTPRouteMatching.
        let snapshot = snapshot(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: matching, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
    backendRefs: [{name: echo-v2, port: 8080}]
",
        );
        let cases = [
            ("/", &[][..], "matching/0"),
            ("/example", &[], "matching/0"),
            ("/", &[("Version", "one")], "matching/0"),
            ("/v2", &[], "matching/1"),
            ("/v2/example", &[], "matching/1"),
            ("/v2example", &[], "matching/0"),
            ("/", &[("Version", "two")], "matching/1"),
        ];
        for (path, headers, expected) in cases {
            assert_eq!(
                route_of(&snapshot, 80, path, headers),
                expected,
                "{path} {headers:?}"
            );
        }
    }

    #[test]
    fn query_params_exact_beats_prefix_and_no_match_is_404() {
        // MeshHTTPRouteQueryParamMatching.
        let snapshot = snapshot(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: query, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - matches: [{queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: dolphin}]}]
    backendRefs: [{name: echo-v2, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]}, {queryParams: [{name: ANIMAL, value: Whale}]}]
    backendRefs: [{name: echo-v3, port: 8080}]
  - matches: [{path: {type: Exact, value: /exact}, queryParams: [{name: type, type: RegularExpression, value: 'w.*'}]}]
    backendRefs: [{name: echo-v1, port: 8080}]
",
        );
        let cases = [
            ("/?animal=whale", "query/0"),
            ("/?animal=dolphin", "query/1"),
            ("/?animal=dolphin&color=blue", "query/2"),
            ("/?ANIMAL=Whale", "query/2"),
            ("/?animal=whale&other=x", "query/0"),
            ("/?animal=d%6flphin", "query/1"),
            ("/exact?type=whale", "query/3"),
            ("/?animal=shark", "404"),
            ("/", "404"),
        ];
        for (path, expected) in cases {
            assert_eq!(route_of(&snapshot, 80, path, &[]), expected, "{path}");
        }
    }

    #[test]
    fn precedence_exact_then_longest_prefix_then_method_then_headers() {
        let snapshot = snapshot(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - {name: prefix, matches: [{path: {value: /a}}]}
  - {name: longer, matches: [{path: {value: /a/b}}]}
  - {name: exact, matches: [{path: {type: Exact, value: /a/b/c}}]}
  - {name: post, matches: [{path: {value: /a}, method: POST}]}
  - {name: header, matches: [{path: {value: /a}, method: POST, headers: [{name: x, value: '1'}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo}]
  rules:
  - {name: same-as-prefix, matches: [{path: {value: /a}}]}
",
        );
        assert_eq!(route_of(&snapshot, 80, "/a/b/c", &[]), "b/exact");
        assert_eq!(route_of(&snapshot, 80, "/a/b/d", &[]), "b/longer");
        // Equal matches in two routes: by namespace/name (neither has a timestamp).
        assert_eq!(route_of(&snapshot, 80, "/a", &[]), "a/same-as-prefix");
        assert_eq!(route_with(&snapshot, 80, "POST", "/a", &[]), "b/post");
        assert_eq!(
            route_with(&snapshot, 80, "POST", "/a", &[("x", "1")]),
            "b/header"
        );
    }

    #[test]
    fn a_parent_port_limits_the_route_to_that_port() {
        // MeshPorts.
        let snapshot = snapshot(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: port-80, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules: [{matches: [{path: {value: /}}]}]
",
        );
        assert_eq!(route_of(&snapshot, 80, "/", &[]), "port-80/0");
        assert_eq!(route_of(&snapshot, 8080, "/", &[]), "unrouted");
    }

    #[test]
    fn repeated_headers_are_one_comma_list() {
        let mut headers = HeaderMap::new();
        headers.append("x", "a".parse().expect("value"));
        headers.append("x", "b".parse().expect("value"));
        assert_eq!(header_value(&headers, "x").as_deref(), Some("a,b"));
        assert_eq!(header_value(&headers, "y"), None);
    }
}
