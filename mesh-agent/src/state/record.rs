//! One object read on its own: the model it yields and what is wrong with it. Everything about
//! an object that does not depend on other objects is done here, once, when the object arrives;
//! a source keeps these records instead of the Kubernetes objects (a large cluster's pods as the
//! API sends them would not fit), and [`super::Snapshot::join`] puts them together.

use std::fmt::Display;
use std::sync::Arc;

use k8s_openapi::Metadata;
use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::authorization::AuthorizationPolicy;
use super::endpoint_slice::EndpointSlice;
use super::error::{Origin, StateError};
use super::gateway_api::{GatewayResource, GrpcRouteResource, HttpRouteResource};
use super::http_route::HttpRoute;
use super::istio::{
    AuthorizationPolicyResource, PeerAuthenticationResource, RequestAuthenticationResource,
};
use super::namespace::{Namespace, namespace_of};
use super::object::{Object, Sourced, object_label};
use super::peer_authentication::PeerAuthentication;
use super::request_authentication::RequestAuthentication;
use super::service::Service;
use super::validate;
use super::waypoint::{Waypoint, WaypointError};
use super::workload::Workload;

/// One object, read.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<M> {
    pub origin: Origin,
    /// `Pod shop/web-1`, as problems name the object.
    pub label: String,
    /// `metadata.namespace` (defaulted) of a namespaced kind; `None` for a Namespace.
    pub namespace: Option<String>,
    /// The model, unless the object yields none (a pod without an IP yet, a slice of IPv6
    /// addresses, an object with a bad field).
    pub model: Option<Arc<M>>,
    /// Each problem of the object; a fail-closed policy has both these and a model.
    pub problems: Vec<StateError>,
}

impl<M> Record<M> {
    /// Reads `object` with `build`, whose problems each name their field.
    fn read<K, E>(
        origin: Origin,
        object: &K,
        namespaced: bool,
        build: impl FnOnce(&K) -> Result<Option<M>, Vec<(String, E)>>,
    ) -> Record<M>
    where
        K: Metadata<Ty = ObjectMeta>,
        E: Display,
    {
        let metadata = object.metadata();
        let namespace = namespaced.then(|| namespace_of(metadata));
        let label = object_label(K::KIND, namespace, metadata.name.as_deref(), &origin);
        let mut record = Record {
            namespace: namespace.map(str::to_string),
            label,
            origin,
            model: None,
            problems: Vec::new(),
        };
        match build(object) {
            Ok(model) => record.model = model.map(Arc::new),
            Err(problems) => {
                record.problems = problems
                    .into_iter()
                    .map(|(field, problem)| record.error(Some(&field), problem))
                    .collect();
            }
        }
        record
    }

    pub fn error(&self, field: Option<&str>, reason: impl Display) -> StateError {
        StateError::new(
            self.origin.file.clone(),
            self.label.clone(),
            field.map(str::to_string),
            reason,
        )
    }
}

/// Records of every kind the model reads, in the order the source gives them (files: the
/// order of the files; the first of two pods claiming one IP keeps it).
#[derive(Debug, Clone, Default)]
pub struct Records {
    pub namespaces: Vec<Arc<Record<Namespace>>>,
    /// Workloads with the enrollment the pod alone decides; the namespace's part is added when
    /// the records are joined.
    pub pods: Vec<Arc<Record<Workload>>>,
    pub services: Vec<Arc<Record<Service>>>,
    pub endpoint_slices: Vec<Arc<Record<EndpointSlice>>>,
    pub authorization_policies: Vec<Arc<Record<AuthorizationPolicy>>>,
    pub peer_authentications: Vec<Arc<Record<PeerAuthentication>>>,
    /// RequestAuthentications; one that cannot be understood has its fail-closed stand-in.
    pub request_authentications: Vec<Arc<Record<RequestAuthentication>>>,
    /// Gateways; only waypoints (class `istio-waypoint`) have a model.
    pub gateways: Vec<Arc<Record<Waypoint>>>,
    /// HTTPRoutes; only those attached to a Service have a model.
    pub http_routes: Vec<Arc<Record<HttpRoute>>>,
    /// GRPCRoutes, in the HTTPRoute model (kind GRPCRoute); only those attached to a Service
    /// have a model.
    pub grpc_routes: Vec<Arc<Record<HttpRoute>>>,
}

impl Records {
    /// Reads the objects of a state directory: unnamed objects and later copies of a name
    /// (which the API server cannot hold, but files can) are reported and left out.
    pub fn read(objects: Vec<Sourced<Object>>) -> (Records, Vec<StateError>) {
        #[derive(Default)]
        struct ByKind {
            namespaces: Vec<Sourced<k8s::Namespace>>,
            pods: Vec<Sourced<k8s::Pod>>,
            services: Vec<Sourced<k8s::Service>>,
            slices: Vec<Sourced<discovery::EndpointSlice>>,
            authorizations: Vec<Sourced<AuthorizationPolicyResource>>,
            peers: Vec<Sourced<PeerAuthenticationResource>>,
            request_authentications: Vec<Sourced<RequestAuthenticationResource>>,
            gateways: Vec<Sourced<GatewayResource>>,
            http_routes: Vec<Sourced<HttpRouteResource>>,
            grpc_routes: Vec<Sourced<GrpcRouteResource>>,
        }
        let mut by_kind = ByKind::default();
        for Sourced { origin, object } in objects {
            match object {
                Object::Namespace(object) => by_kind.namespaces.push(Sourced {
                    origin,
                    object: *object,
                }),
                Object::Pod(object) => by_kind.pods.push(Sourced {
                    origin,
                    object: *object,
                }),
                Object::Service(object) => by_kind.services.push(Sourced {
                    origin,
                    object: *object,
                }),
                Object::EndpointSlice(object) => by_kind.slices.push(Sourced {
                    origin,
                    object: *object,
                }),
                Object::AuthorizationPolicy(object) => by_kind.authorizations.push(Sourced {
                    origin,
                    object: *object,
                }),
                Object::PeerAuthentication(object) => by_kind.peers.push(Sourced {
                    origin,
                    object: *object,
                }),
                Object::RequestAuthentication(object) => {
                    by_kind.request_authentications.push(Sourced {
                        origin,
                        object: *object,
                    })
                }
                Object::Gateway(object) => by_kind.gateways.push(Sourced {
                    origin,
                    object: *object,
                }),
                Object::HttpRoute(object) => by_kind.http_routes.push(Sourced {
                    origin,
                    object: *object,
                }),
                Object::GrpcRoute(object) => by_kind.grpc_routes.push(Sourced {
                    origin,
                    object: *object,
                }),
            }
        }
        fn each<K, M>(
            objects: &[Sourced<K>],
            namespaced: bool,
            read: fn(Origin, &K) -> Record<M>,
            errors: &mut Vec<StateError>,
        ) -> Vec<Arc<Record<M>>>
        where
            K: Metadata<Ty = ObjectMeta>,
        {
            validate::named(objects, namespaced, errors)
                .into_iter()
                .map(|named| Arc::new(read(named.origin.clone(), named.object)))
                .collect()
        }
        let mut errors = Vec::new();
        let records = Records {
            namespaces: each(&by_kind.namespaces, false, namespace, &mut errors),
            pods: each(&by_kind.pods, true, pod, &mut errors),
            services: each(&by_kind.services, true, service, &mut errors),
            endpoint_slices: each(&by_kind.slices, true, endpoint_slice, &mut errors),
            authorization_policies: each(
                &by_kind.authorizations,
                true,
                authorization_policy,
                &mut errors,
            ),
            peer_authentications: each(&by_kind.peers, true, peer_authentication, &mut errors),
            request_authentications: each(
                &by_kind.request_authentications,
                true,
                request_authentication,
                &mut errors,
            ),
            gateways: each(&by_kind.gateways, true, gateway, &mut errors),
            http_routes: each(&by_kind.http_routes, true, http_route, &mut errors),
            grpc_routes: each(&by_kind.grpc_routes, true, grpc_route, &mut errors),
        };
        (records, errors)
    }
}

/// Each problem with the field it names.
fn at_fields<E>(field: impl Fn(&E) -> String) -> impl FnOnce(Vec<E>) -> Vec<(String, E)> {
    move |problems| problems.into_iter().map(|p| (field(&p), p)).collect()
}

pub fn namespace(origin: Origin, namespace: &k8s::Namespace) -> Record<Namespace> {
    Record::read(origin, namespace, false, |namespace| {
        Ok::<_, Vec<(String, String)>>(Some(Namespace::from_k8s(namespace)))
    })
}

pub fn pod(origin: Origin, pod: &k8s::Pod) -> Record<Workload> {
    Record::read(origin, pod, true, |pod| {
        Workload::from_pod(pod).map_err(at_fields(|problem: &super::workload::WorkloadError| {
            problem.field().to_string()
        }))
    })
}

pub fn service(origin: Origin, service: &k8s::Service) -> Record<Service> {
    Record::read(origin, service, true, |service| {
        Service::from_k8s(service)
            .map(Some)
            .map_err(at_fields(super::service::ServiceError::field))
    })
}

pub fn endpoint_slice(origin: Origin, slice: &discovery::EndpointSlice) -> Record<EndpointSlice> {
    Record::read(origin, slice, true, |slice| {
        EndpointSlice::from_k8s(slice)
            .map_err(at_fields(super::endpoint_slice::EndpointSliceError::field))
    })
}

/// A policy that cannot be understood still yields a model: its fail-closed stand-in
/// ([`AuthorizationPolicy::fail_closed`]), beside its problems.
pub fn authorization_policy(
    origin: Origin,
    policy: &AuthorizationPolicyResource,
) -> Record<AuthorizationPolicy> {
    let mut stand_in = None;
    let mut record = Record::read(origin, policy, true, |policy| {
        AuthorizationPolicy::from_resource(policy)
            .map(Some)
            .inspect_err(|problems| {
                stand_in = Some(AuthorizationPolicy::fail_closed(policy, problems));
            })
    });
    if record.model.is_none() {
        record.model = stand_in.map(Arc::new);
    }
    record
}

pub fn peer_authentication(
    origin: Origin,
    policy: &PeerAuthenticationResource,
) -> Record<PeerAuthentication> {
    Record::read(origin, policy, true, |policy| {
        PeerAuthentication::from_resource(policy).map(Some)
    })
}

/// A Gateway of another class than `istio-waypoint` yields no model and no problem.
pub fn gateway(origin: Origin, gateway: &GatewayResource) -> Record<Waypoint> {
    Record::read(origin, gateway, true, |gateway| {
        Waypoint::from_gateway(gateway).map_err(at_fields(WaypointError::field))
    })
}

/// An HTTPRoute attached only to Gateways (ingress) yields no model and no problem.
pub fn http_route(origin: Origin, route: &HttpRouteResource) -> Record<HttpRoute> {
    Record::read(origin, route, true, HttpRoute::from_resource)
}

/// A GRPCRoute, read into the same model as HTTPRoutes; one attached only to Gateways yields no
/// model and no problem.
pub fn grpc_route(origin: Origin, route: &GrpcRouteResource) -> Record<HttpRoute> {
    Record::read(origin, route, true, HttpRoute::from_grpc_resource)
}

/// A RequestAuthentication that cannot be understood still yields a model: its fail-closed
/// stand-in ([`RequestAuthentication::fail_closed`]), beside its problems.
pub fn request_authentication(
    origin: Origin,
    policy: &RequestAuthenticationResource,
) -> Record<RequestAuthentication> {
    let mut stand_in = None;
    let mut record = Record::read(origin, policy, true, |policy| {
        RequestAuthentication::from_resource(policy)
            .map(Some)
            .inspect_err(|problems| {
                stand_in = Some(RequestAuthentication::fail_closed(policy, problems));
            })
    });
    if record.model.is_none() {
        record.model = stand_in.map(Arc::new);
    }
    record
}
