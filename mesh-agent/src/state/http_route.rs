//! The mesh's view of a Gateway API HTTPRoute attached to Services (GAMMA): its rules, matches,
//! filters and weighted backends, checked once when the route is read.
//!
//! As in Istio, a filter the mesh does not implement makes the whole route invalid rather than
//! being skipped; routes whose parents are all Gateways (ingress) are not the mesh's.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Serialize, Serializer};

use super::gateway_api::{
    BackendRefSpec, HeaderModifierSpec, HttpRouteFilterSpec, HttpRouteMatchSpec, HttpRouteResource,
    HttpRouteRuleSpec, NameValueMatchSpec, ParentRefSpec, PathModifierSpec,
};
use super::namespace::namespace_of;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    /// The kind it was written as: a GRPCRoute is read into the same model
    /// ([`super::grpc_route`]).
    pub kind: RouteKind,
    /// Ties between equally specific matches go to the oldest route.
    #[serde(skip)]
    pub created: Option<Time>,
    /// The Services it attaches to.
    pub parents: Vec<ServiceParent>,
    pub rules: Vec<RouteRule>,
}

/// The Gateway API kind a route was written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum RouteKind {
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "GRPCRoute")]
    Grpc,
}

impl RouteKind {
    /// The filter types a rule or backendRef of this kind may have.
    fn filters(self) -> &'static str {
        match self {
            RouteKind::Http => {
                "RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror"
            }
            RouteKind::Grpc => "RequestHeaderModifier, ResponseHeaderModifier, RequestMirror",
        }
    }
}

/// A parentRef to a Service: the route applies to traffic for that Service (on one port, or
/// all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceParent {
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteRule {
    pub name: Option<String>,
    /// At least one: a rule without matches matches every request (`PathPrefix /`).
    pub matches: Vec<RouteMatch>,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Header names in lower case.
    pub headers: Vec<(String, ValueMatch)>,
    pub query_params: Vec<(String, ValueMatch)>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PathMatch {
    Exact(String),
    /// Without its trailing `/` (but `/` itself stays): matches whole segments.
    Prefix(String),
    Regex(Pattern),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ValueMatch {
    Exact(String),
    Regex(Pattern),
}

/// A regular expression, anchored to the whole value as Gateway API's RE2 matches are.
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    pub(super) fn new(source: &str) -> Result<Pattern, regex::Error> {
        regex::Regex::new(&format!("^(?:{source})$")).map(Pattern)
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.0.is_match(value)
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        let anchored = self.0.as_str();
        anchored
            .strip_prefix("^(?:")
            .and_then(|s| s.strip_suffix(")$"))
            .unwrap_or(anchored)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Pattern {}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeaderModifier {
    /// Names in lower case, values as written.
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301, 302 (the default), 303, 307 or 308.
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PathModifier {
    Full(String),
    /// Replaces the part a `PathPrefix` match matched.
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mirror {
    pub backend: BackendService,
    /// Of a million requests, how many are mirrored.
    pub per_million: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendService {
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub service: BackendService,
    pub weight: u32,
    pub filters: Vec<Filter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retry {
    /// Retried status codes, beyond what is always retried (connect failure, refused stream).
    pub codes: Vec<u16>,
    /// Retries after the first try (Istio's default: 2).
    pub attempts: u32,
    pub backoff: Option<Duration>,
}

/// Istio's default number of retries when `retry` sets none.
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

/// An HTTPRoute that cannot be used, with the field it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpRouteError {
    #[error("filter type {0:?} is not supported ({1})")]
    UnsupportedFilter(String, &'static str),
    #[error("is required for filter type {0}")]
    MissingFilterField(&'static str),
    #[error("{0:?} is not a supported match type")]
    UnknownMatchType(String),
    #[error("invalid regular expression: {0}")]
    BadRegex(String),
    #[error("{0:?} must start with /")]
    RelativePath(String),
    #[error("{0} is out of range 1-65535")]
    BadPort(i64),
    #[error("{0} is not a redirect status (301, 302, 303, 307, 308)")]
    BadRedirectStatus(i64),
    #[error("{0:?} is not a path modifier type (ReplaceFullPath, ReplacePrefixMatch)")]
    UnknownPathModifier(String),
    #[error("ReplacePrefixMatch needs a PathPrefix match")]
    PrefixRewriteWithoutPrefix,
    #[error("{0} is not a weight (0 to 1,000,000)")]
    BadWeight(i64),
    #[error("{0:?} is not a duration (e.g. 10s, 500ms, 1h30m)")]
    BadDuration(String),
    #[error("{0} is not a status code")]
    BadStatusCode(i64),
    #[error("{0} is not a number of attempts")]
    BadAttempts(i64),
    #[error("backendRefs to kind {0} are not supported (Service only)")]
    UnsupportedBackend(String),
    #[error("a Service backend needs a port")]
    BackendWithoutPort,
    #[error("{0} is not a percentage")]
    BadPercent(i64),
    #[error("needs a service, a method or both")]
    EmptyMethodMatch,
    #[error("{0:?} is not a gRPC service name (letters, digits, `_` and `.`)")]
    BadGrpcService(String),
    #[error("{0:?} is not a gRPC method name (letters, digits and `_`)")]
    BadGrpcMethod(String),
}

/// Problems with the field each names.
pub(super) type Problems = Vec<(String, HttpRouteError)>;

impl HttpRoute {
    /// The route's model; `Ok(None)` when none of its parents is a Service (an ingress route).
    pub fn from_resource(route: &HttpRouteResource) -> Result<Option<HttpRoute>, Problems> {
        let namespace = namespace_of(&route.metadata).to_string();
        let mut problems = Vec::new();
        let parents = read_parents(&route.spec.parent_refs, &namespace, &mut problems);
        if parents.is_empty() && problems.is_empty() {
            return Ok(None);
        }
        let rules = route
            .spec
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| {
                let field = format!("spec.rules[{i}]");
                let before = problems.len();
                let rule = read_rule(&field, rule, &namespace, &mut problems);
                (problems.len() == before).then_some(rule)
            })
            .collect();
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Some(HttpRoute {
            name: route.metadata.name.clone().unwrap_or_default(),
            namespace,
            kind: RouteKind::Http,
            created: route.metadata.creation_timestamp.clone(),
            parents,
            rules,
        }))
    }
}

/// The parentRefs that are Services; the others (Gateways) are not the mesh's.
pub(super) fn read_parents(
    refs: &[ParentRefSpec],
    namespace: &str,
    problems: &mut Problems,
) -> Vec<ServiceParent> {
    refs.iter()
        .enumerate()
        .filter(|(_, p)| is_service(p.group.as_deref(), p.kind.as_deref(), false))
        .filter_map(|(i, p)| {
            let port = match p.port {
                None => None,
                Some(port) => Some(
                    port_of(port)
                        .map_err(|e| {
                            problems.push((format!("spec.parentRefs[{i}].port"), e));
                        })
                        .ok()?,
                ),
            };
            Some(ServiceParent {
                namespace: p.namespace.clone().unwrap_or_else(|| namespace.to_string()),
                name: p.name.clone(),
                port,
            })
        })
        .collect()
}

/// Whether a reference is to a core Service: `group` empty or `core`, `kind` Service. Parents
/// default to Gateways, backends to Services.
fn is_service(group: Option<&str>, kind: Option<&str>, backend: bool) -> bool {
    let core = match group {
        None => backend,
        Some(group) => group.is_empty() || group == "core",
    };
    core && kind.map_or(backend, |kind| kind == "Service")
}

fn read_rule(
    field: &str,
    rule: &HttpRouteRuleSpec,
    namespace: &str,
    problems: &mut Problems,
) -> RouteRule {
    let mut matches: Vec<RouteMatch> = rule
        .matches
        .iter()
        .enumerate()
        .filter_map(|(i, m)| read_match(&format!("{field}.matches[{i}]"), m, problems))
        .collect();
    if rule.matches.is_empty() {
        matches.push(RouteMatch {
            path: PathMatch::Prefix("/".into()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        });
    }
    let filters = read_filters(
        &format!("{field}.filters"),
        &rule.filters,
        namespace,
        RouteKind::Http,
        problems,
    );
    let prefix_only = matches
        .iter()
        .all(|m| matches!(m.path, PathMatch::Prefix(_)));
    let rewrites_prefix = filters.iter().any(|f| {
        matches!(
            f,
            Filter::Redirect(Redirect {
                path: Some(PathModifier::Prefix(_)),
                ..
            }) | Filter::Rewrite(Rewrite {
                path: Some(PathModifier::Prefix(_)),
                ..
            })
        )
    });
    if rewrites_prefix && !prefix_only {
        problems.push((
            format!("{field}.filters"),
            HttpRouteError::PrefixRewriteWithoutPrefix,
        ));
    }
    let backends = rule
        .backend_refs
        .iter()
        .enumerate()
        .filter_map(|(i, b)| {
            read_backend(
                &format!("{field}.backendRefs[{i}]"),
                b,
                namespace,
                RouteKind::Http,
                problems,
            )
        })
        .collect();
    let duration = |name: &str, value: Option<&String>, problems: &mut Problems| {
        let value = value?;
        parse_duration(value)
            .map_err(|e| problems.push((format!("{field}.timeouts.{name}"), e)))
            .ok()
    };
    let timeouts = rule.timeouts.as_ref();
    let request_timeout = duration(
        "request",
        timeouts.and_then(|t| t.request.as_ref()),
        problems,
    );
    let backend_timeout = duration(
        "backendRequest",
        timeouts.and_then(|t| t.backend_request.as_ref()),
        problems,
    );
    let retry = rule.retry.as_ref().map(|retry| {
        let codes = retry
            .codes
            .iter()
            .filter_map(|&code| match u16::try_from(code) {
                Ok(code) if (100..600).contains(&code) => Some(code),
                _ => {
                    problems.push((
                        format!("{field}.retry.codes"),
                        HttpRouteError::BadStatusCode(code),
                    ));
                    None
                }
            })
            .collect();
        let attempts = match retry.attempts {
            None => DEFAULT_RETRY_ATTEMPTS,
            Some(n) => u32::try_from(n).unwrap_or_else(|_| {
                problems.push((
                    format!("{field}.retry.attempts"),
                    HttpRouteError::BadAttempts(n),
                ));
                0
            }),
        };
        let backoff = retry.backoff.as_ref().and_then(|b| {
            parse_duration(b)
                .map_err(|e| problems.push((format!("{field}.retry.backoff"), e)))
                .ok()
        });
        Retry {
            codes,
            attempts,
            backoff,
        }
    });
    RouteRule {
        name: rule.name.clone(),
        matches,
        filters,
        backends,
        request_timeout,
        backend_timeout,
        retry,
    }
}

fn read_match(
    field: &str,
    spec: &HttpRouteMatchSpec,
    problems: &mut Problems,
) -> Option<RouteMatch> {
    let before = problems.len();
    let path = match &spec.path {
        None => PathMatch::Prefix("/".into()),
        Some(path) => {
            let value = path.value.clone().unwrap_or_else(|| "/".into());
            match path.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" | "PathPrefix" if !value.starts_with('/') => {
                    problems.push((
                        format!("{field}.path.value"),
                        HttpRouteError::RelativePath(value),
                    ));
                    PathMatch::Exact(String::new())
                }
                "Exact" => PathMatch::Exact(value),
                "PathPrefix" => {
                    let trimmed = value.trim_end_matches('/');
                    PathMatch::Prefix(if trimmed.is_empty() {
                        "/".into()
                    } else {
                        trimmed.into()
                    })
                }
                "RegularExpression" => match Pattern::new(&value) {
                    Ok(pattern) => PathMatch::Regex(pattern),
                    Err(e) => {
                        problems.push((
                            format!("{field}.path.value"),
                            HttpRouteError::BadRegex(e.to_string()),
                        ));
                        PathMatch::Exact(String::new())
                    }
                },
                other => {
                    problems.push((
                        format!("{field}.path.type"),
                        HttpRouteError::UnknownMatchType(other.into()),
                    ));
                    PathMatch::Exact(String::new())
                }
            }
        }
    };
    let headers = read_value_matches(&format!("{field}.headers"), &spec.headers, true, problems);
    let query_params = read_value_matches(
        &format!("{field}.queryParams"),
        &spec.query_params,
        false,
        problems,
    );
    (problems.len() == before).then(|| RouteMatch {
        path,
        headers,
        query_params,
        method: spec.method.clone(),
    })
}

/// Header (names in lower case) or query parameter matches: Exact or RegularExpression.
pub(super) fn read_value_matches(
    field: &str,
    list: &[NameValueMatchSpec],
    lower: bool,
    problems: &mut Problems,
) -> Vec<(String, ValueMatch)> {
    list.iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let name = if lower {
                m.name.to_ascii_lowercase()
            } else {
                m.name.clone()
            };
            let matcher = match m.kind.as_deref().unwrap_or("Exact") {
                "Exact" => ValueMatch::Exact(m.value.clone()),
                "RegularExpression" => match Pattern::new(&m.value) {
                    Ok(pattern) => ValueMatch::Regex(pattern),
                    Err(e) => {
                        problems.push((
                            format!("{field}[{i}].value"),
                            HttpRouteError::BadRegex(e.to_string()),
                        ));
                        return None;
                    }
                },
                other => {
                    problems.push((
                        format!("{field}[{i}].type"),
                        HttpRouteError::UnknownMatchType(other.into()),
                    ));
                    return None;
                }
            };
            Some((name, matcher))
        })
        .collect()
}

/// The filters of a rule or backendRef; a type `kind` does not have makes the route invalid.
pub(super) fn read_filters(
    field: &str,
    filters: &[HttpRouteFilterSpec],
    namespace: &str,
    kind: RouteKind,
    problems: &mut Problems,
) -> Vec<Filter> {
    filters
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            let field = format!("{field}[{i}]");
            if !kind.filters().split(", ").any(|t| t == f.kind) {
                problems.push((
                    format!("{field}.type"),
                    HttpRouteError::UnsupportedFilter(f.kind.clone(), kind.filters()),
                ));
                return None;
            }
            let missing = |problems: &mut Problems, name: &'static str, key: &str| {
                problems.push((
                    format!("{field}.{key}"),
                    HttpRouteError::MissingFilterField(name),
                ));
                None
            };
            match f.kind.as_str() {
                "RequestHeaderModifier" => match &f.request_header_modifier {
                    Some(m) => Some(Filter::RequestHeaders(header_modifier(m))),
                    None => missing(problems, "RequestHeaderModifier", "requestHeaderModifier"),
                },
                "ResponseHeaderModifier" => match &f.response_header_modifier {
                    Some(m) => Some(Filter::ResponseHeaders(header_modifier(m))),
                    None => missing(problems, "ResponseHeaderModifier", "responseHeaderModifier"),
                },
                "RequestRedirect" => {
                    let Some(r) = &f.request_redirect else {
                        return missing(problems, "RequestRedirect", "requestRedirect");
                    };
                    let field = format!("{field}.requestRedirect");
                    let port = r.port.and_then(|p| {
                        port_of(p)
                            .map_err(|e| problems.push((format!("{field}.port"), e)))
                            .ok()
                    });
                    let status = match r.status_code {
                        None => 302,
                        Some(code @ (301 | 302 | 303 | 307 | 308)) => code as u16,
                        Some(code) => {
                            problems.push((
                                format!("{field}.statusCode"),
                                HttpRouteError::BadRedirectStatus(code),
                            ));
                            302
                        }
                    };
                    let path = r
                        .path
                        .as_ref()
                        .and_then(|p| path_modifier(&format!("{field}.path"), p, problems));
                    Some(Filter::Redirect(Redirect {
                        scheme: r.scheme.clone(),
                        hostname: r.hostname.clone(),
                        path,
                        port,
                        status,
                    }))
                }
                "URLRewrite" => {
                    let Some(r) = &f.url_rewrite else {
                        return missing(problems, "URLRewrite", "urlRewrite");
                    };
                    let path = r.path.as_ref().and_then(|p| {
                        path_modifier(&format!("{field}.urlRewrite.path"), p, problems)
                    });
                    Some(Filter::Rewrite(Rewrite {
                        hostname: r.hostname.clone(),
                        path,
                    }))
                }
                "RequestMirror" => {
                    let Some(m) = &f.request_mirror else {
                        return missing(problems, "RequestMirror", "requestMirror");
                    };
                    let field = format!("{field}.requestMirror");
                    let backend = backend_service(
                        &format!("{field}.backendRef"),
                        &m.backend_ref,
                        namespace,
                        problems,
                    )?;
                    let per_million = match (&m.percent, &m.fraction) {
                        (Some(p), _) if !(0..=100).contains(p) => {
                            problems
                                .push((format!("{field}.percent"), HttpRouteError::BadPercent(*p)));
                            return None;
                        }
                        (Some(p), _) => (*p as u32) * 10_000,
                        (None, Some(f)) => {
                            let denominator = f.denominator.unwrap_or(100).max(1);
                            let share =
                                f.numerator.clamp(0, denominator) as f64 / denominator as f64;
                            (share * 1_000_000.0).round() as u32
                        }
                        (None, None) => 1_000_000,
                    };
                    Some(Filter::Mirror(Mirror {
                        backend,
                        per_million,
                    }))
                }
                other => {
                    problems.push((
                        format!("{field}.type"),
                        HttpRouteError::UnsupportedFilter(other.into(), kind.filters()),
                    ));
                    None
                }
            }
        })
        .collect()
}

fn header_modifier(spec: &HeaderModifierSpec) -> HeaderModifier {
    let pairs = |list: &[super::gateway_api::HeaderValueSpec]| {
        list.iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect()
    };
    HeaderModifier {
        set: pairs(&spec.set),
        add: pairs(&spec.add),
        remove: spec.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
    }
}

fn path_modifier(
    field: &str,
    spec: &PathModifierSpec,
    problems: &mut Problems,
) -> Option<PathModifier> {
    match spec.kind.as_str() {
        "ReplaceFullPath" => match &spec.replace_full_path {
            Some(path) => Some(PathModifier::Full(path.clone())),
            None => {
                problems.push((
                    format!("{field}.replaceFullPath"),
                    HttpRouteError::MissingFilterField("ReplaceFullPath"),
                ));
                None
            }
        },
        "ReplacePrefixMatch" => match &spec.replace_prefix_match {
            Some(path) => Some(PathModifier::Prefix(path.clone())),
            None => {
                problems.push((
                    format!("{field}.replacePrefixMatch"),
                    HttpRouteError::MissingFilterField("ReplacePrefixMatch"),
                ));
                None
            }
        },
        other => {
            problems.push((
                format!("{field}.type"),
                HttpRouteError::UnknownPathModifier(other.into()),
            ));
            None
        }
    }
}

fn backend_service(
    field: &str,
    spec: &BackendRefSpec,
    namespace: &str,
    problems: &mut Problems,
) -> Option<BackendService> {
    if !is_service(spec.group.as_deref(), spec.kind.as_deref(), true) {
        let kind = spec.kind.clone().unwrap_or_else(|| "Service".into());
        problems.push((
            format!("{field}.kind"),
            HttpRouteError::UnsupportedBackend(kind),
        ));
        return None;
    }
    let port = match spec.port {
        None => {
            problems.push((format!("{field}.port"), HttpRouteError::BackendWithoutPort));
            return None;
        }
        Some(port) => port_of(port)
            .map_err(|e| problems.push((format!("{field}.port"), e)))
            .ok()?,
    };
    Some(BackendService {
        namespace: spec
            .namespace
            .clone()
            .unwrap_or_else(|| namespace.to_string()),
        name: spec.name.clone(),
        port: Some(port),
    })
}

pub(super) fn read_backend(
    field: &str,
    spec: &BackendRefSpec,
    namespace: &str,
    kind: RouteKind,
    problems: &mut Problems,
) -> Option<Backend> {
    let service = backend_service(field, spec, namespace, problems)?;
    let weight = match spec.weight {
        None => 1,
        Some(w @ 0..=1_000_000) => w as u32,
        Some(w) => {
            problems.push((format!("{field}.weight"), HttpRouteError::BadWeight(w)));
            return None;
        }
    };
    let filters = read_filters(
        &format!("{field}.filters"),
        &spec.filters,
        namespace,
        kind,
        problems,
    );
    Some(Backend {
        service,
        weight,
        filters,
    })
}

fn port_of(port: i64) -> Result<u16, HttpRouteError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(HttpRouteError::BadPort(port))
}

/// A Gateway API duration (GEP-2257): one to four `<number><unit>` parts, units `h`, `m`, `s`,
/// `ms`, each number at most five digits.
pub fn parse_duration(text: &str) -> Result<Duration, HttpRouteError> {
    let bad = || HttpRouteError::BadDuration(text.to_string());
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * number as u32;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(yaml: &str) -> Result<Option<HttpRoute>, Problems> {
        let resource: HttpRouteResource = serde_yaml::from_str(yaml).expect("valid YAML");
        HttpRoute::from_resource(&resource)
    }

    fn fields(problems: Problems) -> Vec<String> {
        problems
            .into_iter()
            .map(|(f, e)| format!("{f}: {e}"))
            .collect()
    }

    #[test]
    fn reads_a_mesh_route_with_defaults() {
        let route = route(
            "metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}, {name: ingress}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2/}, headers: [{name: Version, value: two}]}]
    backendRefs: [{name: echo-v2, port: 8080, weight: 30}]
  - backendRefs: [{name: echo-v1, port: 8080}]
    timeouts: {request: 10s, backendRequest: 1m500ms}
    retry: {codes: [503], backoff: 100ms}",
        )
        .expect("valid")
        .expect("a mesh route");
        assert_eq!(
            route.parents,
            [ServiceParent {
                namespace: "shop".into(),
                name: "echo".into(),
                port: Some(80)
            }]
        );
        let first = &route.rules[0];
        assert_eq!(first.matches[0].path, PathMatch::Prefix("/v2".into()));
        assert_eq!(
            first.matches[0].headers,
            [("version".to_string(), ValueMatch::Exact("two".into()))]
        );
        assert_eq!(first.backends[0].weight, 30);
        let second = &route.rules[1];
        assert_eq!(second.matches[0].path, PathMatch::Prefix("/".into()));
        assert_eq!(second.backends[0].weight, 1);
        assert_eq!(second.request_timeout, Some(Duration::from_secs(10)));
        assert_eq!(second.backend_timeout, Some(Duration::from_millis(60_500)));
        assert_eq!(
            second.retry,
            Some(Retry {
                codes: vec![503],
                attempts: 2,
                backoff: Some(Duration::from_millis(100))
            })
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
  parentRefs: [{kind: Service, group: '', name: echo}]
  rules:
  - matches: [{path: {type: RegularExpression, value: '(unclosed'}}, {path: {type: Exact, value: relative}}]
    filters: [{type: CORS}, {type: RequestRedirect, requestRedirect: {statusCode: 305}}]
    backendRefs: [{name: echo, port: 80, weight: -1}, {name: echo}, {kind: ServiceImport, name: x, port: 1}]
    timeouts: {request: 10sec}",
        )
        .expect_err("invalid");
        let fields = fields(problems);
        let names: Vec<&str> = fields
            .iter()
            .map(|f| f.split(": ").next().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            [
                "spec.rules[0].matches[0].path.value",
                "spec.rules[0].matches[1].path.value",
                "spec.rules[0].filters[0].type",
                "spec.rules[0].filters[1].requestRedirect.statusCode",
                "spec.rules[0].backendRefs[0].weight",
                "spec.rules[0].backendRefs[1].port",
                "spec.rules[0].backendRefs[2].kind",
                "spec.rules[0].timeouts.request",
            ],
            "{fields:#?}"
        );
        assert!(fields[2].ends_with("filter type \"CORS\" is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror)"));
    }

    #[test]
    fn filters_are_read() {
        let route = route(
            "metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: '', name: echo}]
  rules:
  - matches: [{path: {value: /prefix}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Set, value: a}], add: [{name: X-Add, value: b}], remove: [X-Gone]}}
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 8080}, percent: 25}}
    backendRefs: [{name: echo, port: 80}]",
        )
        .expect("valid")
        .expect("mesh route");
        let filters = &route.rules[0].filters;
        assert_eq!(
            filters[0],
            Filter::RequestHeaders(HeaderModifier {
                set: vec![("x-set".into(), "a".into())],
                add: vec![("x-add".into(), "b".into())],
                remove: vec!["x-gone".into()],
            })
        );
        assert_eq!(
            filters[1],
            Filter::Rewrite(Rewrite {
                hostname: None,
                path: Some(PathModifier::Prefix("/".into()))
            })
        );
        assert_eq!(
            filters[2],
            Filter::Mirror(Mirror {
                backend: BackendService {
                    namespace: "shop".into(),
                    name: "shadow".into(),
                    port: Some(8080)
                },
                per_million: 250_000
            })
        );
    }

    #[test]
    fn durations_follow_gep_2257() {
        let ok = [
            ("10s", 10_000),
            ("500ms", 500),
            ("1h30m", 5_400_000),
            ("1m500ms", 60_500),
            ("0s", 0),
        ];
        for (text, ms) in ok {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for bad in [
            "",
            "10",
            "s",
            "10sec",
            "1.5s",
            "123456s",
            "1h1h1h1h1h",
            "-1s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn patterns_match_whole_values() {
        let pattern = Pattern::new("/v[0-9]+").expect("valid");
        assert!(pattern.is_match("/v12"));
        assert!(!pattern.is_match("/v12/x"));
        assert_eq!(pattern.as_str(), "/v[0-9]+");
    }
}
