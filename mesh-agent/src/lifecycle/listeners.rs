//! The agent's listening sockets: taken over from the agent serving this node, or bound here
//! when there is none.
//!
//! All six are handed over — the proxy's three and the admin, readiness and metrics servers —
//! so the successor needs no port of its own and the kubelet's probes reach whichever process
//! accepts. The process keeps a copy of each while it serves, to offer to a successor, and lets
//! go of them when it stops accepting.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::fd::{AsFd, BorrowedFd},
    time::Duration,
};

use tracing::info;

use super::handover::{self, HandoverError, Previous};
use crate::{config::Config, proxy::socket};

/// How long a predecessor gets to answer a take-over.
const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ListenersError {
    #[error("taking the listeners over from the running agent: {0}")]
    Handover(#[from] HandoverError),
    #[error("binding the {name} listener on {addr}: {source}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("copying the {name} listener: {source}")]
    Copy {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The names and addresses of the agent's listeners.
fn wanted(config: &Config) -> [(&'static str, SocketAddr); 6] {
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    [
        ("outbound", any(mesh_common::OUTBOUND_PORT)),
        ("inbound", any(mesh_common::INBOUND_PORT)),
        ("tunnel", any(mesh_common::TUNNEL_PORT)),
        ("admin", config.admin_addr),
        ("readiness", config.readiness_addr),
        ("metrics", config.metrics_addr),
    ]
}

/// One listening socket per name, in [`wanted`] order.
pub struct Sockets {
    listeners: Vec<(&'static str, TcpListener)>,
}

impl Sockets {
    /// The listener of `name`, as a copy the caller may consume (this set keeps its own).
    pub fn take(&self, name: &'static str) -> Result<TcpListener, ListenersError> {
        let listener = self
            .listeners
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, l)| l)
            .ok_or(ListenersError::Copy {
                name,
                source: std::io::Error::other("no such listener"),
            })?;
        listener
            .try_clone()
            .map_err(|source| ListenersError::Copy { name, source })
    }

    /// What a successor receives.
    pub fn fds(&self) -> Vec<(&'static str, BorrowedFd<'_>)> {
        self.listeners
            .iter()
            .map(|(n, l)| (*n, l.as_fd()))
            .collect()
    }
}

/// The listeners, and the agent they came from, if any.
pub struct Obtained {
    pub sockets: Sockets,
    pub previous: Option<Previous>,
}

/// Takes the listeners over from the agent serving this node, or binds them when none answers.
/// `token`: the hand-over token of the node's pinned data plane (`pins::handover_token`).
pub async fn obtain(config: &Config, token: &str) -> Result<Obtained, ListenersError> {
    let wanted = wanted(config);
    let expected: Vec<(&str, SocketAddr)> = wanted.to_vec();
    if let Some(inherited) =
        handover::take_over(handover::SOCKET_NAME, &expected, TAKE_OVER_TIMEOUT, token).await?
    {
        let mut listeners = Vec::with_capacity(wanted.len());
        let mut got = inherited.listeners;
        for (name, _) in wanted {
            if let Some(at) = got.iter().position(|(n, _)| n == name) {
                listeners.push((name, got.swap_remove(at).1));
            }
        }
        info!(
            pid = inherited.previous.pid,
            version = %inherited.previous.version,
            "took the listeners over from the running agent"
        );
        return Ok(Obtained {
            sockets: Sockets { listeners },
            previous: Some(inherited.previous),
        });
    }
    let mut listeners = Vec::with_capacity(wanted.len());
    for (name, addr) in wanted {
        let bind_error = |source| ListenersError::Bind { name, addr, source };
        let listener = match name {
            "outbound" | "inbound" | "tunnel" => socket::transparent_listener(addr.port()),
            _ => TcpListener::bind(addr),
        }
        .map_err(bind_error)?;
        listeners.push((name, listener));
    }
    Ok(Obtained {
        sockets: Sockets { listeners },
        previous: None,
    })
}
