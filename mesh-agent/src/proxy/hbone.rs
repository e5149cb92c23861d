//! HBONE: TCP carried in HTTP/2 CONNECT streams over mutual TLS, port 15008, as Istio's ztunnel
//! speaks it — the client side ([`pool`]) and the server side ([`server`]).

pub mod bridge;
pub mod headers;
pub mod pool;
pub mod server;
