//! The cluster state the agent acts on (namespaces, workloads, services, Istio security policies).
//!
//! The model is built from k8s-openapi objects ([`Object`], [`Snapshot::build`]) or from records of
//! them read one by one ([`Records`], [`Snapshot::join`]); where those came from is the sources'
//! business ([`crate::source`]: local YAML or the Kubernetes API), never the model's.

/// Implements the Kubernetes resource traits for a namespaced custom resource type of the
/// model, so sources can name and list it.
macro_rules! namespaced_resource {
    ($type:ty, $group:literal, $version:literal, $kind:literal, $plural:literal) => {
        impl k8s_openapi::Resource for $type {
            const API_VERSION: &'static str = concat!($group, "/", $version);
            const GROUP: &'static str = $group;
            const VERSION: &'static str = $version;
            const KIND: &'static str = $kind;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $type {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }
    };
}

mod authorization;
mod cidr;
mod endpoint_slice;
mod enrollment;
mod error;
pub mod gateway_api;
mod grpc_route;
mod http_route;
pub mod istio;
mod namespace;
mod object;
mod path_pattern;
mod peer_authentication;
mod policy_target;
pub mod record;
mod request_authentication;
mod service;
mod small_map;
mod snapshot;
mod string_match;
mod use_waypoint;
mod validate;
mod waypoint;
mod workload;

pub use authorization::{
    Action, AuthField, AuthorizationError, AuthorizationPolicy, Condition, ConditionTest,
    DRY_RUN_ANNOTATION, Operation, Rule, Source, Values,
};
pub use cidr::{Cidr, CidrError};
pub use endpoint_slice::EndpointSlice;
pub use enrollment::{Enrollment, ISTIO_MODE_LABEL, MODE_LABEL};
pub use error::{Origin, StateError, StateErrors};
pub use http_route::{
    Backend, BackendService, Filter, HeaderModifier, HttpRoute, HttpRouteError, Mirror, PathMatch,
    PathModifier, Pattern, Redirect, Retry, Rewrite, RouteKind, RouteMatch, RouteRule,
    ServiceParent, ValueMatch,
};
pub use istio::{
    AuthorizationPolicyResource, PeerAuthenticationResource, RequestAuthenticationResource,
    WorkloadSelector,
};
pub use namespace::{DEFAULT_NAMESPACE, Namespace};
pub use object::{Object, Sourced, object_label};
pub use path_pattern::{PathPattern, PathPatternError};
pub use peer_authentication::{MtlsMode, PeerAuthentication, PeerAuthenticationError};
pub use policy_target::{PolicyTarget, TargetRefError, TargetRefSpec, parse_targets};
pub use record::{Record, Records};
pub use request_authentication::{
    ClaimToHeader, DEFAULT_JWKS_TIMEOUT, Jwks, JwksError, JwtRule, KeySource, MAX_JWKS_BYTES,
    MAX_JWKS_KEYS, RequestAuthentication, RequestAuthenticationError, TokenLocation,
    waypoint_request_authentications,
};
pub use service::{AppProtocol, Protocol, Service, ServicePort, TargetPort};
pub use small_map::{Labels, SmallMap};
pub use snapshot::Snapshot;
pub use string_match::StringMatch;
pub use use_waypoint::{
    Consumer, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL, UseWaypointError, WaypointRef,
    WaypointUse,
};
pub use waypoint::{
    AllowedNamespaces, GATEWAY_NAME_LABEL, MANAGED_BY_MESH, MANAGED_LABEL, WAYPOINT_CLASS,
    Waypoint, WaypointError, WaypointFor,
};
pub use workload::Workload;
