//! The mesh's view of an Istio `RequestAuthentication`: for each issuer, where its JWTs are found,
//! the keys that sign them and what the waypoint passes on; checked when read, naming the field of
//! every problem. Validation of tokens lives in [`crate::waypoint::jwt`].

use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use serde::Serialize;

use super::istio::{JwtRuleSpec, RequestAuthenticationResource};
use super::namespace::namespace_of;
use super::policy_target::{Attachment, PolicyTarget, TargetRefError};
use super::small_map::Labels;
use crate::policy::{Targeted, WaypointTarget};
use crate::state::Snapshot;

/// Istio's default timeout of a `jwksUri` fetch.
pub const DEFAULT_JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS the waypoint reads, inline or fetched.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Most keys one JWKS may hold: each is a candidate for every token of its issuer.
pub const MAX_JWKS_KEYS: usize = 100;

/// A `RequestAuthentication`. Only waypoints apply one, and only when its `targetRefs` name
/// them; a selector policy is kept (so it can be listed) and applied nowhere.
///
/// A policy that cannot be understood is kept with [`invalid`](Self::invalid) set, no rules and
/// the targets that could be read. Istio would refuse such a policy; the waypoint instead fails
/// closed on what it targets: every request that carries a token gets 401 `Jwt verification
/// fails`, so no request gets an identity from a policy nobody can read, while requests without a
/// token pass as they do under any RequestAuthentication (an AuthorizationPolicy that requires a
/// request principal then refuses them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthentication {
    pub name: String,
    pub namespace: String,
    /// `spec.selector.matchLabels`: sidecar-era attachment, which waypoints ignore.
    pub selector: Labels,
    /// `spec.targetRefs` (and `targetRef`): the Gateways, Services or GatewayClass it applies to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<PolicyTarget>>,
    pub rules: Vec<JwtRule>,
    /// Why the policy as written cannot be understood (see the type's documentation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
}

/// `spec.jwtRules[]`: one issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// `iss` a token must carry.
    pub issuer: String,
    /// When set, a token's `aud` must name one of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    pub keys: KeySource,
    /// Where tokens of this issuer are looked for; Envoy's defaults (`Authorization: Bearer`
    /// and `access_token`) when the rule names none.
    pub locations: Vec<TokenLocation>,
    /// Keep the token in the request passed on (by default it is removed).
    pub forward_original_token: bool,
    /// A header (lowercase) that gets the payload, base64url-encoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// How long a `jwksUri` fetch may take.
    #[serde(with = "millis")]
    pub timeout: Duration,
}

/// The keys of an issuer. Inline keys win when both are written, as in Istio.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum KeySource {
    /// `jwks`, parsed when the policy was read.
    Inline(Jwks),
    /// `jwksUri`, fetched by the waypoint and cached.
    Uri(String),
}

/// The usable public keys of a JSON Web Key Set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TokenLocation {
    /// A header (name lowercase), the token after `prefix`.
    Header { name: String, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl TokenLocation {
    /// Envoy's locations when a rule names none.
    pub fn defaults() -> Vec<TokenLocation> {
        vec![
            TokenLocation::Header {
                name: "authorization".into(),
                prefix: "Bearer ".into(),
            },
            TokenLocation::Param("access_token".into()),
        ]
    }
}

/// `outputClaimToHeaders[]`: the claim (`a.b` for a nested one) copied to a header (lowercase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

/// A problem with a RequestAuthentication; the field is carried beside it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestAuthenticationError {
    #[error(transparent)]
    Target(#[from] TargetRefError),
    #[error("must not be empty")]
    Empty,
    #[error(
        "one of jwks or jwksUri must be set (OpenID discovery from the issuer is not supported)"
    )]
    NoKeys,
    #[error(transparent)]
    Jwks(#[from] JwksError),
    #[error("{0:?} is not an http or https URL with a host")]
    Uri(String),
    #[error("{0:?} is not a valid HTTP header name")]
    HeaderName(String),
    #[error("{0:?} is not a duration (such as 5s, 1.5s or 500ms) above zero")]
    Timeout(String),
    #[error("{0}")]
    Unreadable(String),
}

/// Why a JSON Web Key Set cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("is over {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("is not a JSON Web Key Set: {0}")]
    Json(String),
    #[error("has {0} keys, over the limit of {MAX_JWKS_KEYS}")]
    TooManyKeys(usize),
    #[error("has no usable public key (RSA, EC P-256 or P-384, Ed25519)")]
    NoUsableKey,
}

impl Jwks {
    /// Reads a JWKS, keeping the public keys a token can be checked with. Keys of other types
    /// (symmetric ones, unknown curves) are skipped, as Envoy skips them; a set with none left
    /// is an error.
    pub fn parse(text: &str) -> Result<Jwks, JwksError> {
        if text.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = serde_json::from_str(text).map_err(|e| JwksError::Json(e.to_string()))?;
        if set.keys.len() > MAX_JWKS_KEYS {
            return Err(JwksError::TooManyKeys(set.keys.len()));
        }
        let keys: Vec<Jwk> = set
            .keys
            .into_iter()
            .filter_map(|key| serde_json::from_value::<Jwk>(key).ok())
            .filter(is_usable)
            .collect();
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(Jwks { keys })
    }
}

/// A public key of a kind the waypoint verifies, whose parts decode.
fn is_usable(jwk: &Jwk) -> bool {
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => true,
        AlgorithmParameters::EllipticCurve(ec) => {
            matches!(ec.curve, EllipticCurve::P256 | EllipticCurve::P384)
        }
        AlgorithmParameters::OctetKeyPair(okp) => okp.curve == EllipticCurve::Ed25519,
        _ => false,
    };
    kind && jsonwebtoken::DecodingKey::from_jwk(jwk).is_ok()
}

/// Problems with the field path of each, e.g. `spec.jwtRules[0].issuer`.
pub type FieldErrors = Vec<(String, RequestAuthenticationError)>;

impl RequestAuthentication {
    /// Builds the model, returning every problem. `metadata.name` is checked by the caller.
    pub fn from_resource(resource: &RequestAuthenticationResource) -> Result<Self, FieldErrors> {
        if let Some((field, reason)) = &resource.unreadable {
            return Err(vec![(
                field.clone(),
                RequestAuthenticationError::Unreadable(reason.clone()),
            )]);
        }
        let mut errors = FieldErrors::new();
        let (targets, target_errors) = attachment(resource).targets();
        errors.extend(
            target_errors
                .into_iter()
                .map(|(field, error)| (field, error.into())),
        );
        let rules = resource
            .spec
            .jwt_rules
            .iter()
            .enumerate()
            .map(|(index, rule)| jwt_rule(&format!("spec.jwtRules[{index}]"), rule, &mut errors))
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(RequestAuthentication {
            name: resource.metadata.name.clone().unwrap_or_default(),
            namespace: namespace_of(&resource.metadata).to_string(),
            selector: attachment(resource).selector(),
            targets,
            rules,
            invalid: None,
        })
    }

    /// What a policy that cannot be understood becomes: no rules, the targets that could be
    /// read, and the reason (see [`RequestAuthentication`] for what the waypoint then does).
    pub fn fail_closed(
        resource: &RequestAuthenticationResource,
        problems: &FieldErrors,
    ) -> RequestAuthentication {
        let reason = problems
            .iter()
            .map(|(field, problem)| format!("{field}: {problem}"))
            .collect::<Vec<_>>()
            .join("; ");
        RequestAuthentication {
            name: resource.metadata.name.clone().unwrap_or_default(),
            namespace: namespace_of(&resource.metadata).to_string(),
            selector: attachment(resource).selector(),
            targets: attachment(resource).targets().0,
            rules: Vec::new(),
            invalid: Some(reason),
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Targeted for RequestAuthentication {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn targets(&self) -> Option<&[PolicyTarget]> {
        self.targets.as_deref()
    }
}

/// The `RequestAuthentication`s the waypoint applies at `target`, in snapshot order.
pub fn waypoint_request_authentications<'a>(
    snapshot: &'a Snapshot,
    root: &'a str,
    target: WaypointTarget<'a>,
) -> impl Iterator<Item = &'a RequestAuthentication> + 'a {
    crate::policy::attached(&snapshot.request_authentications, root, target)
}

/// What the policy applies to, as written (read as for an AuthorizationPolicy).
fn attachment(resource: &RequestAuthenticationResource) -> Attachment<'_> {
    Attachment {
        selector: resource.spec.selector.as_ref(),
        target_ref: resource.spec.target_ref.as_ref(),
        target_refs: &resource.spec.target_refs,
        namespace: namespace_of(&resource.metadata),
    }
}

fn jwt_rule(field: &str, spec: &JwtRuleSpec, errors: &mut FieldErrors) -> JwtRule {
    let mut fail = |name: String, error: RequestAuthenticationError| errors.push((name, error));
    if spec.issuer.is_empty() {
        fail(format!("{field}.issuer"), RequestAuthenticationError::Empty);
    }
    for (index, audience) in spec.audiences.iter().enumerate() {
        if audience.is_empty() {
            fail(
                format!("{field}.audiences[{index}]"),
                RequestAuthenticationError::Empty,
            );
        }
    }
    let inline = spec.jwks.as_deref().filter(|text| !text.is_empty());
    let uri = spec.jwks_uri.as_deref().filter(|uri| !uri.is_empty());
    let keys = match (inline, uri) {
        (Some(text), _) => match Jwks::parse(text) {
            Ok(jwks) => KeySource::Inline(jwks),
            Err(error) => {
                fail(format!("{field}.jwks"), error.into());
                KeySource::Inline(Jwks::default())
            }
        },
        (None, Some(uri)) => {
            if !is_http_url(uri) {
                fail(
                    format!("{field}.jwksUri"),
                    RequestAuthenticationError::Uri(uri.to_string()),
                );
            }
            KeySource::Uri(uri.to_string())
        }
        (None, None) => {
            fail(field.to_string(), RequestAuthenticationError::NoKeys);
            KeySource::Inline(Jwks::default())
        }
    };
    let mut locations = Vec::new();
    for (index, header) in spec.from_headers.iter().enumerate() {
        let name = format!("{field}.fromHeaders[{index}].name");
        match header_name(&header.name) {
            Ok(lower) => locations.push(TokenLocation::Header {
                name: lower,
                prefix: header.prefix.clone(),
            }),
            Err(error) => fail(name, error),
        }
    }
    for (kind, values, make) in [
        (
            "fromParams",
            &spec.from_params,
            TokenLocation::Param as fn(_) -> _,
        ),
        ("fromCookies", &spec.from_cookies, TokenLocation::Cookie),
    ] {
        for (index, value) in values.iter().enumerate() {
            if value.is_empty() {
                fail(
                    format!("{field}.{kind}[{index}]"),
                    RequestAuthenticationError::Empty,
                );
            } else {
                locations.push(make(value.clone()));
            }
        }
    }
    if spec.from_headers.is_empty() && spec.from_params.is_empty() && spec.from_cookies.is_empty() {
        locations = TokenLocation::defaults();
    }
    let output_payload_to_header = spec
        .output_payload_to_header
        .as_deref()
        .filter(|name| !name.is_empty())
        .and_then(|name| {
            header_name(name)
                .map_err(|error| fail(format!("{field}.outputPayloadToHeader"), error))
                .ok()
        });
    let mut output_claim_to_headers = Vec::new();
    for (index, pair) in spec.output_claim_to_headers.iter().enumerate() {
        let at = format!("{field}.outputClaimToHeaders[{index}]");
        let header = header_name(&pair.header).map_err(|e| fail(format!("{at}.header"), e));
        if pair.claim.is_empty() {
            fail(format!("{at}.claim"), RequestAuthenticationError::Empty);
        } else if let Ok(header) = header {
            output_claim_to_headers.push(ClaimToHeader {
                header,
                claim: pair.claim.clone(),
            });
        }
    }
    let timeout = match spec.timeout.as_deref() {
        None | Some("") => DEFAULT_JWKS_TIMEOUT,
        Some(text) => parse_timeout(text).unwrap_or_else(|| {
            fail(
                format!("{field}.timeout"),
                RequestAuthenticationError::Timeout(text.to_string()),
            );
            DEFAULT_JWKS_TIMEOUT
        }),
    };
    JwtRule {
        issuer: spec.issuer.clone(),
        audiences: spec.audiences.clone(),
        keys,
        locations,
        forward_original_token: spec.forward_original_token,
        output_payload_to_header,
        output_claim_to_headers,
        timeout,
    }
}

/// A valid HTTP header name, lowercase.
fn header_name(name: &str) -> Result<String, RequestAuthenticationError> {
    if name.is_empty() {
        return Err(RequestAuthenticationError::Empty);
    }
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|header| header.as_str().to_string())
        .map_err(|_| RequestAuthenticationError::HeaderName(name.to_string()))
}

fn is_http_url(text: &str) -> bool {
    text.parse::<http::Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https"))
            && uri.host().is_some_and(|host| !host.is_empty())
    })
}

/// A protobuf JSON duration (`5s`, `1.5s`) or a Gateway API one (`500ms`, `1m30s`); above zero.
fn parse_timeout(text: &str) -> Option<Duration> {
    let seconds = text
        .strip_suffix('s')
        .filter(|number| {
            !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        })
        .and_then(|number| number.parse::<f64>().ok())
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok());
    seconds
        .or_else(|| super::http_route::parse_duration(text).ok())
        .filter(|duration| !duration.is_zero())
}

/// A duration as whole milliseconds, as `config_dump` shows it.
mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waypoint::jwt::testing::SigningKey;

    fn policy(text: &str) -> Result<RequestAuthentication, Vec<String>> {
        let value: serde_yaml::Value = serde_yaml::from_str(text).expect("yaml");
        let resource: RequestAuthenticationResource =
            serde_path_to_error::deserialize(value).expect("well-typed");
        RequestAuthentication::from_resource(&resource).map_err(|errors| {
            errors
                .into_iter()
                .map(|(field, error)| format!("{field}: {error}"))
                .collect()
        })
    }

    /// A policy on Gateway `wp` with `rule` (YAML flow mapping fields) as its only rule.
    fn with_rule(rule: &str) -> String {
        format!(
            "metadata: {{name: jwt, namespace: shop}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: wp}}]\n  jwtRules: [{{{rule}}}]\n"
        )
    }

    fn jwks_json() -> String {
        serde_json::to_string(&SigningKey::es256("k1").jwks()).expect("json")
    }

    #[test]
    fn reads_a_full_rule() {
        let jwks = serde_json::to_string(&jwks_json()).expect("quoted");
        let policy = policy(&with_rule(&format!(
            "issuer: https://issuer.example, audiences: [shop, web], jwks: {jwks}, jwksUri: 'https://ignored.example/keys',
             fromHeaders: [{{name: X-Jwt, prefix: 'Token '}}, {{name: x-other}}], fromParams: [token], fromCookies: [session],
             forwardOriginalToken: true, outputPayloadToHeader: X-Payload,
             outputClaimToHeaders: [{{header: X-Sub, claim: sub}}], timeout: 1.5s"
        )))
        .expect("valid");
        assert_eq!(policy.key(), "shop/jwt");
        assert_eq!(
            policy.targets,
            Some(vec![PolicyTarget::Gateway("wp".into())])
        );
        let rule = &policy.rules[0];
        assert_eq!(rule.issuer, "https://issuer.example");
        assert_eq!(rule.audiences, ["shop", "web"]);
        assert!(matches!(&rule.keys, KeySource::Inline(jwks) if jwks.keys.len() == 1));
        assert_eq!(
            rule.locations,
            [
                TokenLocation::Header {
                    name: "x-jwt".into(),
                    prefix: "Token ".into()
                },
                TokenLocation::Header {
                    name: "x-other".into(),
                    prefix: String::new()
                },
                TokenLocation::Param("token".into()),
                TokenLocation::Cookie("session".into()),
            ]
        );
        assert!(rule.forward_original_token);
        assert_eq!(rule.output_payload_to_header.as_deref(), Some("x-payload"));
        assert_eq!(
            rule.output_claim_to_headers,
            [ClaimToHeader {
                header: "x-sub".into(),
                claim: "sub".into()
            }]
        );
        assert_eq!(rule.timeout, Duration::from_millis(1500));
    }

    #[test]
    fn defaults_follow_istio_and_envoy() {
        let policy = policy(&with_rule(
            "issuer: iss, jwksUri: 'http://keys.shop.svc:8080/jwks'",
        ))
        .expect("valid");
        let rule = &policy.rules[0];
        assert_eq!(
            rule.keys,
            KeySource::Uri("http://keys.shop.svc:8080/jwks".into())
        );
        assert_eq!(rule.locations, TokenLocation::defaults());
        assert!(!rule.forward_original_token);
        assert_eq!(rule.timeout, DEFAULT_JWKS_TIMEOUT);
        assert!(rule.audiences.is_empty() && rule.output_claim_to_headers.is_empty());
        let policy = self::policy("metadata: {name: p}\n").expect("valid");
        assert_eq!(
            (policy.namespace.as_str(), policy.targets.as_ref()),
            ("default", None)
        );
        assert!(policy.rules.is_empty());
    }

    #[test]
    fn every_malformed_field_is_named() {
        let errors = policy(
            "metadata: {name: p, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  targetRefs: [{kind: Service, name: web}, {kind: Deployment, name: x}]
  jwtRules:
  - {issuer: '', audiences: [a, ''], jwks: '{\"keys\": 7}'}
  - {issuer: i, jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}'}
  - {issuer: i, jwksUri: 'ftp://keys/x'}
  - issuer: i
    fromHeaders: [{name: ''}, {name: 'bad header'}]
    fromParams: ['']
    fromCookies: ['']
    outputPayloadToHeader: 'x:y'
    outputClaimToHeaders: [{header: x-a, claim: ''}, {header: '', claim: sub}]
    timeout: 0s
  - {issuer: i, jwks: 'not json', timeout: soon}
",
        )
        .expect_err("malformed");
        assert_eq!(
            errors,
            [
                "spec.selector: cannot be used together with targetRefs or targetRef",
                "spec.targetRefs[1].kind: \"\"/Deployment is not a kind a policy attaches to (Gateway, Service, GatewayClass)",
                "spec.jwtRules[0].issuer: must not be empty",
                "spec.jwtRules[0].audiences[1]: must not be empty",
                "spec.jwtRules[0].jwks: is not a JSON Web Key Set: invalid type: integer `7`, expected a sequence at line 1 column 10",
                "spec.jwtRules[1].jwks: has no usable public key (RSA, EC P-256 or P-384, Ed25519)",
                "spec.jwtRules[2].jwksUri: \"ftp://keys/x\" is not an http or https URL with a host",
                "spec.jwtRules[3]: one of jwks or jwksUri must be set (OpenID discovery from the issuer is not supported)",
                "spec.jwtRules[3].fromHeaders[0].name: must not be empty",
                "spec.jwtRules[3].fromHeaders[1].name: \"bad header\" is not a valid HTTP header name",
                "spec.jwtRules[3].fromParams[0]: must not be empty",
                "spec.jwtRules[3].fromCookies[0]: must not be empty",
                "spec.jwtRules[3].outputPayloadToHeader: \"x:y\" is not a valid HTTP header name",
                "spec.jwtRules[3].outputClaimToHeaders[0].claim: must not be empty",
                "spec.jwtRules[3].outputClaimToHeaders[1].header: must not be empty",
                "spec.jwtRules[3].timeout: \"0s\" is not a duration (such as 5s, 1.5s or 500ms) above zero",
                "spec.jwtRules[4].jwks: is not a JSON Web Key Set: expected ident at line 1 column 2",
                "spec.jwtRules[4].timeout: \"soon\" is not a duration (such as 5s, 1.5s or 500ms) above zero",
            ]
        );
    }

    #[test]
    fn a_policy_that_cannot_be_understood_fails_closed_on_its_targets() {
        let text = with_rule("issuer: ''");
        let value: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        let resource: RequestAuthenticationResource =
            serde_path_to_error::deserialize(value).expect("well-typed");
        let errors = RequestAuthentication::from_resource(&resource).expect_err("invalid");
        let model = RequestAuthentication::fail_closed(&resource, &errors);
        assert_eq!(
            model.invalid.as_deref(),
            Some(
                "spec.jwtRules[0].issuer: must not be empty; spec.jwtRules[0]: one of jwks or jwksUri must be set (OpenID discovery from the issuer is not supported)"
            )
        );
        assert!(model.rules.is_empty());
        assert_eq!(
            model.targets,
            Some(vec![PolicyTarget::Gateway("wp".into())])
        );
    }

    #[test]
    fn jwks_keeps_public_keys_and_skips_others() {
        let mut set = SigningKey::es256("ec").jwks();
        let ed = SigningKey::ed25519("ed").jwks();
        let keys = set["keys"].as_array_mut().expect("keys");
        keys.extend(ed["keys"].as_array().expect("keys").iter().cloned());
        keys.push(serde_json::json!({"kty": "oct", "k": "c2VjcmV0"}));
        keys.push(serde_json::json!({"kty": "EC", "crv": "P-256", "x": "!!", "y": "!!"}));
        keys.push(serde_json::json!({"kty": "weird"}));
        let jwks = Jwks::parse(&set.to_string()).expect("usable");
        let kids: Vec<Option<&str>> = jwks
            .keys
            .iter()
            .map(|key| key.common.key_id.as_deref())
            .collect();
        assert_eq!(kids, [Some("ec"), Some("ed")]);
        let many = serde_json::json!({"keys": vec![serde_json::json!({}); MAX_JWKS_KEYS + 1]});
        assert_eq!(
            Jwks::parse(&many.to_string()),
            Err(JwksError::TooManyKeys(MAX_JWKS_KEYS + 1))
        );
        let large = format!(
            "{{\"keys\": [], \"pad\": \"{}\"}}",
            "x".repeat(MAX_JWKS_BYTES)
        );
        assert_eq!(Jwks::parse(&large), Err(JwksError::TooLarge));
    }

    #[test]
    fn the_snapshot_keeps_them_sorted_and_a_waypoint_applies_those_that_target_it() {
        let jwks = serde_json::to_string(&jwks_json()).expect("quoted");
        let document = |namespace: &str, name: &str, spec: &str| {
            format!(
                "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
            )
        };
        let rules = format!("jwtRules: [{{issuer: i, jwks: {jwks}}}]");
        let gateway = "{group: gateway.networking.k8s.io, kind: Gateway, name: wp}";
        let class = "{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}";
        let mut text = String::new();
        for namespace in ["istio-system", "shop"] {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"
            ));
        }
        text.push_str(&document(
            "shop",
            "service",
            &format!("{{targetRefs: [{{kind: Service, name: echo}}], {rules}}}"),
        ));
        text.push_str(&document(
            "shop",
            "gateway",
            &format!("{{targetRefs: [{gateway}], {rules}}}"),
        ));
        text.push_str(&document(
            "istio-system",
            "class",
            &format!("{{targetRefs: [{class}], {rules}}}"),
        ));
        text.push_str(&document(
            "shop",
            "selector",
            &format!("{{selector: {{matchLabels: {{app: echo}}}}, {rules}}}"),
        ));
        text.push_str(&document(
            "shop",
            "broken",
            &format!("{{targetRefs: [{gateway}], jwtRules: [{{issuer: i}}]}}"),
        ));
        let (snapshot, errors) = crate::source::local::testing::assemble_text(&text);
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "test.yaml: RequestAuthentication shop/broken: spec.jwtRules[0]: one of jwks or jwksUri must be set (OpenID discovery from the issuer is not supported)"
            ]
        );
        let keys: Vec<String> = snapshot
            .request_authentications
            .iter()
            .map(|p| p.key())
            .collect();
        assert_eq!(
            keys,
            [
                "istio-system/class",
                "shop/broken",
                "shop/gateway",
                "shop/selector",
                "shop/service"
            ]
        );
        let wp = crate::state::WaypointRef {
            namespace: "shop".into(),
            name: "wp".into(),
        };
        let applied = |service| {
            let target = WaypointTarget {
                gateway: &wp,
                service,
            };
            waypoint_request_authentications(&snapshot, "istio-system", target)
                .map(|policy| (policy.key(), policy.invalid.is_some()))
                .collect::<Vec<_>>()
        };
        let key = |k: &str, invalid| (k.to_string(), invalid);
        assert_eq!(
            applied(Some(("shop", "echo"))),
            [
                key("istio-system/class", false),
                key("shop/broken", true),
                key("shop/gateway", false),
                key("shop/service", false)
            ]
        );
        assert_eq!(
            applied(None),
            [
                key("istio-system/class", false),
                key("shop/broken", true),
                key("shop/gateway", false)
            ]
        );
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("0.25s"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_timeout("1m30s"), Some(Duration::from_secs(90)));
        for bad in ["0s", "", "s", "-1s", "5", "1e3s", "fast"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }
}
