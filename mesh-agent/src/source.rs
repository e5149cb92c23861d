//! Where the agent learns the cluster: a directory of Kubernetes YAML (the local source, in
//! [`crate::state`] for now) or the Kubernetes API ([`kube`]). Both feed the same
//! [`crate::state::Snapshot`]; nothing downstream knows which one did.

pub mod kube;

use std::path::PathBuf;

use serde::Serialize;

/// The state source `mesh-agent run` was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateSource {
    /// `--state PATH`: a file or directory of YAML, polled.
    Files(PathBuf),
    /// The API server: from inside a pod (`KUBERNETES_SERVICE_HOST`), or `--kubeconfig PATH`.
    Kubernetes(kube::Connection),
}
