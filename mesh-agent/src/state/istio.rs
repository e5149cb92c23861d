//! The `security.istio.io` resources as Istio's API writes them (`v1` and `v1beta1` share one schema).
//!
//! Only the fields the agent supports are read; others are ignored, as the Kubernetes API server
//! prunes fields a CRD does not know. `null` is read as absent, like Kubernetes does. Values are
//! checked later, when the model is built ([`super::authorization`], [`super::peer_authentication`],
//! [`super::request_authentication`]).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use serde::de;
use serde::{Deserialize, Deserializer};

pub use super::policy_target::TargetRefSpec;

pub const GROUP: &str = "security.istio.io";
/// The versions that serve these kinds.
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// `security.istio.io/v1` `AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
pub struct AuthorizationPolicyResource {
    #[serde(default, deserialize_with = "nullable")]
    #[schemars(skip)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: AuthorizationPolicySpec,
    /// Set by a source that received the object but could not read its spec (the field and
    /// why): the policy then fails closed instead of being dropped.
    #[serde(skip)]
    pub unreadable: Option<(String, String)>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated by Istio for `targetRefs`; read the same way.
    #[serde(default)]
    pub target_ref: Option<TargetRefSpec>,
    /// What the policy attaches to at a waypoint (Gateway, Service, GatewayClass).
    #[serde(default, deserialize_with = "nullable")]
    pub target_refs: Vec<TargetRefSpec>,
    #[serde(default)]
    #[schemars(extend("enum" = ["ALLOW", "DENY", "AUDIT", "CUSTOM"]))]
    pub action: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct WorkloadSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct RuleSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub from: Vec<FromSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub to: Vec<ToSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub when: Vec<ConditionSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct FromSpec {
    #[serde(default)]
    pub source: Option<SourceSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct SourceSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_namespaces: Vec<String>,
    /// The peer identity's trust domain; read so that a rule using it is not silently widened.
    #[serde(default, deserialize_with = "nullable")]
    pub trust_domains: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_trust_domains: Vec<String>,
    /// Istio 1.23+; read so that a rule using it is not silently widened.
    #[serde(default, deserialize_with = "nullable")]
    pub service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct ToSpec {
    #[serde(default)]
    pub operation: Option<OperationSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct OperationSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<Scalar>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_ports: Vec<Scalar>,
    #[serde(default, deserialize_with = "nullable")]
    pub methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct ConditionSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub key: String,
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<Scalar>,
    #[serde(default, deserialize_with = "nullable")]
    pub not_values: Vec<Scalar>,
}

/// `security.istio.io/v1` `PeerAuthentication`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
pub struct PeerAuthenticationResource {
    #[serde(default, deserialize_with = "nullable")]
    #[schemars(skip)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MtlsSpec>,
    /// Keys are ports; YAML writes them as numbers, JSON as strings.
    #[serde(default, deserialize_with = "nullable")]
    pub port_level_mtls: BTreeMap<Scalar, MtlsSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct MtlsSpec {
    #[serde(default)]
    #[schemars(extend("enum" = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]))]
    pub mode: Option<String>,
}

/// `security.istio.io/v1` `RequestAuthentication`: which JWTs a waypoint accepts.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
pub struct RequestAuthenticationResource {
    #[serde(default, deserialize_with = "nullable")]
    #[schemars(skip)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: RequestAuthenticationSpec,
    /// Set by a source that received the object but could not read its spec (the field and
    /// why): the policy then fails closed instead of being dropped.
    #[serde(skip)]
    pub unreadable: Option<(String, String)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated by Istio for `targetRefs`; read the same way.
    #[serde(default)]
    pub target_ref: Option<TargetRefSpec>,
    /// What the policy attaches to at a waypoint (Gateway, Service, GatewayClass).
    #[serde(default, deserialize_with = "nullable")]
    pub target_refs: Vec<TargetRefSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub jwt_rules: Vec<JwtRuleSpec>,
}

/// One issuer's tokens: where they are, how they are checked and what is passed on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct JwtRuleSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub issuer: String,
    #[serde(default, deserialize_with = "nullable")]
    pub audiences: Vec<String>,
    /// A URL the JSON Web Key Set is fetched from.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// The JSON Web Key Set itself, as JSON text; preferred over `jwksUri`.
    #[serde(default)]
    pub jwks: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub from_headers: Vec<JwtHeaderSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub from_params: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub forward_original_token: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub output_claim_to_headers: Vec<ClaimToHeaderSpec>,
    /// How long a `jwksUri` fetch may take (`5s` by default).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// `fromHeaders[]`: a header carrying the token after `prefix`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct JwtHeaderSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub prefix: String,
}

/// `outputClaimToHeaders[]`: a claim copied to a request header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct ClaimToHeaderSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub header: String,
    #[serde(default, deserialize_with = "nullable")]
    pub claim: String,
}

/// A string or an integer, kept as text: Istio's ports are strings (`"8080"`) but manifests often
/// write numbers, which mean the same.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[schemars(
    description = "A string or an integer (ports and values).",
    extend("x-kubernetes-int-or-string" = true)
)]
pub struct Scalar(#[schemars(with = "serde_json::Value")] pub String);

impl Scalar {
    /// The port this is, when it is one (1-65535, digits only).
    pub fn port(&self) -> Option<u16> {
        let text = self.0.as_str();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse::<u16>().ok().filter(|port| *port != 0)
    }
}

impl AsRef<str> for Scalar {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl de::Visitor<'_> for Visitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Scalar, E> {
                Ok(Scalar(value.to_string()))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Scalar, E> {
                Ok(Scalar(value.to_string()))
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Scalar, E> {
                Ok(Scalar(value.to_string()))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

/// Reads `null` as the default, as Kubernetes treats an explicit null like an absent field.
pub(super) fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

namespaced_resource!(
    AuthorizationPolicyResource,
    "security.istio.io",
    "v1",
    "AuthorizationPolicy",
    "authorizationpolicies"
);
namespaced_resource!(
    PeerAuthenticationResource,
    "security.istio.io",
    "v1",
    "PeerAuthentication",
    "peerauthentications"
);
namespaced_resource!(
    RequestAuthenticationResource,
    "security.istio.io",
    "v1",
    "RequestAuthentication",
    "requestauthentications"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn authorization(text: &str) -> Result<AuthorizationPolicyResource, String> {
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    #[test]
    fn reads_istio_fields_and_ignores_others() {
        let resource = authorization(
            "metadata: {name: p, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: DENY
  provider: {name: ext}
  rules:
  - from:
    - source: {principals: [a], notNamespaces: [b], ipBlocks: [10.0.0.0/8], future: x}
    to:
    - operation: {ports: [\"80\", 8080], methods: [GET]}
    when:
    - {key: destination.port, values: [443], notValues: null}
",
        )
        .expect("valid");
        assert_eq!(resource.metadata.name.as_deref(), Some("p"));
        let spec = &resource.spec;
        assert_eq!(spec.action.as_deref(), Some("DENY"));
        let labels = &spec.selector.as_ref().expect("selector").match_labels;
        assert_eq!(labels.get("app").map(String::as_str), Some("cart"));
        let rule = &spec.rules[0];
        let source = rule.from[0].source.as_ref().expect("source");
        assert_eq!(source.principals, ["a"]);
        assert_eq!(source.not_namespaces, ["b"]);
        let operation = rule.to[0].operation.as_ref().expect("operation");
        assert_eq!(
            operation.ports,
            [Scalar("80".into()), Scalar("8080".into())]
        );
        assert_eq!(rule.when[0].values, [Scalar("443".into())]);
        assert!(rule.when[0].not_values.is_empty());
    }

    #[test]
    fn null_is_absent() {
        let resource =
            authorization("metadata: {name: p}\nspec: {rules: null, targetRefs: null}\n")
                .expect("valid");
        assert!(resource.spec.rules.is_empty());
        let resource = authorization("metadata: {name: p}\nspec:\n").expect("valid");
        assert_eq!(resource.spec, AuthorizationPolicySpec::default());
    }

    #[test]
    fn names_the_field_of_a_type_error() {
        let error = authorization("spec: {rules: [{from: [{source: {principals: x}}]}]}\n")
            .expect_err("wrong type");
        assert!(
            error.starts_with("spec.rules[0].from[0].source.principals: invalid type: string"),
            "{error}"
        );
        let error = authorization("spec: {rules: [{to: [{operation: {ports: [[80]]}}]}]}\n")
            .expect_err("wrong type");
        assert!(
            error.starts_with("spec.rules[0].to[0].operation.ports[0]: invalid type: sequence, expected a string or an integer"),
            "{error}"
        );
    }

    #[test]
    fn reads_port_level_mtls_keys_as_numbers_or_strings() {
        let value: serde_yaml::Value = serde_yaml::from_str(
            "spec: {portLevelMtls: {8080: {mode: DISABLE}, \"9090\": {mode: STRICT}}}\n",
        )
        .expect("yaml");
        let resource: PeerAuthenticationResource =
            serde_path_to_error::deserialize(value).expect("valid");
        let ports: Vec<Option<u16>> = resource
            .spec
            .port_level_mtls
            .keys()
            .map(Scalar::port)
            .collect();
        assert_eq!(ports, [Some(8080), Some(9090)]);
    }

    #[test]
    fn ports_are_1_to_65535() {
        let cases = [
            ("80", Some(80)),
            ("65535", Some(65535)),
            ("0", None),
            ("65536", None),
            ("+80", None),
            ("-1", None),
            ("http", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(Scalar(text.into()).port(), expected, "{text}");
        }
    }
}
