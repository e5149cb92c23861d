//! mesh-agent: the node agent of a sidecarless service mesh. It captures enrolled pods' TCP
//! in the kernel (eBPF), carries it between nodes in HBONE tunnels (HTTP/2 CONNECT over mutual
//! TLS, as Istio's ztunnel), enforces Istio's L4 policy, and explains what it does through an
//! admin API and CLI.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod app;
pub mod capture;
pub mod cli;
pub mod config;
pub mod crds;
pub mod explain;
pub mod identity;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod shutdown;
pub mod source;
pub mod state;
pub mod waypoint;
