//! The mesh's view of an Istio `PeerAuthentication`: which mTLS mode a workload's inbound traffic requires.
//!
//! Resolution across policies lives in [`crate::policy`].

use super::small_map::Labels;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::Serialize;

use super::istio::{MtlsSpec, PeerAuthenticationResource};
use super::namespace::namespace_of;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    /// `spec.selector.matchLabels`; empty: namespace-wide (mesh-wide in the root namespace).
    pub selector: Labels,
    /// `spec.mtls.mode`.
    pub mode: MtlsMode,
    /// `spec.portLevelMtls`: the mode per workload port; only on policies with a selector.
    pub port_level: BTreeMap<u16, MtlsMode>,
    /// `metadata.creationTimestamp`: when several policies compete, Istio uses the oldest.
    pub created: Option<Time>,
}

/// `mtls.mode`. `Unset` inherits from the level above (workload → namespace → mesh → PERMISSIVE).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    /// mTLS is not required (Istio's sidecars then send plaintext).
    Disable,
    /// mTLS and plaintext are both accepted.
    Permissive,
    /// Only mTLS is accepted.
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }

    fn parse(text: &str) -> Option<MtlsMode> {
        match text {
            "UNSET" => Some(MtlsMode::Unset),
            "DISABLE" => Some(MtlsMode::Disable),
            "PERMISSIVE" => Some(MtlsMode::Permissive),
            "STRICT" => Some(MtlsMode::Strict),
            _ => None,
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A PeerAuthentication the agent cannot use; the field is carried beside it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAuthenticationError {
    #[error("{0:?} is not an mTLS mode (UNSET, DISABLE, PERMISSIVE, STRICT)")]
    UnknownMode(String),
    #[error("{0:?} is not a port number (1-65535)")]
    Port(String),
    #[error(
        "needs a workload selector: mesh-wide and namespace-wide policies cannot set port-level mTLS"
    )]
    PortLevelWithoutSelector,
}

impl PeerAuthentication {
    /// Builds the model, returning every problem with its field. `metadata.name` is checked by the caller.
    pub fn from_resource(
        resource: &PeerAuthenticationResource,
    ) -> Result<Self, Vec<(String, PeerAuthenticationError)>> {
        let spec = &resource.spec;
        let mut errors = Vec::new();
        let mut mode_of = |field: String, mtls: Option<&MtlsSpec>| match mtls
            .and_then(|mtls| mtls.mode.as_deref())
        {
            None => MtlsMode::Unset,
            Some(text) => MtlsMode::parse(text).unwrap_or_else(|| {
                errors.push((field, PeerAuthenticationError::UnknownMode(text.into())));
                MtlsMode::Unset
            }),
        };
        let mode = mode_of("spec.mtls.mode".into(), spec.mtls.as_ref());
        let mut port_level = BTreeMap::new();
        let mut bad_ports = Vec::new();
        for (port, mtls) in &spec.port_level_mtls {
            let field = format!("spec.portLevelMtls[{port}]");
            let mode = mode_of(format!("{field}.mode"), Some(mtls));
            match port.port() {
                Some(number) => {
                    port_level.insert(number, mode);
                }
                None => bad_ports.push((field, PeerAuthenticationError::Port(port.0.clone()))),
            }
        }
        errors.extend(bad_ports);
        let selector = spec
            .selector
            .as_ref()
            .map(|selector| selector.match_labels.clone())
            .unwrap_or_default();
        if selector.is_empty() && !spec.port_level_mtls.is_empty() {
            errors.push((
                "spec.portLevelMtls".into(),
                PeerAuthenticationError::PortLevelWithoutSelector,
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(PeerAuthentication {
            name: resource.metadata.name.clone().unwrap_or_default(),
            namespace: namespace_of(&resource.metadata).to_string(),
            selector: selector.into(),
            mode,
            port_level,
            created: resource.metadata.creation_timestamp.clone(),
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(text: &str) -> Result<PeerAuthentication, Vec<String>> {
        let value: serde_yaml::Value = serde_yaml::from_str(text).expect("yaml");
        let resource: PeerAuthenticationResource =
            serde_path_to_error::deserialize(value).expect("well-typed");
        PeerAuthentication::from_resource(&resource).map_err(|errors| {
            errors
                .into_iter()
                .map(|(field, error)| format!("{field}: {error}"))
                .collect()
        })
    }

    #[test]
    fn builds_modes_and_port_levels() {
        let policy = peer(
            "metadata: {name: p, namespace: shop, creationTimestamp: \"2025-05-01T10:00:00Z\"}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
  portLevelMtls:
    5432: {mode: DISABLE}
    \"8080\": {mode: PERMISSIVE}
    9090: {}
",
        )
        .expect("valid");
        assert_eq!(policy.key(), "shop/p");
        assert_eq!(policy.mode, MtlsMode::Strict);
        assert_eq!(
            policy.port_level,
            BTreeMap::from([
                (5432, MtlsMode::Disable),
                (8080, MtlsMode::Permissive),
                (9090, MtlsMode::Unset)
            ])
        );
        assert!(policy.created.is_some());
    }

    #[test]
    fn every_mode() {
        for (text, mode) in [
            ("UNSET", MtlsMode::Unset),
            ("DISABLE", MtlsMode::Disable),
            ("PERMISSIVE", MtlsMode::Permissive),
            ("STRICT", MtlsMode::Strict),
        ] {
            let policy = peer(&format!(
                "metadata: {{name: p}}\nspec: {{mtls: {{mode: {text}}}}}\n"
            ))
            .expect(text);
            assert_eq!(policy.mode, mode);
            assert_eq!(mode.to_string(), text);
        }
        let policy = peer("metadata: {name: p}\n").expect("valid");
        assert_eq!(
            (policy.mode, policy.namespace.as_str()),
            (MtlsMode::Unset, "default")
        );
    }

    #[test]
    fn rejects_bad_modes_and_ports() {
        let errors = peer(
            "metadata: {name: p}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: strict}
  portLevelMtls:
    0: {mode: STRICT}
    http: {mode: STRICT}
    80: {mode: ON}
",
        )
        .expect_err("malformed");
        assert_eq!(
            errors,
            [
                "spec.mtls.mode: \"strict\" is not an mTLS mode (UNSET, DISABLE, PERMISSIVE, STRICT)",
                "spec.portLevelMtls[80].mode: \"ON\" is not an mTLS mode (UNSET, DISABLE, PERMISSIVE, STRICT)",
                "spec.portLevelMtls[0]: \"0\" is not a port number (1-65535)",
                "spec.portLevelMtls[http]: \"http\" is not a port number (1-65535)",
            ]
        );
    }

    #[test]
    fn port_level_needs_a_selector() {
        let errors = peer(
            "metadata: {name: p}\nspec: {mtls: {mode: STRICT}, portLevelMtls: {80: {mode: DISABLE}}}\n",
        )
        .expect_err("no selector");
        assert_eq!(
            errors,
            [
                "spec.portLevelMtls: needs a workload selector: mesh-wide and namespace-wide policies cannot set port-level mTLS"
            ]
        );
    }
}
