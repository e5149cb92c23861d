//! Turns the text of a state file into Kubernetes objects: YAML or JSON streams, `List`s, and kinds to skip.

use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use crate::state::{
    DEFAULT_NAMESPACE, Object, Origin, Sourced, StateError, gateway_api, istio, object_label,
};

/// Groups whose other kinds the agent will read later (waypoints, request authentication):
/// skipped quietly, never errors.
const LATER_GROUPS: [&str; 2] = ["security.istio.io/", "gateway.networking.k8s.io/"];

/// How a file is parsed; YAML also reads most JSON, but JSON files get JSON's exact rules and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// `.json` files are JSON, everything else YAML.
    pub fn of(path: &Path) -> Format {
        match path.extension().and_then(|ext| ext.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Yaml,
        }
    }
}

/// A document that does not hold a usable object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("invalid {format}: {message}")]
    Syntax {
        format: &'static str,
        message: String,
    },
    #[error("a document must be a mapping, found {0}")]
    NotAMapping(&'static str),
    #[error("is required")]
    Missing,
    #[error("must be a string")]
    NotAString,
    #[error("must be a list")]
    NotAList,
    #[error("{kind} is served by apiVersion {expected}, not {found:?}")]
    WrongApiVersion {
        kind: String,
        expected: &'static str,
        found: String,
    },
    #[error("a List inside a List is not supported")]
    NestedList,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Bounds(#[from] super::bounds::BoundsError),
}

/// What one file holds: the objects to use and the problems found.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Sourced<Object>>,
    pub errors: Vec<StateError>,
}

/// Reads every document of a file. Parsing stops at the first syntax error (the parser cannot resync),
/// but every other problem is reported.
pub fn parse(file: &Path, text: &str, format: Format) -> Parsed {
    let mut parsed = Parsed::default();
    // Before the parser: what it would take minutes or gigabytes over is refused in one pass.
    if let Err(error) = super::bounds::check_depth(text) {
        parsed.fail(
            &Origin::new(file, "file"),
            "file".into(),
            None,
            error.into(),
        );
        return parsed;
    }
    match format {
        Format::Yaml => {
            for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
                let origin = Origin::new(file, format!("document {}", index + 1));
                match Value::deserialize(document).and_then(|mut value| {
                    value.apply_merge()?;
                    Ok(value)
                }) {
                    Ok(value) => parsed.document(value, origin, None),
                    Err(error) => {
                        parsed.fail(
                            &origin,
                            origin.document.clone(),
                            None,
                            syntax("YAML", error),
                        );
                        break;
                    }
                }
            }
        }
        Format::Json => {
            let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
            for (index, document) in stream.enumerate() {
                let origin = Origin::new(file, format!("document {}", index + 1));
                match document {
                    Ok(value) => parsed.document(value, origin, None),
                    Err(error) => {
                        parsed.fail(
                            &origin,
                            origin.document.clone(),
                            None,
                            syntax("JSON", error),
                        );
                        break;
                    }
                }
            }
        }
    }
    parsed
}

fn syntax(format: &'static str, error: impl std::fmt::Display) -> DocumentError {
    DocumentError::Syntax {
        format,
        message: error.to_string(),
    }
}

/// `apiVersion` and `kind` that items of a typed list (`PodList`) inherit when they omit them.
struct ListDefaults {
    api_version: String,
    kind: Option<String>,
}

impl Parsed {
    fn fail(&mut self, origin: &Origin, object: String, field: Option<&str>, error: DocumentError) {
        self.errors.push(StateError::new(
            origin.file.clone(),
            object,
            field.map(str::to_string),
            error,
        ));
    }

    /// Reads one document, or one item of a List when `defaults` is set.
    fn document(&mut self, mut value: Value, origin: Origin, defaults: Option<&ListDefaults>) {
        let map = match &mut value {
            // An empty document (`---` at the end, only comments): nothing to read.
            Value::Null => return,
            Value::Mapping(map) => map,
            other => {
                let found = describe(other);
                self.fail(
                    &origin,
                    origin.document.clone(),
                    None,
                    DocumentError::NotAMapping(found),
                );
                return;
            }
        };
        if let Some(defaults) = defaults {
            inherit(map, "apiVersion", Some(&defaults.api_version));
            inherit(map, "kind", defaults.kind.as_ref());
        }
        let kind = string_field(map, "kind");
        let api_version = string_field(map, "apiVersion");
        let (kind, api_version) = match (kind, api_version) {
            (Ok(kind), Ok(api_version)) => (kind.to_string(), api_version.to_string()),
            (kind, api_version) => {
                for (field, result) in [("kind", kind), ("apiVersion", api_version)] {
                    if let Err(error) = result {
                        self.fail(&origin, origin.document.clone(), Some(field), error);
                    }
                }
                return;
            }
        };

        if kind == "List" || (kind.ends_with("List") && map.contains_key("items")) {
            self.list(value, &kind, api_version, origin, defaults.is_some());
            return;
        }
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => self.typed(value, origin, &kind, false, |ns| {
                Object::Namespace(Box::new(ns))
            }),
            ("v1", "Pod") => {
                self.typed(value, origin, &kind, true, |pod| Object::Pod(Box::new(pod)))
            }
            ("v1", "Service") => self.typed(value, origin, &kind, true, |service| {
                Object::Service(Box::new(service))
            }),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                self.typed(value, origin, &kind, true, |slice| {
                    Object::EndpointSlice(Box::new(slice))
                })
            }
            (version, "AuthorizationPolicy") if istio::API_VERSIONS.contains(&version) => self
                .typed(value, origin, &kind, true, |policy| {
                    Object::AuthorizationPolicy(Box::new(policy))
                }),
            (version, "PeerAuthentication") if istio::API_VERSIONS.contains(&version) => self
                .typed(value, origin, &kind, true, |policy| {
                    Object::PeerAuthentication(Box::new(policy))
                }),
            (version, "RequestAuthentication") if istio::API_VERSIONS.contains(&version) => self
                .typed(value, origin, &kind, true, |policy| {
                    Object::RequestAuthentication(Box::new(policy))
                }),
            (version, "Gateway") if gateway_api::API_VERSIONS.contains(&version) => {
                self.typed(value, origin, &kind, true, |gateway| {
                    Object::Gateway(Box::new(gateway))
                })
            }
            (version, "HTTPRoute") if gateway_api::API_VERSIONS.contains(&version) => {
                self.typed(value, origin, &kind, true, |route| {
                    Object::HttpRoute(Box::new(route))
                })
            }
            // GRPCRoute has no v1beta1.
            ("gateway.networking.k8s.io/v1", "GRPCRoute") => {
                self.typed(value, origin, &kind, true, |route| {
                    Object::GrpcRoute(Box::new(route))
                })
            }
            (found, "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication")
                if is_istio_security(found) =>
            {
                let label = label_of(map, &kind, true, &origin);
                let error = DocumentError::WrongApiVersion {
                    kind: kind.clone(),
                    expected: "security.istio.io/v1 or security.istio.io/v1beta1",
                    found: found.to_string(),
                };
                self.fail(&origin, label, Some("apiVersion"), error);
            }
            (found, "Namespace" | "Pod" | "Service") => {
                let label = label_of(map, &kind, kind != "Namespace", &origin);
                let error = DocumentError::WrongApiVersion {
                    kind: kind.clone(),
                    expected: "v1",
                    found: found.to_string(),
                };
                self.fail(&origin, label, Some("apiVersion"), error);
            }
            (api_version, kind) if is_later(api_version) => {
                tracing::debug!(file = %origin.file.display(), document = %origin.document, api_version, kind,
                    "skipping object: kind not supported yet");
            }
            (api_version, kind) => {
                tracing::debug!(file = %origin.file.display(), document = %origin.document, api_version, kind,
                    "skipping object: kind not used by the agent");
            }
        }
    }

    fn list(
        &mut self,
        value: Value,
        kind: &str,
        api_version: String,
        origin: Origin,
        nested: bool,
    ) {
        if nested {
            self.fail(
                &origin,
                origin.document.clone(),
                Some("kind"),
                DocumentError::NestedList,
            );
            return;
        }
        let items = match value {
            Value::Mapping(mut map) => map.remove("items").unwrap_or(Value::Null),
            _ => Value::Null,
        };
        let items = match items {
            Value::Null => Vec::new(),
            Value::Sequence(items) => items,
            _ => {
                self.fail(
                    &origin,
                    origin.document.clone(),
                    Some("items"),
                    DocumentError::NotAList,
                );
                return;
            }
        };
        let defaults = ListDefaults {
            api_version,
            kind: kind
                .strip_suffix("List")
                .filter(|item_kind| !item_kind.is_empty())
                .map(str::to_string),
        };
        for (index, item) in items.into_iter().enumerate() {
            let item_origin = Origin::new(
                origin.file.clone(),
                format!("{} item {}", origin.document, index + 1),
            );
            self.document(item, item_origin, Some(&defaults));
        }
    }

    /// Deserializes into the k8s-openapi type, naming the field of a type error (`metadata.labels`).
    fn typed<T: DeserializeOwned>(
        &mut self,
        value: Value,
        origin: Origin,
        kind: &str,
        namespaced: bool,
        wrap: impl FnOnce(T) -> Object,
    ) {
        let label = match &value {
            Value::Mapping(map) => label_of(map, kind, namespaced, &origin),
            _ => origin.document.clone(),
        };
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(object) => self.objects.push(Sourced {
                origin,
                object: wrap(object),
            }),
            Err(error) => {
                let path = error.path().to_string();
                let field = (path != ".").then_some(path);
                let reason = DocumentError::Invalid(error.into_inner().to_string());
                self.fail(&origin, label, field.as_deref(), reason);
            }
        }
    }
}

/// Labels an object from its raw metadata, before it is known to be well-typed.
fn label_of(map: &Mapping, kind: &str, namespaced: bool, origin: &Origin) -> String {
    let metadata = map.get("metadata");
    let text = |key: &str| metadata.and_then(|m| m.get(key)).and_then(Value::as_str);
    let namespace = namespaced.then(|| {
        text("namespace")
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
    });
    object_label(kind, namespace, text("name"), origin)
}

fn inherit(map: &mut Mapping, key: &str, value: Option<&String>) {
    if let Some(value) = value
        && !map.contains_key(key)
    {
        map.insert(Value::from(key), Value::from(value.as_str()));
    }
}

fn string_field<'a>(map: &'a Mapping, key: &str) -> Result<&'a str, DocumentError> {
    match map.get(key) {
        None | Some(Value::Null) => Err(DocumentError::Missing),
        Some(Value::String(text)) if text.is_empty() => Err(DocumentError::Missing),
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(DocumentError::NotAString),
    }
}

fn is_istio_security(api_version: &str) -> bool {
    api_version
        .split_once('/')
        .is_some_and(|(group, _)| group == istio::GROUP)
}

fn is_later(api_version: &str) -> bool {
    LATER_GROUPS
        .iter()
        .any(|group| api_version.starts_with(group))
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Parsed {
        parse(Path::new("test.yaml"), text, Format::Yaml)
    }

    fn messages(parsed: &Parsed) -> Vec<String> {
        parsed.errors.iter().map(ToString::to_string).collect()
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: demo\n";

    #[test]
    fn reads_a_multi_document_stream() {
        let text = format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n---\n{POD}---\n# only a comment\n---\n"
        );
        let parsed = yaml(&text);
        assert_eq!(messages(&parsed), Vec::<String>::new());
        assert_eq!(parsed.objects.len(), 2);
        assert!(matches!(parsed.objects[0].object, Object::Namespace(_)));
        assert!(matches!(parsed.objects[1].object, Object::Pod(_)));
        assert_eq!(parsed.objects[1].origin.document, "document 2");
    }

    #[test]
    fn reads_lists_and_typed_lists() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: web, namespace: demo}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: c}\n---\napiVersion: v1\nkind: PodList\nitems:\n- metadata: {name: a, namespace: demo}\n";
        let parsed = yaml(text);
        assert_eq!(messages(&parsed), Vec::<String>::new());
        assert_eq!(parsed.objects.len(), 2);
        assert!(matches!(parsed.objects[0].object, Object::Service(_)));
        assert_eq!(parsed.objects[0].origin.document, "document 1 item 1");
        assert!(matches!(parsed.objects[1].object, Object::Pod(_)));
    }

    #[test]
    fn reads_json() {
        let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}]}"#;
        let parsed = parse(Path::new("state.json"), text, Format::Json);
        assert_eq!(messages(&parsed), Vec::<String>::new());
        assert_eq!(parsed.objects.len(), 1);
        assert_eq!(Format::of(Path::new("a/b.JSON")), Format::Json);
        assert_eq!(Format::of(Path::new("a/b.yml")), Format::Yaml);
    }

    #[test]
    fn skips_other_and_later_kinds() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: security.istio.io/v1\nkind: Sidecar\nmetadata: {name: p}\n---\napiVersion: example.com/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: TLSRoute\nmetadata: {name: g}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: [not, checked]\n";
        let parsed = yaml(text);
        assert!(parsed.errors.is_empty(), "{:?}", messages(&parsed));
        assert!(parsed.objects.is_empty());
    }

    #[test]
    fn reads_endpoint_slices() {
        let text = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: demo}\naddressType: IPv4\nendpoints: []\n";
        let parsed = yaml(text);
        assert!(parsed.errors.is_empty(), "{:?}", messages(&parsed));
        assert!(matches!(parsed.objects[0].object, Object::EndpointSlice(_)));
    }

    #[test]
    fn rejects_yaml_syntax_error_with_line() {
        let text = format!("{POD}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n");
        let parsed = yaml(&text);
        assert_eq!(parsed.objects.len(), 1);
        let errors = messages(&parsed);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("test.yaml: document 2: invalid YAML: "),
            "{errors:?}"
        );
        assert!(errors[0].contains("line 10"), "{errors:?}");
    }

    #[test]
    fn rejects_json_syntax_error_with_line() {
        let parsed = parse(
            Path::new("s.json"),
            "{\"kind\": \"Pod\",\n  oops}",
            Format::Json,
        );
        let errors = messages(&parsed);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("invalid JSON") && errors[0].contains("line 2"),
            "{errors:?}"
        );
    }

    #[test]
    fn rejects_missing_kind_and_api_version() {
        let parsed = yaml("metadata: {name: x}\n---\nkind: Pod\n---\napiVersion: v1\nkind: 7\n");
        assert_eq!(
            messages(&parsed),
            [
                "test.yaml: document 1: kind: is required",
                "test.yaml: document 1: apiVersion: is required",
                "test.yaml: document 2: apiVersion: is required",
                "test.yaml: document 3: kind: must be a string",
            ]
        );
    }

    #[test]
    fn rejects_non_mapping_documents_and_nested_lists() {
        let parsed = yaml(
            "- a\n- b\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: List\n  items: []\n---\napiVersion: v1\nkind: List\nitems: 3\n",
        );
        assert_eq!(
            messages(&parsed),
            [
                "test.yaml: document 1: a document must be a mapping, found a list",
                "test.yaml: document 2 item 1: kind: a List inside a List is not supported",
                "test.yaml: document 3: items: must be a list",
            ]
        );
    }

    #[test]
    fn rejects_wrong_field_type_naming_the_field() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: demo\n  labels: [a, b]\n";
        let parsed = yaml(text);
        let error = &parsed.errors[0];
        assert_eq!(error.object, "Pod demo/client");
        assert_eq!(error.field.as_deref(), Some("metadata.labels"));
        assert!(error.reason.contains("invalid type: sequence"), "{error}");

        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - port: http\n";
        let parsed = yaml(text);
        assert_eq!(parsed.errors[0].object, "Service default/web");
        assert_eq!(
            parsed.errors[0].field.as_deref(),
            Some("spec.ports[0].port")
        );
    }

    #[test]
    fn reads_istio_security_kinds_of_both_versions() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\n---\napiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: b}\n---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: c}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthenticationList\nitems:\n- metadata: {name: d}\n---\napiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {name: e}\n";
        let parsed = yaml(text);
        assert_eq!(messages(&parsed), Vec::<String>::new());
        let kinds: Vec<bool> = parsed
            .objects
            .iter()
            .map(|object| matches!(object.object, Object::AuthorizationPolicy(_)))
            .collect();
        assert_eq!(kinds, [true, true, false, false, false]);
        assert!(matches!(
            parsed.objects[3].object,
            Object::PeerAuthentication(_)
        ));
        assert!(matches!(
            parsed.objects[4].object,
            Object::RequestAuthentication(_)
        ));
    }

    #[test]
    fn rejects_istio_security_kinds_with_wrong_version_or_type() {
        let text = "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b, namespace: shop}\nspec: {rules: [{from: [{source: {ipBlocks: 10.0.0.0/8}}]}]}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: c}\nspec: {mtls: STRICT}\n";
        let errors = messages(&yaml(text));
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(
            errors[0],
            "test.yaml: AuthorizationPolicy shop/a: apiVersion: AuthorizationPolicy is served by apiVersion security.istio.io/v1 or security.istio.io/v1beta1, not \"security.istio.io/v2\""
        );
        assert!(
            errors[1].starts_with("test.yaml: AuthorizationPolicy shop/b: spec.rules[0].from[0].source.ipBlocks: invalid type: string \"10.0.0.0/8\", expected a sequence"),
            "{errors:?}"
        );
        assert!(
            errors[2].starts_with("test.yaml: PeerAuthentication default/c: spec.mtls: invalid type: string \"STRICT\""),
            "{errors:?}"
        );
    }

    #[test]
    fn rejects_core_kind_with_wrong_api_version() {
        let parsed = yaml("apiVersion: apps/v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\n");
        assert_eq!(
            messages(&parsed),
            ["test.yaml: Pod demo/p: apiVersion: Pod is served by apiVersion v1, not \"apps/v1\""]
        );
    }
}
