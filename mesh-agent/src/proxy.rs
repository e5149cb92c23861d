//! The node proxy: one process serving every enrolled pod on the node.
//!
//! Listeners (all `IP_TRANSPARENT`, fed by the capture programs with `bpf_sk_assign`):
//! - outbound (15001): connections an enrolled pod opens; the socket's local address is the
//!   original destination.
//! - inbound (15006): plain TCP addressed to an enrolled pod (PeerAuthentication decides whether
//!   plaintext is accepted at all).
//! - tunnel (15008): HBONE — HTTP/2 CONNECT over mutual TLS from other nodes' proxies.
//!
//! Outbound connections to enrolled pods on other nodes travel in HBONE tunnels; to enrolled
//! pods of this node they are served in-process; to anything else, directly.

pub mod connections;
pub mod forward;
pub mod hbone;
pub mod inbound;
pub mod keepalive;
pub mod limits;
pub mod outbound;
pub mod socket;
pub mod upstream;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tracing::{info, warn};

use self::{
    connections::{ConnectionGuard, ConnectionInfo, Connections, WorkloadRef},
    hbone::pool::Pool,
};
use crate::{
    identity::{CertificateManager, Identity},
    metrics::Metrics,
    policy::{self, ConnectionAttributes},
    state::{Snapshot, Workload},
};

/// Mesh-wide settings the proxy applies.
#[derive(Debug, Clone, Serialize)]
pub struct MeshConfig {
    pub trust_domain: String,
    /// Namespace whose selector-less policies apply to the whole mesh (Istio: `istio-system`).
    pub root_namespace: String,
}

impl MeshConfig {
    /// The SPIFFE identity of a pod in this mesh. `None` only for names no SPIFFE id can carry,
    /// which Kubernetes would not admit; such a pod is treated as outside the mesh.
    pub fn identity_of(&self, workload: &Workload) -> Option<Identity> {
        Identity::new(
            &self.trust_domain,
            &workload.namespace,
            &workload.service_account,
        )
        .ok()
    }
}

/// What every connection handler needs.
pub struct ProxyContext {
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node: String,
    pub mesh: MeshConfig,
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub connections: Connections,
    pub certs: CertificateManager,
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    pub services: upstream::ServiceBalancer,
    /// Turns true when this process stops accepting (stop, or a successor took over): long-lived
    /// tunnels then tell their peers to open new ones elsewhere (HTTP/2 GOAWAY).
    pub draining: watch::Receiver<bool>,
    /// This node's own addresses: connections to them come from the node, not the pod.
    pub node_addresses: upstream::NodeAddresses,
    /// What peers and pods may make the proxy hold.
    pub limits: Arc<limits::Limits>,
    pub keepalive: keepalive::KeepaliveSettings,
}

impl ProxyContext {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.borrow().clone()
    }

    /// An enrolled pod of this node with this IP, in `snapshot` (borrowed: nothing is copied
    /// per connection).
    pub fn local_enrolled<'a>(&self, snapshot: &'a Snapshot, ip: IpAddr) -> Option<&'a Workload> {
        let IpAddr::V4(ip) = ip else { return None };
        snapshot
            .workload_by_ip(ip)
            .filter(|w| w.node == self.node && w.is_enrolled())
    }

    /// The SPIFFE identity of a pod. `None` only for names no SPIFFE id can carry, which
    /// Kubernetes would not admit; such a pod is treated as outside the mesh.
    pub fn identity_of(&self, workload: &Workload) -> Option<Identity> {
        self.mesh.identity_of(workload)
    }

    /// Applies the destination's authorization policies in `snapshot` to a connection about to
    /// be served: registers it when allowed; records, counts and logs it when denied.
    pub fn admit(
        &self,
        snapshot: &Snapshot,
        info: ConnectionInfo,
        destination: &Workload,
    ) -> Option<ConnectionGuard> {
        let attributes = attributes(&info);
        let decision = policy::authorize(
            snapshot,
            &self.mesh.root_namespace,
            destination,
            &attributes,
        );
        for note in &decision.dry_run {
            info!(src = %info.source, dst = %info.destination, note, "dry-run policy");
        }
        if decision.allowed {
            return Some(self.connections.open(info));
        }
        warn!(src = %info.source, dst = %info.destination, policy = decision.policy.as_deref().unwrap_or("-"), reason = %decision.reason, "connection denied");
        self.connections
            .deny(info, decision.policy.as_deref(), &decision.reason);
        None
    }
}

/// The policy view of a connection.
pub fn attributes(info: &ConnectionInfo) -> ConnectionAttributes {
    connection_attributes(
        info.source.ip(),
        info.source_identity.as_deref(),
        info.destination,
    )
}

/// The policy view of a connection from `source` (with its SPIFFE identity, if any) to
/// `destination`; `explain` uses the same function, so it decides exactly as the proxy does.
pub fn connection_attributes(
    source: IpAddr,
    identity: Option<&str>,
    destination: SocketAddr,
) -> ConnectionAttributes {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
    };
    let principal = identity.map(|id| id.strip_prefix("spiffe://").unwrap_or(id).to_string());
    let source_namespace = principal
        .as_deref()
        .and_then(policy::namespace_of_principal)
        .map(str::to_string);
    ConnectionAttributes {
        source_ip: v4(source),
        source_principal: principal,
        source_namespace,
        destination_ip: v4(destination.ip()),
        destination_port: destination.port(),
    }
}

/// The pod with this address in `snapshot`, if known.
pub fn workload_ref_at(snapshot: &Snapshot, addr: SocketAddr) -> Option<WorkloadRef> {
    let IpAddr::V4(ip) = addr.ip() else {
        return None;
    };
    snapshot.workload_by_ip(ip).map(workload_ref)
}

pub fn workload_ref(w: &Workload) -> WorkloadRef {
    WorkloadRef {
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        app: w.labels.value("app").map(str::to_string),
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
        let bind_error = |source| ProxyError::Bind {
            listener: name,
            port,
            source,
        };
        let listener = socket::transparent_listener(port).map_err(bind_error)?;
        Self::from_std(name, listener).map_err(bind_error)
    }

    /// A listener bound elsewhere (by this process, or by the agent it took over from).
    /// Must be called within the runtime that will serve it.
    pub fn from_std(name: &'static str, listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            name,
            listener: TcpListener::from_std(listener)?,
        })
    }

    pub fn address(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `shutdown` turns true, then waits for its connections to finish (the
    /// caller bounds that wait with the drain timeout).
    pub async fn run<C, F, Fut>(self, ctx: Arc<C>, mut shutdown: watch::Receiver<bool>, handle: F)
    where
        F: Fn(Arc<C>, tokio::net::TcpStream, SocketAddr) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Ok(addr) = self.address() {
            info!(component = self.name, address = %addr, "listener established");
        }
        // Each connection's task holds a sender; when the last is gone, `drained` ends. Unlike a
        // JoinSet, a connection that ends wakes nobody here.
        let (open, mut drained) = mpsc::channel::<()>(1);
        loop {
            tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Boxed once here: the handler's future is KiBs, and the spawn would
                        // otherwise copy it several times over.
                        let task = Box::pin(handle(ctx.clone(), stream, peer));
                        let open = open.clone();
                        tokio::spawn(async move {
                            task.await;
                            drop(open);
                        });
                    }
                    Err(e) => {
                        warn!(component = self.name, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(self.listener);
        info!(
            component = self.name,
            open = open.strong_count() - 1,
            "listener closed, draining"
        );
        drop(open);
        let _ = drained.recv().await;
    }
}
