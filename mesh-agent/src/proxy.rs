//! The node proxy: one process serving every enrolled pod on the node.
//!
//! Listeners (all `IP_TRANSPARENT`, fed by the capture programs with `bpf_sk_assign`):
//! - outbound (15001): connections an enrolled pod opens; the socket's local address is the
//!   original destination.
//! - inbound (15006): plain TCP addressed to an enrolled pod.
//!
//! Each accepted connection becomes a [`connections::ConnectionInfo`] and is forwarded through
//! an [`upstream`] connection. Today that is a direct (plaintext) connection that keeps the
//! client's address; the HBONE tunnel slots in as another way of reaching the destination.

pub mod connections;
pub mod forward;
pub mod inbound;
pub mod outbound;
pub mod socket;
pub mod upstream;

use std::{io, net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{info, warn};

use crate::state::Snapshot;
use self::connections::Connections;

/// What every connection handler needs.
pub struct ProxyContext {
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node: String,
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub connections: Connections,
}

impl ProxyContext {
    /// `namespace/name` of the pod with this IP, if known.
    pub fn workload_name(&self, addr: SocketAddr) -> Option<String> {
        let SocketAddr::V4(addr) = addr else { return None };
        let snapshot = self.state.borrow();
        snapshot.workload_by_ip(*addr.ip()).map(|w| format!("{}/{}", w.namespace, w.name))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding the {listener} listener on port {port}: {source}")]
    Bind {
        listener: &'static str,
        port: u16,
        #[source]
        source: io::Error,
    },
}

/// A listener of the proxy. Same shape for each: `bind`, `address`, `run`.
pub struct Listener {
    name: &'static str,
    listener: TcpListener,
}

impl Listener {
    pub fn bind(name: &'static str, port: u16) -> Result<Self, ProxyError> {
        let listener = socket::transparent_listener(port)
            .map_err(|source| ProxyError::Bind { listener: name, port, source })?;
        Ok(Self { name, listener })
    }

    pub fn address(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `shutdown` turns true, then waits for its connections to finish (the
    /// caller bounds that wait with the drain timeout).
    pub async fn run<F, Fut>(
        self,
        ctx: Arc<ProxyContext>,
        mut shutdown: watch::Receiver<bool>,
        handle: F,
    ) where
        F: Fn(Arc<ProxyContext>, tokio::net::TcpStream, SocketAddr) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Ok(addr) = self.address() {
            info!(component = self.name, address = %addr, "listener established");
        }
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tasks.spawn(handle(ctx.clone(), stream, peer));
                    }
                    Err(e) => {
                        warn!(component = self.name, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(self.listener);
        info!(component = self.name, open = tasks.len(), "listener closed, draining");
        while tasks.join_next().await.is_some() {}
    }
}

/// Registers the connection, opens its upstream and forwards until both sides are done.
async fn carry(ctx: &ProxyContext, client: tokio::net::TcpStream, info: connections::ConnectionInfo) {
    let (source, destination) = (info.source, info.original_destination);
    let mut guard = ctx.connections.open(info);
    match upstream::connect(source, destination).await {
        Ok(up) => {
            if let Err(e) = forward::bidirectional(client, up, guard.counts()).await {
                guard.fail(e);
            }
        }
        Err(e) => {
            socket::reset_on_close(&client);
            guard.fail(e);
        }
    }
}
