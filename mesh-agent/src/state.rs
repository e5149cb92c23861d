//! The cluster state the agent acts on (namespaces, workloads, services), read from local Kubernetes YAML.
//!
//! Files hold what `kubectl get -o yaml` prints. They are parsed into the k8s-openapi types and the
//! model is built from those ([`Snapshot::build`]), so a Kubernetes API source can share everything
//! after parsing.

mod document;
mod enrollment;
mod error;
mod namespace;
mod service;
mod snapshot;
mod source;
mod validate;
mod watch;
mod workload;

pub use document::{Format, Object, Sourced};
pub use enrollment::{Enrollment, ISTIO_MODE_LABEL, MODE_LABEL};
pub use error::{Origin, StateError, StateErrors};
pub use namespace::Namespace;
pub use service::{Protocol, Service, ServicePort, TargetPort};
pub use snapshot::Snapshot;
pub use source::load;
pub use watch::{POLL_INTERVAL, StateStatus, Watcher, watch};
pub use workload::Workload;
