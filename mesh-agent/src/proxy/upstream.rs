//! Where an outbound connection goes and how: the candidate endpoints of its original
//! destination (one pod, or a Service's ready endpoints in round-robin order) and, per
//! endpoint, the route — an HBONE tunnel to an enrolled pod on another node, in-process for an
//! enrolled pod of this node, or a direct connection for anything outside the mesh.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::net::TcpStream;

use super::socket;
use crate::state::{Service, ServicePort, Snapshot, TargetPort, WaypointUse, Workload};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Route names recorded with each connection.
pub const DIRECT: &str = "direct";
pub const TUNNEL: &str = "tunnel";
pub const LOCAL: &str = "local";
pub const WAYPOINT: &str = "waypoint";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("only IPv4 is supported (got {0})")]
    NotIpv4(SocketAddr),
    #[error("connecting to {destination}: {source}")]
    Connect {
        destination: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {destination}: timed out after {CONNECT_TIMEOUT:?}")]
    Timeout { destination: SocketAddrV4 },
}

/// Opens a plain connection to `destination` from the client's own address, so the
/// destination sees the real client — except to an address of this node itself (a host-network
/// service, the node's DNS cache, the kubelet): its answer to a pod's address would be routed
/// straight to the pod, past the proxy, so that connection comes from the node, as a pod's
/// hairpin connection does.
pub async fn direct(
    source: SocketAddr,
    destination: SocketAddr,
    node: &NodeAddresses,
) -> Result<TcpStream, UpstreamError> {
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) = (source, destination) else {
        return Err(UpstreamError::NotIpv4(destination));
    };
    let from = if node.contains(*destination.ip()) {
        *destination.ip()
    } else {
        *source.ip()
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, socket::connect_as(from, destination)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(UpstreamError::Connect {
            destination,
            source,
        }),
        Err(_) => Err(UpstreamError::Timeout { destination }),
    }
}

/// The node's own IPv4 addresses, refreshed on every reconcile pass (`refresh`), read per
/// direct connection without a syscall.
#[derive(Debug, Default)]
pub struct NodeAddresses(std::sync::RwLock<std::sync::Arc<[std::net::Ipv4Addr]>>);

impl NodeAddresses {
    pub fn contains(&self, ip: std::net::Ipv4Addr) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ip)
    }

    /// Reads the addresses of this network namespace's devices; keeps the last ones when the
    /// kernel cannot be asked.
    pub fn refresh(&self) {
        let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
            return;
        };
        let mut found: Vec<std::net::Ipv4Addr> = addresses
            .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
            .collect();
        found.sort_unstable();
        found.dedup();
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        if **current != *found {
            *current = found.into();
        }
    }
}

/// One place an outbound connection may be sent (borrowing the snapshot it was resolved in:
/// nothing is copied per connection).
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    pub address: SocketAddr,
    pub workload: Option<&'a Workload>,
}

/// The endpoints to try for `destination`, in order, and the service it named, if any.
#[derive(Debug, Clone)]
pub struct Resolved<'a> {
    pub service: Option<String>,
    pub endpoints: Vec<Endpoint<'a>>,
    /// The waypoint the destination uses: the endpoints are then its pods, on 15008, and the
    /// tunnel's authority stays the original destination. With an unusable waypoint there is
    /// no endpoint: its policies cannot be enforced, so nothing goes around it.
    pub waypoint: Option<&'a WaypointUse>,
}

/// Round-robin position per service port.
#[derive(Default)]
pub struct ServiceBalancer {
    next: Mutex<HashMap<(String, u16), std::sync::Arc<AtomicUsize>>>,
}

impl ServiceBalancer {
    fn start(&self, key: (String, u16)) -> usize {
        let counter = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            next.entry(key).or_default().clone()
        };
        counter.fetch_add(1, Ordering::Relaxed)
    }

    /// A service VIP gives its ready endpoints (rotated so each connection starts at the next
    /// one, and the rest follow as fallbacks); any other address is its own single endpoint.
    pub fn resolve<'a>(&self, snapshot: &'a Snapshot, destination: SocketAddr) -> Resolved<'a> {
        self.resolve_with(snapshot, destination, true)
    }

    /// Like [`ServiceBalancer::resolve`] without moving the round robin (for `explain`).
    pub fn peek<'a>(&self, snapshot: &'a Snapshot, destination: SocketAddr) -> Resolved<'a> {
        self.resolve_with(snapshot, destination, false)
    }

    fn resolve_with<'a>(
        &self,
        snapshot: &'a Snapshot,
        destination: SocketAddr,
        advance: bool,
    ) -> Resolved<'a> {
        let IpAddr::V4(ip) = destination.ip() else {
            return Resolved {
                service: None,
                endpoints: vec![Endpoint {
                    address: destination,
                    workload: None,
                }],
                waypoint: None,
            };
        };
        if let Some(service) = snapshot.service_by_ip(ip)
            && let Some(port) = service.ports.iter().find(|p| p.port == destination.port())
        {
            let name = format!("{}/{}", service.namespace, service.name);
            if let Some(used) = snapshot.service_waypoint(service) {
                let endpoints = self.waypoint_pods(snapshot, used, (name.clone(), 0), advance);
                return Resolved {
                    service: Some(name),
                    endpoints,
                    waypoint: Some(used),
                };
            }
            return Resolved {
                endpoints: self.service_endpoints(snapshot, service, port, advance),
                service: Some(name),
                waypoint: None,
            };
        }
        let workload = snapshot.workload_by_ip(ip);
        if let Some(used) = workload.and_then(|w| snapshot.workload_waypoint(w)) {
            let key = (format!("pod {}", destination.ip()), 0);
            return Resolved {
                service: None,
                endpoints: self.waypoint_pods(snapshot, used, key, advance),
                waypoint: Some(used),
            };
        }
        Resolved {
            service: None,
            endpoints: vec![Endpoint {
                address: destination,
                workload,
            }],
            waypoint: None,
        }
    }

    /// The ready endpoints of one port of `service`, rotated (when `advance`) so each call
    /// starts at the next one; the rest follow as fallbacks. Waypoints play no part: this is
    /// where a waypoint itself sends the Service's traffic.
    pub fn service_endpoints<'a>(
        &self,
        snapshot: &'a Snapshot,
        service: &'a Service,
        port: &ServicePort,
        advance: bool,
    ) -> Vec<Endpoint<'a>> {
        let mut slices = snapshot.slices_of(service).peekable();
        let mut endpoints: Vec<Endpoint> = if slices.peek().is_some() {
            // The slices say where the traffic goes: their ready addresses, on the port
            // each slice gives for this service port's name.
            slices
                .flat_map(|slice| {
                    let target = slice.port_for(port.name.as_deref());
                    slice.ready.iter().filter_map(move |&ip| {
                        Some(Endpoint {
                            address: SocketAddr::from((ip, target?)),
                            workload: snapshot.workload_by_ip(ip),
                        })
                    })
                })
                .collect()
        } else {
            snapshot
                .endpoints(service)
                .filter_map(|w| {
                    let target = match &port.target_port {
                        Some(TargetPort::Number(n)) => *n,
                        // Each pod's container port of that name; a pod that declares none is
                        // no endpoint of this port (as in Kubernetes' EndpointSlices).
                        Some(TargetPort::Name(name)) => *w.named_ports.get(name)?,
                        None => port.port,
                    };
                    Some(Endpoint {
                        address: SocketAddr::from((w.ip, target)),
                        workload: Some(w),
                    })
                })
                .collect()
        };
        endpoints.sort_by_key(|e| e.address);
        endpoints.dedup_by_key(|e| e.address);
        if !endpoints.is_empty() && advance {
            let start = self.start((format!("{}/{}", service.namespace, service.name), port.port));
            let len = endpoints.len();
            endpoints.rotate_left(start % len);
        }
        endpoints
    }

    /// A usable waypoint's pods on 15008, rotated like a service's endpoints; none for one
    /// that cannot be used.
    fn waypoint_pods<'a>(
        &self,
        snapshot: &'a Snapshot,
        used: &'a WaypointUse,
        key: (String, u16),
        advance: bool,
    ) -> Vec<Endpoint<'a>> {
        if !used.is_usable() {
            return Vec::new();
        }
        let mut endpoints: Vec<Endpoint> = snapshot
            .waypoint_pods(&used.waypoint)
            .map(|w| Endpoint {
                address: SocketAddr::from((w.ip, mesh_common::TUNNEL_PORT)),
                workload: Some(w),
            })
            .collect();
        endpoints.sort_by_key(|e| e.address);
        if !endpoints.is_empty() && advance {
            let len = endpoints.len();
            endpoints.rotate_left(self.start(key) % len);
        }
        endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        crate::source::local::testing::load_text(text)
            .unwrap_or_else(|errors| panic!("test state must load: {errors}"))
    }

    fn pod(name: &str, ip: &str, ports: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: web}}}}\nspec: {{nodeName: n, containers: [{{name: app, ports: [{ports}]}}]}}\nstatus: {{podIP: \"{ip}\", phase: Running}}\n"
        )
    }

    /// A named targetPort means each pod's own container port of that name; a pod without
    /// one is not an endpoint, as in Kubernetes.
    #[test]
    fn a_named_target_port_is_each_pods_container_port() {
        let text = [
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n".to_string(),
            pod("web-a", "10.0.0.1", "{name: http, containerPort: 8080}"),
            pod("web-b", "10.0.0.2", "{name: http, containerPort: 9090}"),
            pod("web-c", "10.0.0.3", "{name: admin, containerPort: 8080}"),
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: web, port: 80, targetPort: http}, {name: num, port: 81, targetPort: 7070}]}\n".to_string(),
        ]
        .concat();
        let snapshot = snapshot(&text);
        let balancer = ServiceBalancer::default();
        let addresses = |port: u16| -> Vec<String> {
            balancer
                .peek(&snapshot, SocketAddr::from(([10, 96, 0, 10], port)))
                .endpoints
                .iter()
                .map(|e| e.address.to_string())
                .collect()
        };
        assert_eq!(addresses(80), ["10.0.0.1:8080", "10.0.0.2:9090"]);
        assert_eq!(
            addresses(81),
            ["10.0.0.1:7070", "10.0.0.2:7070", "10.0.0.3:7070"]
        );
    }

    /// A Service without a selector is served by its EndpointSlices: ready addresses only, on
    /// the port each slice gives for the service port's name; a pod among them is known as one.
    #[test]
    fn endpoint_slices_serve_a_service() {
        let text = [
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n".to_string(),
            pod("web-a", "10.0.0.1", "{name: http, containerPort: 8080}"),
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: demo}\nspec: {clusterIP: 10.96.0.20, ports: [{name: web, port: 80}]}\n".to_string(),
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ext-1, namespace: demo, labels: {kubernetes.io/service-name: ext}}\naddressType: IPv4\nports: [{name: web, port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}, {addresses: [192.0.2.7]}, {addresses: [192.0.2.8], conditions: {ready: false}}]\n".to_string(),
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ext-2, namespace: demo, labels: {kubernetes.io/service-name: ext}}\naddressType: IPv4\nports: [{name: other, port: 9999}]\nendpoints: [{addresses: [192.0.2.9]}]\n".to_string(),
        ]
        .concat();
        let snapshot = snapshot(&text);
        let resolved =
            ServiceBalancer::default().peek(&snapshot, SocketAddr::from(([10, 96, 0, 20], 80)));
        let endpoints: Vec<(String, Option<&str>)> = resolved
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.workload.map(|w| w.name.as_str())))
            .collect();
        assert_eq!(
            endpoints,
            [
                ("10.0.0.1:8080".to_string(), Some("web-a")),
                ("192.0.2.7:8080".to_string(), None)
            ]
        );
        assert_eq!(resolved.service.as_deref(), Some("demo/ext"));
    }
}
