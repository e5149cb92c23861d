//! The cluster state the agent acts on (namespaces, workloads, services, Istio security policies),
//! read from local Kubernetes YAML.
//!
//! Files hold what `kubectl get -o yaml` prints. They are parsed into the k8s-openapi types and the
//! model is built from those ([`Snapshot::build`]), so a Kubernetes API source can share everything
//! after parsing.

mod authorization;
mod cidr;
mod document;
mod endpoint_slice;
mod enrollment;
mod error;
mod istio;
mod namespace;
mod peer_authentication;
pub mod record;
mod service;
mod small_map;
mod snapshot;
mod source;
mod string_match;
mod validate;
mod watch;
mod workload;

pub use authorization::{
    Action, AuthorizationError, AuthorizationPolicy, Condition, ConditionTest, DRY_RUN_ANNOTATION,
    Operation, Rule, Source, Values,
};
pub use cidr::{Cidr, CidrError};
pub use document::{Format, Object, Sourced};
pub use endpoint_slice::EndpointSlice;
pub use enrollment::{Enrollment, ISTIO_MODE_LABEL, MODE_LABEL};
pub use error::{Origin, StateError, StateErrors};
pub use istio::{AuthorizationPolicyResource, PeerAuthenticationResource, WorkloadSelector};
pub use namespace::Namespace;
pub use peer_authentication::{MtlsMode, PeerAuthentication, PeerAuthenticationError};
pub use record::{Record, Records};
pub use service::{Protocol, Service, ServicePort, TargetPort};
pub use small_map::{Labels, SmallMap};
pub use snapshot::Snapshot;
pub use source::load;
pub use string_match::StringMatch;
pub use watch::{POLL_INTERVAL, StateStatus, Watcher, watch};
pub use workload::Workload;

/// For tests anywhere in the crate.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Snapshot, StateErrors};

    /// The snapshot of one state file with this text, loaded the way the agent loads its state.
    pub fn load_text(text: &str) -> Result<Snapshot, StateErrors> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = dir.path().join("test.yaml");
        std::fs::write(&file, text).expect("writable");
        super::load(&file)
    }

    /// The snapshot of this state text with each bad object rejected alone
    /// ([`Snapshot::assemble`]), and the problems; the text must parse.
    pub fn assemble_text(text: &str) -> (Snapshot, Vec<super::StateError>) {
        let file = std::path::Path::new("test.yaml");
        let parsed = super::document::parse(file, text, super::Format::Yaml);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        Snapshot::assemble(parsed.objects, vec![file.into()])
    }
}
