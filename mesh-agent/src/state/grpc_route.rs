//! A Gateway API GRPCRoute attached to Services (GAMMA), read into the mesh's route model
//! ([`HttpRoute`], kind [`RouteKind::Grpc`]) so that the waypoint routes both kinds alike.
//!
//! A gRPC call is an HTTP/2 POST to `/<service>/<method>`, so a method match is a path match:
//! service and method → the Exact path; the service alone → the PathPrefix `/<service>` (whole
//! segments); the method alone → the expression `/[^/]+/<method>`; `RegularExpression` → an
//! expression over both parts. A rule or match without a method match takes the expression
//! `.*`, not the PathPrefix `/`: the waypoint prefers Exact, then prefixes, then expressions by
//! length, so a method-only match (longer) still wins over a catch-all, as the Gateway API's
//! GRPCRoute precedence (service characters, then method characters, then headers) wants.

use super::gateway_api::{GrpcMethodMatchSpec, GrpcRouteMatchSpec, GrpcRouteResource};
use super::http_route::{
    HttpRoute, HttpRouteError, PathMatch, Pattern, Problems, RouteKind, RouteMatch, RouteRule,
    ValueMatch, read_backend, read_filters, read_parents, read_value_matches,
};
use super::namespace::namespace_of;

/// The path expression of a match without a method match: any call.
const ANY_CALL: &str = ".*";

/// A service or method left out of a RegularExpression match: any one segment.
const ANY_SEGMENT: &str = "[^/]+";

impl HttpRoute {
    /// A GRPCRoute's model; `Ok(None)` when none of its parents is a Service (an ingress route).
    pub fn from_grpc_resource(route: &GrpcRouteResource) -> Result<Option<HttpRoute>, Problems> {
        let namespace = namespace_of(&route.metadata).to_string();
        let mut problems = Vec::new();
        let parents = read_parents(&route.spec.parent_refs, &namespace, &mut problems);
        if parents.is_empty() && problems.is_empty() {
            return Ok(None);
        }
        let mut rules = Vec::new();
        for (i, rule) in route.spec.rules.iter().enumerate() {
            let field = format!("spec.rules[{i}]");
            let mut matches: Vec<RouteMatch> = rule
                .matches
                .iter()
                .enumerate()
                .filter_map(|(j, m)| read_match(&format!("{field}.matches[{j}]"), m, &mut problems))
                .collect();
            if rule.matches.is_empty() {
                matches.push(any_call(Vec::new()));
            }
            let filters = read_filters(
                &format!("{field}.filters"),
                &rule.filters,
                &namespace,
                RouteKind::Grpc,
                &mut problems,
            );
            let backends = rule
                .backend_refs
                .iter()
                .enumerate()
                .filter_map(|(j, b)| {
                    let field = format!("{field}.backendRefs[{j}]");
                    read_backend(&field, b, &namespace, RouteKind::Grpc, &mut problems)
                })
                .collect();
            rules.push(RouteRule {
                name: rule.name.clone(),
                matches,
                filters,
                backends,
                request_timeout: None,
                backend_timeout: None,
                retry: None,
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Some(HttpRoute {
            name: route.metadata.name.clone().unwrap_or_default(),
            namespace,
            kind: RouteKind::Grpc,
            created: route.metadata.creation_timestamp.clone(),
            parents,
            rules,
        }))
    }
}

fn any_call(headers: Vec<(String, ValueMatch)>) -> RouteMatch {
    let path = match Pattern::new(ANY_CALL) {
        Ok(pattern) => PathMatch::Regex(pattern),
        // `.*` always compiles; a prefix of `/` is the same set of gRPC paths.
        Err(_) => PathMatch::Prefix("/".into()),
    };
    RouteMatch {
        path,
        headers,
        query_params: Vec::new(),
        method: None,
    }
}

fn read_match(
    field: &str,
    spec: &GrpcRouteMatchSpec,
    problems: &mut Problems,
) -> Option<RouteMatch> {
    let before = problems.len();
    let headers = read_value_matches(&format!("{field}.headers"), &spec.headers, true, problems);
    let path = spec
        .method
        .as_ref()
        .and_then(|method| method_path(&format!("{field}.method"), method, problems));
    if problems.len() != before {
        return None;
    }
    Some(match path {
        Some(path) => RouteMatch {
            path,
            headers,
            query_params: Vec::new(),
            method: None,
        },
        None => any_call(headers),
    })
}

/// The path match of a method match; `None` after a problem.
fn method_path(
    field: &str,
    spec: &GrpcMethodMatchSpec,
    problems: &mut Problems,
) -> Option<PathMatch> {
    let service = spec.service.as_deref().filter(|s| !s.is_empty());
    let method = spec.method.as_deref().filter(|m| !m.is_empty());
    if service.is_none() && method.is_none() {
        problems.push((field.to_string(), HttpRouteError::EmptyMethodMatch));
        return None;
    }
    match spec.kind.as_deref().unwrap_or("Exact") {
        "Exact" => {
            let mut valid = true;
            if let Some(service) = service.filter(|s| !is_service_name(s)) {
                problems.push((
                    format!("{field}.service"),
                    HttpRouteError::BadGrpcService(service.into()),
                ));
                valid = false;
            }
            if let Some(method) = method.filter(|m| !is_method_name(m)) {
                problems.push((
                    format!("{field}.method"),
                    HttpRouteError::BadGrpcMethod(method.into()),
                ));
                valid = false;
            }
            if !valid {
                return None;
            }
            match (service, method) {
                (Some(service), Some(method)) => {
                    Some(PathMatch::Exact(format!("/{service}/{method}")))
                }
                (Some(service), None) => Some(PathMatch::Prefix(format!("/{service}"))),
                (None, Some(method)) => {
                    let source = format!("/{ANY_SEGMENT}/{}", regex::escape(method));
                    compiled(field, &source, problems)
                }
                (None, None) => None,
            }
        }
        "RegularExpression" => {
            let service_ok = service.is_none_or(|s| is_regex(field, "service", s, problems));
            let method_ok = method.is_none_or(|m| is_regex(field, "method", m, problems));
            if !(service_ok && method_ok) {
                return None;
            }
            let source = format!(
                "/(?:{})/(?:{})",
                service.unwrap_or(ANY_SEGMENT),
                method.unwrap_or(ANY_SEGMENT)
            );
            compiled(field, &source, problems)
        }
        other => {
            problems.push((
                format!("{field}.type"),
                HttpRouteError::UnknownMatchType(other.into()),
            ));
            None
        }
    }
}

/// Whether one part of a RegularExpression match compiles; a problem naming it if not.
fn is_regex(field: &str, part: &str, value: &str, problems: &mut Problems) -> bool {
    match Pattern::new(value) {
        Ok(_) => true,
        Err(e) => {
            problems.push((
                format!("{field}.{part}"),
                HttpRouteError::BadRegex(e.to_string()),
            ));
            false
        }
    }
}

fn compiled(field: &str, source: &str, problems: &mut Problems) -> Option<PathMatch> {
    match Pattern::new(source) {
        Ok(pattern) => Some(PathMatch::Regex(pattern)),
        Err(e) => {
            problems.push((field.to_string(), HttpRouteError::BadRegex(e.to_string())));
            None
        }
    }
}

/// A fully qualified gRPC service name (`grpc.health.v1.Health`), as the GRPCRoute schema
/// allows it: dot-separated identifiers, with an optional leading dot.
fn is_service_name(name: &str) -> bool {
    let name = name.strip_prefix('.').unwrap_or(name);
    name.split('.').all(is_identifier)
}

/// A gRPC method name (`Echo`).
fn is_method_name(name: &str) -> bool {
    is_identifier(name)
}

fn is_identifier(part: &str) -> bool {
    let mut chars = part.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;
    use crate::waypoint::routing::{RequestView, Selection, attached, select};

    fn route(yaml: &str) -> Result<Option<HttpRoute>, Problems> {
        let resource: GrpcRouteResource = serde_yaml::from_str(yaml).expect("valid YAML");
        HttpRoute::from_grpc_resource(&resource)
    }

    fn paths(route: &HttpRoute) -> Vec<String> {
        route
            .rules
            .iter()
            .flat_map(|r| &r.matches)
            .map(|m| match &m.path {
                PathMatch::Exact(p) => format!("Exact {p}"),
                PathMatch::Prefix(p) => format!("Prefix {p}"),
                PathMatch::Regex(p) => format!("Regex {}", p.as_str()),
            })
            .collect()
    }

    fn fields(problems: Problems) -> Vec<String> {
        problems
            .into_iter()
            .map(|(f, e)| format!("{f}: {e}"))
            .collect()
    }

    #[test]
    fn method_matches_become_path_matches() {
        let route = route(
            "metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 7070}]
  rules:
  - matches:
    - method: {service: grpc.health.v1.Health, method: Check}
    - method: {service: grpc.health.v1.Health}
    - method: {method: Echo}
      headers: [{name: X-Test-Case, value: set}]
    - method: {type: RegularExpression, service: 'echo\\.v[0-9]+\\..*'}
    - method: {type: RegularExpression, method: 'Get.*'}
    - headers: [{type: RegularExpression, name: version, value: 'v[12]'}]
  - backendRefs: [{name: echo-v1, port: 7070}]",
        )
        .expect("valid")
        .expect("a mesh route");
        assert_eq!(route.kind, RouteKind::Grpc);
        assert_eq!(
            paths(&route),
            [
                "Exact /grpc.health.v1.Health/Check",
                "Prefix /grpc.health.v1.Health",
                "Regex /[^/]+/Echo",
                "Regex /(?:echo\\.v[0-9]+\\..*)/(?:[^/]+)",
                "Regex /(?:[^/]+)/(?:Get.*)",
                "Regex .*",
                "Regex .*",
            ]
        );
        let echo = &route.rules[0].matches[2];
        assert_eq!(
            echo.headers,
            [(
                "x-test-case".to_string(),
                crate::state::ValueMatch::Exact("set".into())
            )]
        );
        let regex = |i: usize| match &route.rules[0].matches[i].path {
            PathMatch::Regex(p) => p.clone(),
            other => panic!("{other:?}"),
        };
        assert!(regex(2).is_match("/pkg.Svc/Echo"));
        assert!(!regex(2).is_match("/pkg.Svc/EchoMore"));
        assert!(!regex(2).is_match("/Echo"));
        assert!(regex(3).is_match("/echo.v2.Echo/Call"));
        assert!(!regex(3).is_match("/echo.v2/Call"));
        assert!(regex(4).is_match("/a.B/GetThing"));
        assert!(!regex(4).is_match("/a.B/PutThing"));
        assert_eq!(route.rules[1].backends[0].weight, 1);
        assert_eq!(route.rules[1].retry, None);
    }

    #[test]
    fn a_method_with_special_characters_is_matched_literally() {
        // Only Exact names are checked; an escaped method can still not be a pattern.
        let problems = route(
            "metadata: {name: r}
spec:
  parentRefs: [{kind: Service, group: '', name: echo}]
  rules: [{matches: [{method: {method: 'Get.*'}}]}]",
        )
        .expect_err("not a method name");
        assert_eq!(
            fields(problems),
            [
                "spec.rules[0].matches[0].method.method: \"Get.*\" is not a gRPC method name (letters, digits and `_`)"
            ]
        );
    }

    #[test]
    fn gateway_only_routes_are_not_the_meshs() {
        assert_eq!(
            route("metadata: {name: r}\nspec: {parentRefs: [{name: ingress}], rules: [{}]}"),
            Ok(None)
        );
    }

    #[test]
    fn unsupported_or_bad_parts_make_the_route_invalid_naming_each_field() {
        let problems = route(
            "metadata: {name: r}
spec:
  parentRefs: [{kind: Service, group: '', name: echo, port: 70000}, {kind: Service, group: '', name: echo}]
  rules:
  - matches:
    - method: {type: Prefix, service: a.B}
    - method: {}
    - method: {service: 'a/B', method: 'M-1'}
    - method: {type: RegularExpression, service: '(unclosed'}
    - headers: [{type: Prefix, name: x, value: y}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: x}}
    - {type: RequestHeaderModifier}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: a, value: b}]}}
    backendRefs:
    - {name: echo, port: 7070, weight: -1}
    - {name: echo, port: 7070, filters: [{type: RequestRedirect, requestRedirect: {hostname: x}}]}",
        )
        .expect_err("invalid");
        // First lines only: the regex crate's message goes on to point at the error.
        let first_lines: Vec<String> = fields(problems)
            .iter()
            .map(|f| f.lines().next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            first_lines,
            [
                "spec.parentRefs[0].port: 70000 is out of range 1-65535",
                "spec.rules[0].matches[0].method.type: \"Prefix\" is not a supported match type",
                "spec.rules[0].matches[1].method: needs a service, a method or both",
                "spec.rules[0].matches[2].method.service: \"a/B\" is not a gRPC service name (letters, digits, `_` and `.`)",
                "spec.rules[0].matches[2].method.method: \"M-1\" is not a gRPC method name (letters, digits and `_`)",
                "spec.rules[0].matches[3].method.service: invalid regular expression: regex parse error:",
                "spec.rules[0].matches[4].headers[0].type: \"Prefix\" is not a supported match type",
                "spec.rules[0].filters[0].type: filter type \"URLRewrite\" is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestMirror)",
                "spec.rules[0].filters[1].requestHeaderModifier: is required for filter type RequestHeaderModifier",
                "spec.rules[0].backendRefs[0].weight: -1 is not a weight (0 to 1,000,000)",
                "spec.rules[0].backendRefs[1].filters[0].type: filter type \"RequestRedirect\" is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestMirror)",
            ]
        );
    }

    #[test]
    fn filters_and_weights_are_read() {
        let route = route(
            "metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: echo}]
  rules:
  - filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Set, value: a}], add: [{name: x-add, value: b}], remove: [X-Gone]}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 7070}}}
    backendRefs:
    - {name: echo-v1, port: 7070, weight: 70}
    - {name: echo-v2, port: 7070, weight: 30, filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {remove: [x-internal]}}]}",
        )
        .expect("valid")
        .expect("a mesh route");
        let rule = &route.rules[0];
        assert_eq!(
            rule.filters[0],
            crate::state::Filter::RequestHeaders(crate::state::HeaderModifier {
                set: vec![("x-set".into(), "a".into())],
                add: vec![("x-add".into(), "b".into())],
                remove: vec!["x-gone".into()],
            })
        );
        assert!(matches!(
            &rule.filters[1],
            crate::state::Filter::Mirror(m) if m.backend.name == "shadow" && m.per_million == 1_000_000
        ));
        let weights: Vec<(&str, u32)> = rule
            .backends
            .iter()
            .map(|b| (b.service.name.as_str(), b.weight))
            .collect();
        assert_eq!(weights, [("echo-v1", 70), ("echo-v2", 30)]);
        assert_eq!(rule.backends[1].filters.len(), 1);
    }

    /// Read from a state file beside an HTTPRoute of the same name, and routed with the
    /// GRPCRoute's precedence: service and method, then the service, then the method alone,
    /// then a match on headers only.
    #[test]
    fn read_from_a_file_and_routed_by_grpc_precedence() {
        let text = "---
apiVersion: v1
kind: Namespace
metadata: {name: mesh}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: mesh}
spec: {clusterIP: 10.96.0.1, ports: [{name: grpc, port: 7070}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: calls, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: other}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: calls, namespace: mesh}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 7070}]
  rules:
  - name: headers
    matches: [{headers: [{name: x-test-case, value: any}]}]
  - name: method
    matches: [{method: {method: Echo}}]
  - name: service
    matches: [{method: {service: pkg.Echo}}]
  - name: both
    matches: [{method: {service: pkg.Echo, method: Echo}}]
";
        let snapshot = crate::source::local::testing::load_text(text)
            .unwrap_or_else(|errors| panic!("test state must load: {errors}"));
        let kinds: Vec<(&str, RouteKind)> = snapshot
            .http_routes
            .iter()
            .map(|r| (r.name.as_str(), r.kind))
            .collect();
        assert_eq!(
            kinds,
            [("calls", RouteKind::Http), ("calls", RouteKind::Grpc)]
        );
        let service = snapshot.service("mesh", "echo").expect("echo");
        let rule_for = |path: &str, test_case: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = test_case {
                headers.insert("x-test-case", value.parse().expect("value"));
            }
            let request = RequestView {
                method: "POST",
                path,
                query: None,
                headers: &headers,
            };
            match select(attached(&snapshot, service, 7070), &request) {
                Selection::Matched(m) => m.rule.name.clone().unwrap_or_default(),
                other => format!("{other:?}"),
            }
        };
        assert_eq!(rule_for("/pkg.Echo/Echo", Some("any")), "both");
        assert_eq!(rule_for("/pkg.Echo/Other", Some("any")), "service");
        assert_eq!(rule_for("/other.Svc/Echo", Some("any")), "method");
        assert_eq!(rule_for("/other.Svc/Other", Some("any")), "headers");
        assert_eq!(rule_for("/other.Svc/Other", None), "NoMatch");
    }
}
