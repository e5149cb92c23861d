//! Whether the agent's own DaemonSet is being removed. A stopping agent then uninstalls the data
//! plane, so deleting mesh-agent gives the pods their direct network back; otherwise (a rollout,
//! a deleted pod, a node drain) it leaves capture failing closed for the agent that follows, as
//! istio-cni decides between upgrade and removal by asking the API server.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{Api, Client};

/// How long the question may take: the drain runs meanwhile, and an API server that does not
/// answer leaves the data plane in place.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// `namespace/name` of the agent's DaemonSet (`--daemonset`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DaemonSetRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for DaemonSetRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("expected NAMESPACE/NAME, got {text:?}")),
        }
    }
}

impl std::fmt::Display for DaemonSetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What became of the DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Gone, or being deleted: uninstall.
    Removed(&'static str),
    /// Still there: a rollout or a restart; keep the data plane for the next agent.
    Kept,
    /// The API server did not say; keep the data plane (failing closed is the safe side).
    Unknown(String),
}

pub async fn fate(client: Client, daemonset: &DaemonSetRef) -> Fate {
    let api: Api<DaemonSet> = Api::namespaced(client, &daemonset.namespace);
    match tokio::time::timeout(ASK_TIMEOUT, api.get_opt(&daemonset.name)).await {
        Ok(Ok(None)) => Fate::Removed("the DaemonSet is gone"),
        Ok(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => {
            Fate::Removed("the DaemonSet is being deleted")
        }
        Ok(Ok(Some(_))) => Fate::Kept,
        Ok(Err(e)) => Fate::Unknown(e.to_string()),
        Err(_) => Fate::Unknown(format!("no answer within {ASK_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_is_namespace_slash_name() {
        let parsed: DaemonSetRef = "mesh-system/mesh-agent".parse().expect("valid");
        assert_eq!(parsed.to_string(), "mesh-system/mesh-agent");
        for bad in ["mesh-agent", "/mesh-agent", "mesh-system/", "a/b/c", ""] {
            assert!(bad.parse::<DaemonSetRef>().is_err(), "{bad}");
        }
    }
}
