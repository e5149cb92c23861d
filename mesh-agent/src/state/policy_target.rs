//! `targetRefs` of Istio policies: the Gateway, Service or GatewayClass a policy attaches to at a
//! waypoint, as Istio's `ShouldAttachPolicy` reads them. A policy with targets is a waypoint's
//! business only: node agents never apply it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::istio::{WorkloadSelector, nullable};
use super::small_map::Labels;
use super::waypoint::WAYPOINT_CLASS;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Istio's `PolicyTargetReference`, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRefSpec {
    /// The group of the target resource (`""` or `core` for a Service).
    #[serde(default, deserialize_with = "nullable")]
    pub group: String,
    /// The kind of the target resource.
    pub kind: String,
    /// The name of the target resource.
    pub name: String,
    /// The namespace of the referent; Istio allows only the policy's own.
    #[serde(default, deserialize_with = "nullable")]
    pub namespace: Option<String>,
}

/// What a policy attaches to; all in the policy's own namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", content = "name")]
pub enum PolicyTarget {
    /// A waypoint's Gateway: every request the waypoint handles.
    Gateway(String),
    /// A Service: requests to it, at whichever waypoint it uses.
    Service(String),
    /// The `istio-waypoint` class: every waypoint, from a policy in the root namespace (any
    /// other attaches nowhere; the root namespace is the agent's setting, not the object's).
    GatewayClass,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetRefError {
    #[error("must not be empty")]
    EmptyName,
    #[error("{group:?}/{kind} is not a kind a policy attaches to (Gateway, Service, GatewayClass)")]
    UnknownKind { group: String, kind: String },
    #[error("ServiceEntry is not supported: the mesh has no ServiceEntries")]
    ServiceEntry,
    #[error("{0:?} must be the policy's own namespace")]
    OtherNamespace(String),
    #[error("{0:?}: only the istio-waypoint GatewayClass can be targeted")]
    OtherClass(String),
    #[error("cannot be used together with targetRefs or targetRef")]
    SelectorAndTargets,
}

impl TargetRefError {
    /// The sub-field of the reference the problem is in (after `spec.targetRefs[i]`).
    pub fn field(&self) -> &'static str {
        match self {
            TargetRefError::EmptyName | TargetRefError::OtherClass(_) => ".name",
            TargetRefError::UnknownKind { .. } | TargetRefError::ServiceEntry => ".kind",
            TargetRefError::OtherNamespace(_) => ".namespace",
            TargetRefError::SelectorAndTargets => "",
        }
    }
}

impl PolicyTarget {
    /// Reads one reference of a policy in `namespace`.
    pub fn parse(spec: &TargetRefSpec, namespace: &str) -> Result<Self, TargetRefError> {
        if let Some(other) = spec
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty() && *ns != namespace)
        {
            return Err(TargetRefError::OtherNamespace(other.to_string()));
        }
        if spec.name.is_empty() {
            return Err(TargetRefError::EmptyName);
        }
        match (spec.group.as_str(), spec.kind.as_str()) {
            (GATEWAY_GROUP, "Gateway") => Ok(PolicyTarget::Gateway(spec.name.clone())),
            ("" | "core", "Service") => Ok(PolicyTarget::Service(spec.name.clone())),
            (GATEWAY_GROUP, "GatewayClass") if spec.name != WAYPOINT_CLASS => {
                Err(TargetRefError::OtherClass(spec.name.clone()))
            }
            (GATEWAY_GROUP, "GatewayClass") => Ok(PolicyTarget::GatewayClass),
            ("networking.istio.io", "ServiceEntry") => Err(TargetRefError::ServiceEntry),
            (group, kind) => Err(TargetRefError::UnknownKind {
                group: group.to_string(),
                kind: kind.to_string(),
            }),
        }
    }

    /// Whether a policy of `namespace` with this target applies to a request that the waypoint
    /// `gateway` (namespace, name) handles for `service` (namespace, name); `root` is the mesh's
    /// root namespace.
    pub fn attaches(
        &self,
        namespace: &str,
        root: &str,
        gateway: (&str, &str),
        service: Option<(&str, &str)>,
    ) -> bool {
        match self {
            PolicyTarget::Gateway(name) => gateway == (namespace, name.as_str()),
            PolicyTarget::Service(name) => service == Some((namespace, name.as_str())),
            PolicyTarget::GatewayClass => namespace == root,
        }
    }
}

/// What a policy applies to, as written: `selector`, `targetRef` and `targetRefs`.
pub struct Attachment<'a> {
    pub selector: Option<&'a WorkloadSelector>,
    pub target_ref: Option<&'a TargetRefSpec>,
    pub target_refs: &'a [TargetRefSpec],
    /// The policy's namespace.
    pub namespace: &'a str,
}

impl Attachment<'_> {
    /// `spec.selector.matchLabels`; empty (the whole namespace) without one.
    pub fn selector(&self) -> Labels {
        self.selector
            .map(|selector| selector.match_labels.clone().into())
            .unwrap_or_default()
    }

    /// The targets: `None` when neither reference is written. A selector beside them is an
    /// error (Istio's validation refuses both); a reference that cannot be read attaches
    /// nowhere. Every problem comes back with its field.
    pub fn targets(&self) -> (Option<Vec<PolicyTarget>>, Vec<(String, TargetRefError)>) {
        if self.target_ref.is_none() && self.target_refs.is_empty() {
            return (None, Vec::new());
        }
        let (targets, mut errors) =
            parse_targets(self.target_ref, self.target_refs, self.namespace);
        if self.selector.is_some() {
            errors.insert(
                0,
                ("spec.selector".into(), TargetRefError::SelectorAndTargets),
            );
        }
        (Some(targets), errors)
    }
}

/// Reads `targetRef` and `targetRefs` together, as Istio does; each problem comes back with its
/// field path. A reference that cannot be read attaches nowhere; the rest stand.
pub fn parse_targets(
    target_ref: Option<&TargetRefSpec>,
    target_refs: &[TargetRefSpec],
    namespace: &str,
) -> (Vec<PolicyTarget>, Vec<(String, TargetRefError)>) {
    let mut targets = Vec::new();
    let mut errors = Vec::new();
    let fields = target_ref
        .map(|spec| ("spec.targetRef".to_string(), spec))
        .into_iter()
        .chain(
            target_refs
                .iter()
                .enumerate()
                .map(|(index, spec)| (format!("spec.targetRefs[{index}]"), spec)),
        );
    for (field, spec) in fields {
        match PolicyTarget::parse(spec, namespace) {
            Ok(target) if !targets.contains(&target) => targets.push(target),
            Ok(_) => {}
            Err(error) => errors.push((format!("{field}{}", error.field()), error)),
        }
    }
    (targets, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(group: &str, kind: &str, name: &str) -> TargetRefSpec {
        TargetRefSpec {
            group: group.into(),
            kind: kind.into(),
            name: name.into(),
            namespace: None,
        }
    }

    #[test]
    fn reads_the_kinds_istio_attaches() {
        let parse = PolicyTarget::parse;
        assert_eq!(
            parse(&spec(GATEWAY_GROUP, "Gateway", "wp"), "shop"),
            Ok(PolicyTarget::Gateway("wp".into()))
        );
        assert_eq!(
            parse(&spec("", "Service", "echo"), "shop"),
            Ok(PolicyTarget::Service("echo".into()))
        );
        assert_eq!(
            parse(&spec("core", "Service", "echo"), "shop"),
            Ok(PolicyTarget::Service("echo".into()))
        );
        assert_eq!(
            parse(
                &spec(GATEWAY_GROUP, "GatewayClass", "istio-waypoint"),
                "istio-system"
            ),
            Ok(PolicyTarget::GatewayClass)
        );
        assert_eq!(
            parse(
                &spec(GATEWAY_GROUP, "GatewayClass", "istio"),
                "istio-system"
            ),
            Err(TargetRefError::OtherClass("istio".into()))
        );
        assert_eq!(
            parse(&spec("networking.istio.io", "ServiceEntry", "x"), "shop"),
            Err(TargetRefError::ServiceEntry)
        );
        assert!(matches!(
            parse(&spec("", "Gateway", "wp"), "shop"),
            Err(TargetRefError::UnknownKind { .. })
        ));
        assert_eq!(
            parse(&spec("", "Service", ""), "shop"),
            Err(TargetRefError::EmptyName)
        );
        let mut elsewhere = spec("", "Service", "echo");
        elsewhere.namespace = Some("batch".into());
        assert_eq!(
            parse(&elsewhere, "shop"),
            Err(TargetRefError::OtherNamespace("batch".into()))
        );
        elsewhere.namespace = Some("shop".into());
        assert!(parse(&elsewhere, "shop").is_ok());
    }

    #[test]
    fn attaches_by_gateway_service_or_class() {
        let gateway = ("shop", "wp");
        let echo = Some(("shop", "echo"));
        let attaches = |target: PolicyTarget, namespace: &str, service| {
            target.attaches(namespace, "istio-system", gateway, service)
        };
        assert!(attaches(PolicyTarget::Gateway("wp".into()), "shop", echo));
        assert!(!attaches(PolicyTarget::Gateway("wp".into()), "batch", echo));
        assert!(!attaches(
            PolicyTarget::Gateway("other".into()),
            "shop",
            echo
        ));
        assert!(attaches(PolicyTarget::Service("echo".into()), "shop", echo));
        assert!(!attaches(
            PolicyTarget::Service("echo".into()),
            "batch",
            echo
        ));
        assert!(!attaches(
            PolicyTarget::Service("echo".into()),
            "shop",
            None
        ));
        assert!(attaches(PolicyTarget::GatewayClass, "istio-system", None));
        assert!(!attaches(PolicyTarget::GatewayClass, "shop", echo));
    }

    #[test]
    fn every_bad_reference_is_named_and_the_rest_stand() {
        let (targets, errors) = parse_targets(
            Some(&spec(GATEWAY_GROUP, "Gateway", "wp")),
            &[
                spec("", "Service", "echo"),
                spec("apps", "Deployment", "x"),
                spec(GATEWAY_GROUP, "Gateway", "wp"),
                spec("", "Service", ""),
            ],
            "shop",
        );
        assert_eq!(
            targets,
            [
                PolicyTarget::Gateway("wp".into()),
                PolicyTarget::Service("echo".into())
            ]
        );
        let fields: Vec<String> = errors.iter().map(|(f, e)| format!("{f}: {e}")).collect();
        assert_eq!(
            fields,
            [
                "spec.targetRefs[1].kind: \"apps\"/Deployment is not a kind a policy attaches to (Gateway, Service, GatewayClass)",
                "spec.targetRefs[3].name: must not be empty",
            ]
        );
    }
}
