//! What an HTTPRoute rule's filters do to a request: header changes, the redirect's `Location`,
//! a rewritten path, and which weighted backend gets it — as the Gateway API defines them.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::state::{Backend, HeaderModifier, PathMatch, PathModifier, Redirect};

/// Sets, adds and removes headers. `add` appends to a header already present as one comma
/// list (`existing,added`), as the conformance echo reports it; names are case-insensitive.
pub fn modify_headers(headers: &mut HeaderMap, modifier: &HeaderModifier) {
    for (name, value) in &modifier.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &modifier.add {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
            Some(existing) => format!("{existing},{value}"),
            None => value.clone(),
        };
        if let Ok(value) = HeaderValue::from_str(&joined) {
            headers.insert(name, value);
        }
    }
    for name in &modifier.remove {
        headers.remove(name.as_str());
    }
}

/// The path a path modifier makes of `path`, given the match that chose the rule. A prefix
/// replacement replaces what the PathPrefix matched, whole segments, without doubling a `/`.
pub fn rewrite_path(modifier: &PathModifier, matched: &PathMatch, path: &str) -> String {
    match modifier {
        PathModifier::Full(full) => full.clone(),
        PathModifier::Prefix(replacement) => {
            let prefix = match matched {
                PathMatch::Prefix(prefix) if prefix != "/" => prefix.as_str(),
                _ => "",
            };
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let rest = if replacement.ends_with('/') {
                rest.strip_prefix('/').unwrap_or(rest)
            } else {
                rest
            };
            let joined = format!("{replacement}{rest}");
            if joined.is_empty() {
                "/".into()
            } else if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
    }
}

/// What the request was, for a redirect to be built from.
pub struct Origin<'a> {
    pub scheme: &'a str,
    /// The request's host, without a port.
    pub host: &'a str,
    /// The port the request was addressed to (the Service port).
    pub port: u16,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// The `Location` of a RequestRedirect. Without a port, a changed scheme gets its well-known
/// port and an unchanged one keeps the request's; a well-known port is not written.
pub fn redirect_location(redirect: &Redirect, matched: &PathMatch, origin: &Origin<'_>) -> String {
    let scheme = redirect.scheme.as_deref().unwrap_or(origin.scheme);
    let host = redirect.hostname.as_deref().unwrap_or(origin.host);
    let port = match (redirect.port, &redirect.scheme) {
        (Some(port), _) => port,
        (None, Some(_)) => well_known_port(scheme).unwrap_or(origin.port),
        (None, None) => origin.port,
    };
    let path = match &redirect.path {
        Some(modifier) => rewrite_path(modifier, matched, origin.path),
        None => origin.path.to_string(),
    };
    let mut location = if well_known_port(scheme) == Some(port) {
        format!("{scheme}://{host}{path}")
    } else {
        format!("{scheme}://{host}:{port}{path}")
    };
    if let Some(query) = origin.query.filter(|q| !q.is_empty()) {
        location.push('?');
        location.push_str(query);
    }
    location
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// The backend a request goes to, by weight: `roll` is any number (a counter or a random one),
/// taken modulo the total. `None` when no backend has weight (the rule answers 500).
pub fn choose_backend(backends: &[Backend], roll: u64) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = roll % total;
    backends.iter().find(|backend| {
        let weight = u64::from(backend.weight);
        if point < weight {
            true
        } else {
            point -= weight;
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::BackendService;

    fn header_modifier(
        set: &[(&str, &str)],
        add: &[(&str, &str)],
        remove: &[&str],
    ) -> HeaderModifier {
        let pairs = |list: &[(&str, &str)]| {
            list.iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
                .collect()
        };
        HeaderModifier {
            set: pairs(set),
            add: pairs(add),
            remove: remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
        }
    }

    #[test]
    fn header_modifier_cases_of_the_conformance_suite() {
        // MeshHTTPRouteRequestHeaderModifier's /multiple and /case-insensitivity.
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-header-set-2", "set-val-2"),
            ("x-header-add-2", "add-val-2"),
            ("x-header-remove-2", "remove-val-2"),
            ("another-header", "another-header-val"),
        ] {
            headers.insert(name, value.parse().expect("value"));
        }
        modify_headers(
            &mut headers,
            &header_modifier(
                &[
                    ("X-Header-Set-1", "header-set-1"),
                    ("X-Header-Set-2", "header-set-2"),
                ],
                &[
                    ("X-Header-Add-1", "header-add-1"),
                    ("X-Header-Add-2", "header-add-2"),
                    ("X-Header-Add-3", "header-add-3"),
                ],
                &["X-Header-Remove-1", "X-Header-Remove-2"],
            ),
        );
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(get("x-header-set-1"), Some("header-set-1"));
        assert_eq!(get("x-header-set-2"), Some("header-set-2"));
        assert_eq!(get("x-header-add-2"), Some("add-val-2,header-add-2"));
        assert_eq!(get("x-header-add-3"), Some("header-add-3"));
        assert_eq!(get("another-header"), Some("another-header-val"));
        assert_eq!(get("x-header-remove-2"), None);
    }

    #[test]
    fn prefix_rewrites_replace_whole_segments() {
        // MeshHTTPRouteRewritePath's cases.
        let prefix = |p: &str| PathMatch::Prefix(p.into());
        let replace = |r: &str| PathModifier::Prefix(r.into());
        let cases = [
            ("/prefix/one", "/one", "/prefix/one/two", "/one/two"),
            ("/strip-prefix", "/", "/strip-prefix/three", "/three"),
            ("/strip-prefix", "/", "/strip-prefix", "/"),
            ("/prefix", "/one", "/prefix/", "/one/"),
            ("/", "/api", "/x", "/api/x"),
        ];
        for (matched, replacement, path, expected) in cases {
            assert_eq!(
                rewrite_path(&replace(replacement), &prefix(matched), path),
                expected,
                "{matched} -> {replacement} on {path}"
            );
        }
        assert_eq!(
            rewrite_path(
                &PathModifier::Full("/one".into()),
                &prefix("/full"),
                "/full/x"
            ),
            "/one"
        );
    }

    #[test]
    fn redirect_locations() {
        let origin = Origin {
            scheme: "http",
            host: "echo",
            port: 80,
            path: "/redirect",
            query: Some("a=1"),
        };
        let matched = PathMatch::Prefix("/redirect".into());
        let redirect = |scheme: Option<&str>, hostname: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(Into::into),
            hostname: hostname.map(Into::into),
            path: None,
            port,
            status: 302,
        };
        assert_eq!(
            redirect_location(
                &redirect(None, Some("example.org"), None),
                &matched,
                &origin
            ),
            "http://example.org/redirect?a=1"
        );
        assert_eq!(
            redirect_location(&redirect(None, None, Some(8083)), &matched, &origin),
            "http://echo:8083/redirect?a=1"
        );
        assert_eq!(
            redirect_location(&redirect(Some("https"), None, None), &matched, &origin),
            "https://echo/redirect?a=1"
        );
        let mut path = redirect(None, None, None);
        path.path = Some(PathModifier::Prefix("/replacement-prefix".into()));
        let deeper = Origin {
            path: "/redirect/x",
            query: None,
            ..origin
        };
        assert_eq!(
            redirect_location(&path, &matched, &deeper),
            "http://echo/replacement-prefix/x"
        );
        let on_8080 = Origin {
            port: 8080,
            query: None,
            ..deeper
        };
        assert_eq!(
            redirect_location(&redirect(None, None, None), &matched, &on_8080),
            "http://echo:8080/redirect/x"
        );
    }

    #[test]
    fn weighted_choice_follows_the_weights_and_zero_weights_choose_none() {
        let backend = |name: &str, weight: u32| Backend {
            service: BackendService {
                namespace: "mesh".into(),
                name: name.into(),
                port: Some(8080),
            },
            weight,
            filters: Vec::new(),
        };
        let backends = [backend("v1", 70), backend("v2", 30), backend("v3", 0)];
        let mut counts = [0u32; 3];
        for roll in 0..1000 {
            let chosen = choose_backend(&backends, roll).expect("one");
            let i = backends.iter().position(|b| b == chosen).expect("listed");
            counts[i] += 1;
        }
        assert_eq!(counts, [700, 300, 0]);
        assert_eq!(choose_backend(&[backend("v1", 0)], 5), None);
        assert_eq!(choose_backend(&[], 5), None);
    }
}
