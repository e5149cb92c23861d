//! The `gateway.networking.k8s.io` resources as the Gateway API writes them (`v1`, and `v1beta1`
//! with the same schema): only the fields the mesh uses are read, as the API server would serve
//! them. Values are checked when the model is built ([`super::waypoint`]).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, NamespaceResourceScope, Resource};
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

impl Resource for GatewayResource {
    const API_VERSION: &'static str = "gateway.networking.k8s.io/v1";
    const GROUP: &'static str = GROUP;
    const KIND: &'static str = "Gateway";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "gateways";
    type Scope = NamespaceResourceScope;
}

impl Metadata for GatewayResource {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
