//! Where the agent learns the cluster: a directory of Kubernetes YAML ([`local`]) or the
//! Kubernetes API ([`kube`]). Each only produces objects for the model in [`crate::state`]; both
//! feed the same [`crate::state::Snapshot`] and report a [`StateStatus`]; nothing downstream
//! knows which one did.

pub mod kube;
pub mod local;

use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

use crate::state::StateError;

/// The state source `mesh-agent run` was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateSource {
    /// `--state PATH`: a file or directory of YAML, polled.
    Files(PathBuf),
    /// The API server: from inside a pod (`KUBERNETES_SERVICE_HOST`), or `--kubeconfig PATH`.
    Kubernetes(kube::Connection),
}

/// How the state source is doing; served by the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateStatus {
    pub path: PathBuf,
    /// 1 for the first snapshot, +1 for each one published since.
    pub generation: u64,
    /// When the published snapshot was loaded.
    pub last_loaded: Option<SystemTime>,
    /// Every problem of the current files, one per line; `None` when they are good.
    pub last_error: Option<String>,
    /// The same problems, structured.
    pub errors: Vec<StateError>,
    /// When the current files were found bad.
    pub last_failed: Option<SystemTime>,
}
