//! The L7 waypoint (`mesh-agent waypoint`): terminates HBONE for the Services that use it and
//! applies Istio's L7 policy and Gateway API routes to their HTTP before it goes on to an
//! endpoint over HBONE, with the waypoint's own identity.

pub mod filters;
pub mod routing;
