//! mesh-agent: the node agent of a sidecarless service mesh. It captures enrolled pods' TCP
//! in the kernel (eBPF), carries it through one node proxy, and explains what it does through
//! an admin API and CLI.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod app;
pub mod capture;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod identity;
pub mod proxy;
pub mod shutdown;
pub mod state;
