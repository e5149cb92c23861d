//! The `gateway.networking.k8s.io` resources as the Gateway API writes them (`v1`, and `v1beta1`
//! with the same schema): only the fields the mesh uses are read, as the API server would serve
//! them. Values are checked when the model is built ([`super::waypoint`]).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::istio::nullable;

pub const GROUP: &str = "gateway.networking.k8s.io";
/// The versions that serve the kinds read here.
pub const API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];

/// `gateway.networking.k8s.io/v1` `Gateway`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GatewayResource {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default, deserialize_with = "nullable")]
    pub gateway_class_name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub listeners: Vec<ListenerSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub port: i64,
    #[serde(default, deserialize_with = "nullable")]
    pub protocol: String,
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutesSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct AllowedRoutesSpec {
    #[serde(default)]
    pub namespaces: Option<RouteNamespacesSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RouteNamespacesSpec {
    /// `Same` (the default), `All` or `Selector`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub selector: Option<LabelSelectorSpec>,
}

/// A label selector; only `matchLabels` is supported, and `matchExpressions` is refused so that
/// a selector is never read as wider than written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub match_expressions: Vec<serde_json::Value>,
}

namespaced_resource!(
    GatewayResource,
    "gateway.networking.k8s.io",
    "v1",
    "Gateway",
    "gateways"
);

/// `gateway.networking.k8s.io/v1` `HTTPRoute`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct HttpRouteResource {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: HttpRouteSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub parent_refs: Vec<ParentRefSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub hostnames: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub rules: Vec<HttpRouteRuleSpec>,
}

/// What a route attaches to; for the mesh (GAMMA), a Service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRefSpec {
    /// `gateway.networking.k8s.io` when unset.
    #[serde(default)]
    pub group: Option<String>,
    /// `Gateway` when unset.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub section_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub matches: Vec<HttpRouteMatchSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub filters: Vec<HttpRouteFilterSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub backend_refs: Vec<BackendRefSpec>,
    #[serde(default)]
    pub timeouts: Option<TimeoutsSpec>,
    #[serde(default)]
    pub retry: Option<RetrySpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatchSpec {
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub headers: Vec<NameValueMatchSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub query_params: Vec<NameValueMatchSpec>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PathMatchSpec {
    /// `PathPrefix` when unset.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// `/` when unset.
    #[serde(default)]
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct NameValueMatchSpec {
    /// `Exact` when unset.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilterSpec {
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub request_redirect: Option<RequestRedirectSpec>,
    #[serde(default)]
    pub url_rewrite: Option<UrlRewriteSpec>,
    #[serde(default)]
    pub request_mirror: Option<RequestMirrorSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct HeaderModifierSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub set: Vec<HeaderValueSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub add: Vec<HeaderValueSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct HeaderValueSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirectSpec {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub status_code: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct UrlRewriteSpec {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathModifierSpec {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RequestMirrorSpec {
    #[serde(default, rename = "backendRef")]
    pub backend_ref: BackendRefSpec,
    #[serde(default)]
    pub percent: Option<i64>,
    #[serde(default)]
    pub fraction: Option<FractionSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct FractionSpec {
    #[serde(default)]
    pub numerator: i64,
    #[serde(default)]
    pub denominator: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct BackendRefSpec {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
    /// 1 when unset.
    #[serde(default)]
    pub weight: Option<i64>,
    #[serde(default, deserialize_with = "nullable")]
    pub filters: Vec<HttpRouteFilterSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// A Gateway API duration (`10s`, `500ms`, `1h30m`).
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RetrySpec {
    #[serde(default, deserialize_with = "nullable")]
    pub codes: Vec<i64>,
    #[serde(default)]
    pub attempts: Option<i64>,
    #[serde(default)]
    pub backoff: Option<String>,
}

namespaced_resource!(
    HttpRouteResource,
    "gateway.networking.k8s.io",
    "v1",
    "HTTPRoute",
    "httproutes"
);

/// `gateway.networking.k8s.io/v1` `GRPCRoute`: its filters and backendRefs have HTTPRoute's
/// shape (with fewer filter types, checked when the model is built).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GrpcRouteResource {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: GrpcRouteSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub parent_refs: Vec<ParentRefSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub hostnames: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub rules: Vec<GrpcRouteRuleSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub matches: Vec<GrpcRouteMatchSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub filters: Vec<HttpRouteFilterSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub backend_refs: Vec<BackendRefSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GrpcRouteMatchSpec {
    #[serde(default)]
    pub method: Option<GrpcMethodMatchSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub headers: Vec<NameValueMatchSpec>,
}

/// A match on the gRPC service and method (the request path `/<service>/<method>`); at least
/// one of the two is set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GrpcMethodMatchSpec {
    /// `Exact` when unset, or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

namespaced_resource!(
    GrpcRouteResource,
    "gateway.networking.k8s.io",
    "v1",
    "GRPCRoute",
    "grpcroutes"
);
