//! The objects the model is built from: Kubernetes objects of the kinds the agent reads, each with
//! the place it came from. Sources produce them ([`crate::source`]); the model never parses text.

use k8s_openapi::api::core::v1 as k8s;

use super::error::Origin;
use super::gateway_api::{GatewayResource, GrpcRouteResource, HttpRouteResource};
use super::istio::{
    AuthorizationPolicyResource, PeerAuthenticationResource, RequestAuthenticationResource,
};

/// A Kubernetes object of a kind the agent reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace(Box<k8s::Namespace>),
    Pod(Box<k8s::Pod>),
    Service(Box<k8s::Service>),
    EndpointSlice(Box<k8s_openapi::api::discovery::v1::EndpointSlice>),
    AuthorizationPolicy(Box<AuthorizationPolicyResource>),
    PeerAuthentication(Box<PeerAuthenticationResource>),
    RequestAuthentication(Box<RequestAuthenticationResource>),
    Gateway(Box<GatewayResource>),
    HttpRoute(Box<HttpRouteResource>),
    GrpcRoute(Box<GrpcRouteResource>),
}

/// An object with the place it came from, so later checks can name the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Sourced<T> {
    pub origin: Origin,
    pub object: T,
}

/// Names an object in messages: `Pod demo/client`, `Namespace demo`, or the document when unnamed.
pub fn object_label(
    kind: &str,
    namespace: Option<&str>,
    name: Option<&str>,
    origin: &Origin,
) -> String {
    match (name.filter(|name| !name.is_empty()), namespace) {
        (Some(name), Some(namespace)) => format!("{kind} {namespace}/{name}"),
        (Some(name), None) => format!("{kind} {name}"),
        (None, _) => origin.document.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_unnamed_objects_by_document() {
        let origin = Origin::new("f.yaml", "document 3");
        assert_eq!(
            object_label("Pod", Some("demo"), None, &origin),
            "document 3"
        );
        assert_eq!(
            object_label("Pod", Some("demo"), Some(""), &origin),
            "document 3"
        );
        assert_eq!(
            object_label("Namespace", None, Some("demo"), &origin),
            "Namespace demo"
        );
    }
}
