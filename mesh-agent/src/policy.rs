//! Istio security policy for inbound connections, with ztunnel's L4 semantics: which
//! `AuthorizationPolicy`s apply to a workload and whether they allow a connection, and which mTLS
//! mode `PeerAuthentication`s require.
//!
//! Everything here is a pure function of a [`Snapshot`](crate::state::Snapshot), for the proxy to
//! call per connection and the admin API and CLI to explain. Policies are scanned linearly; a
//! caller on a hot path with many policies can keep its own index per snapshot.

mod attachment;
mod authorize;
mod connection;
pub mod explain;
mod matching;
mod mtls;
mod request;
mod scope;

pub use crate::state::MtlsMode;
pub use attachment::{Targeted, WaypointTarget, attached, waypoint_authorization_policies};
pub use authorize::{Decision, authorize, authorize_at_waypoint, authorize_request};
pub use connection::{ConnectionAttributes, namespace_of_principal};
pub use explain::{AppliedPolicy, policies_for};
pub use mtls::mtls_mode;
pub use request::{RequestAttributes, RequestAuth};
pub use scope::Scope;

/// Istio's default root namespace: policies there without a selector apply to the whole mesh.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Shared by the tests of this module's files: a snapshot from YAML, namespaces included.
#[cfg(test)]
mod testing {
    use crate::state::{Snapshot, Workload};

    /// Namespaces `istio-system`, `shop` and `batch`, a pod `shop/cart` (labels `app: cart`,
    /// `tier: web`) and a pod `batch/job` (label `app: cart`), then `extra`.
    pub fn state_text(extra: &str) -> String {
        let mut text = String::new();
        for namespace in ["istio-system", "shop", "batch"] {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"
            ));
        }
        text.push_str(
            "---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, labels: {app: cart, tier: web}}
spec: {nodeName: n, serviceAccountName: cart}
status: {podIP: 10.0.1.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: job, namespace: batch, labels: {app: cart}}
spec: {nodeName: n}
status: {podIP: 10.0.2.1, phase: Running}
",
        );
        text.push_str(extra);
        text
    }

    /// [`state_text`], loaded as the agent loads a state directory.
    pub fn snapshot(extra: &str) -> Snapshot {
        crate::source::local::testing::load_text(&state_text(extra))
            .unwrap_or_else(|errors| panic!("test state must load: {errors}"))
    }

    /// [`state_text`] with each bad object rejected alone, as the Kubernetes source takes it.
    pub fn assembled(extra: &str) -> (Snapshot, Vec<crate::state::StateError>) {
        crate::source::local::testing::assemble_text(&state_text(extra))
    }

    pub fn workload<'a>(snapshot: &'a Snapshot, namespace: &str, name: &str) -> &'a Workload {
        snapshot
            .workload(namespace, name)
            .unwrap_or_else(|| panic!("no workload {namespace}/{name}"))
    }

    /// An `AuthorizationPolicy` document.
    pub fn authorization(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        )
    }
}
