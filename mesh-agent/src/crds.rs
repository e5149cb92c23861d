//! `mesh-agent crds`: CustomResourceDefinitions of the Istio security kinds the agent reads, for
//! clusters without Istio, with schemas generated from the agent's own types (`state/istio.rs`).
//!
//! The schema is what schemars derives from those serde types, made structural (inlined, no
//! `$schema`, nullable options, plain enums) by the transforms kube-derive applies to its own CRDs.
//! Every object keeps `x-kubernetes-preserve-unknown-fields`, so fields Istio has and the agent does
//! not model are stored as written rather than pruned or refused; `targetRef(s)` and `CUSTOM` are
//! accepted here and rejected by the agent itself, with its own error.

use k8s_openapi::Resource;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionNames,
    CustomResourceDefinitionSpec, CustomResourceDefinitionVersion, CustomResourceSubresourceStatus,
    CustomResourceSubresources, CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube_core::schema::{OptionalEnum, OptionalIntOrString, StructuralSchemaRewriter};
use schemars::JsonSchema;
use schemars::Schema;
use schemars::generate::SchemaSettings;
use schemars::transform::{AddNullable, RecursiveTransform};
use serde::Serialize;

use crate::state::{
    AuthorizationPolicyResource, PeerAuthenticationResource, RequestAuthenticationResource,
};

/// `security.istio.io`.
const GROUP: &str = AuthorizationPolicyResource::GROUP;
/// The served versions, the first one stored (as Istio's own CRDs).
const VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// Istio's categories, so `kubectl get istio-io` lists these too.
const CATEGORIES: [&str; 2] = ["istio-io", "security-istio-io"];

#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("the schema generated for {kind} is not an OpenAPI v3 schema: {source}")]
    Schema {
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot write the CustomResourceDefinitions as YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// One kind's CRD: names and columns as Istio's, the schema from `T`.
struct Kind {
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    short_name: &'static str,
    /// Istio's printer column besides Age, if it has one: (name, JSON path, description).
    column: Option<(&'static str, &'static str, &'static str)>,
}

/// The CustomResourceDefinitions, AuthorizationPolicy first.
pub fn definitions() -> Result<Vec<CustomResourceDefinition>, CrdError> {
    Ok(vec![
        definition(
            &Kind {
                kind: AuthorizationPolicyResource::KIND,
                plural: AuthorizationPolicyResource::URL_PATH_SEGMENT,
                singular: "authorizationpolicy",
                short_name: "ap",
                column: Some(("Action", ".spec.action", "The operation to take.")),
            },
            schema::<AuthorizationPolicyResource>(AuthorizationPolicyResource::KIND)?,
        ),
        definition(
            &Kind {
                kind: PeerAuthenticationResource::KIND,
                plural: PeerAuthenticationResource::URL_PATH_SEGMENT,
                singular: "peerauthentication",
                short_name: "pa",
                column: Some((
                    "Mode",
                    ".spec.mtls.mode",
                    "Defines the mTLS mode used for peer authentication.",
                )),
            },
            schema::<PeerAuthenticationResource>(PeerAuthenticationResource::KIND)?,
        ),
        definition(
            &Kind {
                kind: RequestAuthenticationResource::KIND,
                plural: RequestAuthenticationResource::URL_PATH_SEGMENT,
                singular: "requestauthentication",
                short_name: "ra",
                column: None,
            },
            schema::<RequestAuthenticationResource>(RequestAuthenticationResource::KIND)?,
        ),
    ])
}

/// The definitions as one multi-document YAML stream, what `mesh-agent crds` prints.
pub fn yaml() -> Result<String, CrdError> {
    let mut out = Vec::new();
    let mut serializer = serde_yaml::Serializer::new(&mut out);
    for crd in definitions()? {
        crd.serialize(&mut serializer)?;
    }
    drop(serializer);
    // serde_yaml writes UTF-8 only.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn definition(kind: &Kind, schema: JSONSchemaProps) -> CustomResourceDefinition {
    let own = kind.column.map(
        |(column, path, description)| CustomResourceColumnDefinition {
            name: column.into(),
            json_path: path.into(),
            type_: "string".into(),
            description: Some(description.into()),
            ..Default::default()
        },
    );
    let columns: Vec<_> = own
        .into_iter()
        .chain([CustomResourceColumnDefinition {
            name: "Age".into(),
            json_path: ".metadata.creationTimestamp".into(),
            type_: "date".into(),
            ..Default::default()
        }])
        .collect();
    let versions = VERSIONS
        .iter()
        .enumerate()
        .map(|(i, version)| CustomResourceDefinitionVersion {
            name: (*version).into(),
            served: true,
            storage: i == 0,
            schema: Some(CustomResourceValidation {
                open_api_v3_schema: Some(schema.clone()),
            }),
            subresources: Some(CustomResourceSubresources {
                status: Some(CustomResourceSubresourceStatus(serde_json::Value::Object(
                    Default::default(),
                ))),
                scale: None,
            }),
            additional_printer_columns: Some(columns.clone()),
            ..Default::default()
        })
        .collect();
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("{}.{GROUP}", kind.plural)),
            ..Default::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: GROUP.into(),
            names: CustomResourceDefinitionNames {
                kind: kind.kind.into(),
                list_kind: Some(format!("{}List", kind.kind)),
                plural: kind.plural.into(),
                singular: Some(kind.singular.into()),
                short_names: Some(vec![kind.short_name.into()]),
                categories: Some(CATEGORIES.map(String::from).to_vec()),
            },
            scope: "Namespaced".into(),
            versions,
            ..Default::default()
        },
        status: None,
    }
}

/// `T`'s schema as a structural OpenAPI v3 schema, with an open `status` (Istio's controllers
/// write conditions there; the agent never does).
fn schema<T: JsonSchema>(kind: &'static str) -> Result<JSONSchemaProps, CrdError> {
    let generator = SchemaSettings::openapi3()
        .with(|settings| {
            settings.inline_subschemas = true;
            settings.meta_schema = None;
        })
        .with_transform(AddNullable::default())
        .with_transform(StructuralSchemaRewriter)
        .with_transform(OptionalEnum)
        .with_transform(OptionalIntOrString)
        .with_transform(RecursiveTransform(for_the_api_server))
        .into_generator();
    let generated = generator.into_root_schema_for::<T>();
    let mut schema: JSONSchemaProps = serde_json::from_value(generated.to_value())
        .map_err(|source| CrdError::Schema { kind, source })?;
    // The Rust type's name is no title for a Kubernetes kind.
    schema.title = None;
    schema.description = Some(format!(
        "Istio's {kind}, with the fields mesh-agent reads; other fields are kept as written."
    ));
    schema.properties.get_or_insert_default().insert(
        "status".into(),
        JSONSchemaProps {
            type_: Some("object".into()),
            x_kubernetes_preserve_unknown_fields: Some(true),
            ..Default::default()
        },
    );
    Ok(schema)
}

/// Two rules of the API server the generated schema must follow:
/// * no `default`: schemars states the Rust default (`[]`, `''`), which the API server would
///   write into every stored object;
/// * no `nullable` beside an `enum`: a null is checked against the enum and refused, while a
///   field that is not nullable has its null pruned — read as absent, as the agent reads it.
fn for_the_api_server(schema: &mut Schema) {
    schema.remove("default");
    if schema.get("enum").is_some() {
        schema.remove("nullable");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;
    use serde_json::Value;

    use super::*;

    /// Istio-style policies, with fields the agent rejects (`targetRefs`, `CUSTOM`) or does not
    /// model (`provider`, `trustDomains`): the API server must store them all.
    const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-allow, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/web"], notNamespaces: [test]}
    - source: {ipBlocks: [10.0.0.0/8], trustDomains: [cluster.local]}
    to:
    - operation: {ports: ["8080", 9090], notPorts: ["22"]}
    when:
    - {key: destination.port, values: [443, "8443"]}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: istio-system}
spec:
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec:
  action: CUSTOM
  provider: {name: ext-authz}
  targetRefs: [{kind: Service, group: "", name: cart}]
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  mtls: {mode: STRICT}
  portLevelMtls:
    "8080": {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  jwtRules:
  - issuer: https://issuer.example
    audiences: [shop]
    jwksUri: https://issuer.example/keys
    fromHeaders: [{name: x-jwt, prefix: "Bearer "}]
    fromParams: [token]
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
    forwardOriginalToken: true
    timeout: 2s
    spaceDelimitedClaims: [roles]
"#;

    fn parsed() -> Vec<CustomResourceDefinition> {
        let text = yaml().expect("the definitions serialize");
        serde_yaml::Deserializer::from_str(&text)
            .map(|document| CustomResourceDefinition::deserialize(document).expect("a CRD"))
            .collect()
    }

    fn schemas() -> BTreeMap<String, Value> {
        parsed()
            .into_iter()
            .map(|crd| {
                let version = &crd.spec.versions[0];
                let schema = version.schema.as_ref().expect("a schema");
                let schema = schema.open_api_v3_schema.as_ref().expect("openAPIV3Schema");
                let value = serde_json::to_value(schema).expect("JSON");
                (crd.spec.names.kind, value)
            })
            .collect()
    }

    /// Every object key anywhere in `value`, with its path.
    fn keys(value: &Value, path: &str, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    out.push(format!("{path}.{key}"));
                    keys(child, &format!("{path}.{key}"), out);
                }
            }
            Value::Array(items) => items.iter().for_each(|item| keys(item, path, out)),
            _ => {}
        }
    }

    #[test]
    fn both_kinds_with_both_versions_parse_as_crds() {
        let crds = parsed();
        let found: Vec<(&str, Vec<&str>, Vec<String>)> = crds
            .iter()
            .map(|crd| {
                (
                    crd.metadata.name.as_deref().unwrap_or_default(),
                    crd.spec.versions.iter().map(|v| v.name.as_str()).collect(),
                    crd.spec.names.short_names.clone().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                (
                    "authorizationpolicies.security.istio.io",
                    vec!["v1", "v1beta1"],
                    vec!["ap".to_string()]
                ),
                (
                    "peerauthentications.security.istio.io",
                    vec!["v1", "v1beta1"],
                    vec!["pa".to_string()]
                ),
                (
                    "requestauthentications.security.istio.io",
                    vec!["v1", "v1beta1"],
                    vec!["ra".to_string()]
                ),
            ]
        );
        for crd in &crds {
            assert_eq!(crd.spec.group, "security.istio.io");
            assert_eq!(crd.spec.scope, "Namespaced");
            let storage: Vec<bool> = crd.spec.versions.iter().map(|v| v.storage).collect();
            assert_eq!(storage, [true, false]);
            for version in &crd.spec.versions {
                assert!(version.served);
                let status = version
                    .subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref());
                assert!(
                    status.is_some(),
                    "{} has no status subresource",
                    version.name
                );
            }
        }
    }

    #[test]
    fn the_schema_is_structural() {
        for (kind, schema) in schemas() {
            let mut found = Vec::new();
            keys(&schema, "", &mut found);
            for forbidden in [
                "$ref",
                "$schema",
                "$defs",
                "definitions",
                "default",
                "oneOf",
            ] {
                let hits: Vec<&String> = found
                    .iter()
                    .filter(|path| path.ends_with(&format!(".{forbidden}")))
                    .collect();
                assert!(hits.is_empty(), "{kind}: {hits:?}");
            }
            let spec = &schema["properties"]["spec"];
            assert_eq!(spec["type"], "object", "{kind}");
            assert_eq!(spec["x-kubernetes-preserve-unknown-fields"], true, "{kind}");
            assert_eq!(schema["properties"]["status"]["type"], "object", "{kind}");
        }
    }

    #[test]
    fn istio_policies_validate_and_the_agent_reads_them() {
        let schemas = schemas();
        let mut checked = 0;
        for document in serde_yaml::Deserializer::from_str(POLICIES) {
            let policy = Value::deserialize(document).expect("YAML");
            let kind = policy["kind"].as_str().expect("a kind");
            let validator = jsonschema::validator_for(&schemas[kind]).expect("a valid schema");
            let errors: Vec<String> = validator
                .iter_errors(&policy)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{}: {errors:?}",
                policy["metadata"]["name"]
            );
            let read = match kind {
                "AuthorizationPolicy" => {
                    serde_json::from_value::<AuthorizationPolicyResource>(policy).map(drop)
                }
                "PeerAuthentication" => {
                    serde_json::from_value::<PeerAuthenticationResource>(policy).map(drop)
                }
                _ => serde_json::from_value::<RequestAuthenticationResource>(policy).map(drop),
            };
            read.expect("the agent reads what the schema accepts");
            checked += 1;
        }
        assert_eq!(checked, 5);
    }

    #[test]
    fn wrong_types_and_unknown_enum_values_are_refused() {
        let schemas = schemas();
        let cases = [
            ("AuthorizationPolicy", r#"{"spec": {"action": "BLOCK"}}"#),
            (
                "AuthorizationPolicy",
                r#"{"spec": {"rules": [{"from": [{"source": {"principals": "x"}}]}]}}"#,
            ),
            (
                "AuthorizationPolicy",
                r#"{"spec": {"targetRefs": {"kind": "Service"}}}"#,
            ),
            (
                "AuthorizationPolicy",
                r#"{"spec": {"targetRefs": [{"kind": "Service"}]}}"#,
            ),
            (
                "PeerAuthentication",
                r#"{"spec": {"mtls": {"mode": "LOOSE"}}}"#,
            ),
            (
                "PeerAuthentication",
                r#"{"spec": {"selector": {"matchLabels": {"app": 1}}}}"#,
            ),
            (
                "RequestAuthentication",
                r#"{"spec": {"jwtRules": [{"issuer": ["x"]}]}}"#,
            ),
            (
                "RequestAuthentication",
                r#"{"spec": {"jwtRules": [{"fromHeaders": [{"name": 1}]}]}}"#,
            ),
        ];
        for (kind, text) in cases {
            let instance: Value = serde_json::from_str(text).expect("JSON");
            let validator = jsonschema::validator_for(&schemas[kind]).expect("a valid schema");
            assert!(!validator.is_valid(&instance), "{kind} accepted {text}");
        }
    }
}
