//! Outbound: a connection an enrolled pod opened, captured on its way out. It goes to the
//! original destination (or one of its Service's endpoints) through a tunnel, in-process, or
//! directly, and a failed connect moves on to the next endpoint.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    ProxyContext,
    connections::{ConnectionInfo, Direction, Security},
    forward,
    hbone::{
        bridge::{self, Answer, Sender, Side},
        pool::{PoolKey, TunnelError},
    },
    socket, upstream, workload_ref,
};
use crate::state::{Snapshot, Workload};

pub async fn handle(ctx: Arc<ProxyContext>, client: TcpStream, peer: SocketAddr) {
    // The transparent socket's local address is where the pod was connecting to.
    let Ok(original_destination) = client.local_addr() else {
        return;
    };
    // Counted before anything is decided: a source at its limit costs nothing more.
    let Ok(mut permit) = ctx.limits.connection(peer.ip()) else {
        socket::reset_on_close(&client);
        return;
    };
    // Decided while the state is at hand; the state is let go before any waiting, so a long
    // connection does not pin the state it started under.
    let Plan {
        service,
        candidates,
        attempts,
        unusable_waypoint,
    } = plan(&ctx, &ctx.snapshot(), peer, original_destination);
    debug!(src = %peer, dst = %original_destination, candidates, "outbound connection captured");

    let mut last_error = None;
    for Attempt {
        address,
        authority,
        info,
        route,
    } in attempts
    {
        if let Err(limit) = permit.to(address.ip()) {
            last_error = Some(format!("{limit} limit reached"));
            continue;
        }
        match route {
            Route::Local(destination) => {
                let Some(mut guard) = ctx.admit(&ctx.snapshot(), info, &destination) else {
                    socket::reset_on_close(&client);
                    return;
                };
                match upstream::direct(peer, address, &ctx.node_addresses).await {
                    Ok(up) => {
                        if let Err(e) = forward::bidirectional(client, up, guard.counts()).await {
                            guard.fail(e);
                        }
                        return;
                    }
                    Err(e) => {
                        guard.fail(&e);
                        last_error = Some(e.to_string());
                    }
                }
            }
            Route::Tunnel(key) => {
                // With one possible destination the client's bytes follow the request at once
                // (those already sent ride in the request's packet); with several, wait for the
                // answer so a failure can move on to the next.
                let (opened, first) = if candidates == 1 {
                    let first = bridge::already_received(&client);
                    let opened = ctx
                        .pool
                        .connect_early(&key, authority, peer)
                        .await
                        .map(|s| (s.send, Answer::Pending(s.response), s.guard));
                    (opened, first)
                } else {
                    let opened = ctx
                        .pool
                        .connect(&key, authority, peer)
                        .await
                        .map(|s| (s.send, Answer::Ready(s.recv), s.guard));
                    (opened, Bytes::new())
                };
                match opened {
                    Ok((send, answer, stream_guard)) => {
                        let mut guard = ctx.connections.open(info);
                        let counts = guard.counts();
                        if let Err(e) = bridge::bridge(
                            client,
                            Sender::Ready(send),
                            answer,
                            first,
                            &counts,
                            Side::Client,
                        )
                        .await
                        {
                            guard.fail(e);
                        }
                        drop(stream_guard);
                        return;
                    }
                    Err(TunnelError::Refused { status: 401, .. }) => {
                        // Denied at the destination: that node recorded and logged it.
                        warn!(src = %peer, dst = %address, "connection denied by the destination's policy");
                        let mut guard = ctx.connections.open(info);
                        guard.fail("denied by the destination's policy");
                        socket::reset_on_close(&client);
                        return;
                    }
                    Err(e) => {
                        warn!(src = %peer, dst = %address, error = %e, "tunnel failed");
                        // Counted like the destination's refusals: a rogue or broken server
                        // on 15008 shows in the metrics of the node that refused it.
                        ctx.metrics.refused("outbound", e.reason());
                        let mut guard = ctx.connections.open(info);
                        guard.fail(&e);
                        last_error = Some(e.to_string());
                    }
                }
            }
            Route::Direct => match upstream::direct(peer, address, &ctx.node_addresses).await {
                Ok(up) => {
                    let mut guard = ctx.connections.open(info);
                    if let Err(e) = forward::bidirectional(client, up, guard.counts()).await {
                        guard.fail(e);
                    }
                    return;
                }
                Err(e) => {
                    let mut guard = ctx.connections.open(info);
                    guard.fail(&e);
                    last_error = Some(e.to_string());
                }
            },
        }
    }
    if let Some(problem) = &unusable_waypoint {
        warn!(src = %peer, dst = %original_destination, service = service.as_deref().unwrap_or("-"), %problem, "waypoint cannot be used; connection refused");
        ctx.metrics.refused("outbound", "waypoint unusable");
    } else if candidates == 0 {
        warn!(src = %peer, dst = %original_destination, service = service.as_deref().unwrap_or("-"), "no ready endpoint");
        ctx.metrics.refused("outbound", "no endpoint");
    } else {
        debug!(src = %peer, dst = %original_destination, error = last_error.as_deref().unwrap_or("-"), "every endpoint failed");
    }
    socket::reset_on_close(&client);
}

/// How one endpoint is reached.
enum Route {
    /// Enrolled on both ends, same node: served here, under the destination's policy (the
    /// destination is kept for that decision, made when this endpoint is tried).
    Local(Workload),
    /// Enrolled destination elsewhere: HBONE to its node, as the source workload.
    Tunnel(PoolKey),
    /// Outside the mesh (or a source we cannot vouch for): plaintext, as before.
    Direct,
}

/// One endpoint to try, with what the connection is recorded as if it goes there.
struct Attempt {
    /// The endpoint: a pod or outside address, or a waypoint's pod on 15008.
    address: SocketAddr,
    /// What a tunnel's CONNECT asks for: the endpoint, or for a waypoint the original
    /// destination (the Service VIP and port, as ztunnel sends it).
    authority: SocketAddr,
    info: ConnectionInfo,
    route: Route,
}

struct Plan {
    /// `namespace/name` of the Service the client dialed, if it did.
    service: Option<String>,
    /// Endpoints the destination resolved to (a few may have no usable route).
    candidates: usize,
    attempts: Vec<Attempt>,
    /// Why the destination's waypoint cannot be used (then there is no attempt).
    unusable_waypoint: Option<String>,
}

/// The endpoints of `original_destination` in the order to try them, and how to reach each.
fn plan(
    ctx: &ProxyContext,
    snapshot: &Snapshot,
    peer: SocketAddr,
    original_destination: SocketAddr,
) -> Plan {
    let source = match peer.ip() {
        IpAddr::V4(ip) => snapshot.workload_by_ip(ip),
        IpAddr::V6(_) => None,
    };
    let source_identity = source
        .filter(|w| w.is_enrolled())
        .and_then(|w| ctx.identity_of(w));
    let resolved = ctx.services.resolve(snapshot, original_destination);
    let via_waypoint = resolved.waypoint.is_some();
    let attempts = resolved
        .endpoints
        .iter()
        .filter_map(|endpoint| {
            let destination_workload = endpoint.workload.filter(|w| w.is_enrolled());
            let destination_identity = destination_workload.and_then(|w| ctx.identity_of(w));
            let mut info = ConnectionInfo {
                direction: Direction::Outbound,
                source: peer,
                source_workload: source.map(workload_ref),
                source_identity: source_identity.as_ref().map(|i| i.to_string()),
                source_certificate_serial: None,
                original_destination,
                destination_service: resolved.service.clone(),
                destination_workload: endpoint.workload.map(workload_ref),
                destination: endpoint.address,
                destination_identity: destination_identity.as_ref().map(|i| i.to_string()),
                route: upstream::DIRECT,
                security: Security::None,
            };
            if via_waypoint {
                return waypoint_attempt(ctx, endpoint, source_identity.as_ref(), info, peer);
            }
            let route = match (
                destination_workload.zip(destination_identity),
                &source_identity,
            ) {
                (Some((dst, _)), Some(_)) if dst.node == ctx.node => {
                    info.route = upstream::LOCAL;
                    info.security = Security::MutualTls;
                    Route::Local(dst.clone())
                }
                (Some((_, dst_id)), Some(src_id)) => {
                    info.route = upstream::TUNNEL;
                    info.security = Security::MutualTls;
                    let (SocketAddr::V4(peer4), IpAddr::V4(dst_ip)) = (peer, endpoint.address.ip())
                    else {
                        return None;
                    };
                    Route::Tunnel(PoolKey {
                        source: src_id.clone(),
                        source_ip: *peer4.ip(),
                        destination: dst_id,
                        address: SocketAddrV4::new(dst_ip, mesh_common::TUNNEL_PORT),
                    })
                }
                _ => Route::Direct,
            };
            Some(Attempt {
                address: endpoint.address,
                authority: endpoint.address,
                info,
                route,
            })
        })
        .collect();
    Plan {
        unusable_waypoint: resolved.waypoint.and_then(|used| used.problem.clone()),
        service: resolved.service,
        candidates: resolved.endpoints.len(),
        attempts,
    }
}

/// A waypoint pod to try: HBONE to it on 15008 as the source workload, asking for the original
/// destination. A source without an identity cannot go through a waypoint (nor around it).
fn waypoint_attempt(
    ctx: &ProxyContext,
    endpoint: &upstream::Endpoint<'_>,
    source_identity: Option<&crate::identity::Identity>,
    mut info: ConnectionInfo,
    peer: SocketAddr,
) -> Option<Attempt> {
    let source = source_identity?;
    let waypoint = ctx.identity_of(endpoint.workload?)?;
    let (SocketAddr::V4(peer4), SocketAddr::V4(address)) = (peer, endpoint.address) else {
        return None;
    };
    info.destination_identity = Some(waypoint.to_string());
    info.route = upstream::WAYPOINT;
    info.security = Security::MutualTls;
    Some(Attempt {
        address: endpoint.address,
        authority: info.original_destination,
        info,
        route: Route::Tunnel(PoolKey {
            source: source.clone(),
            source_ip: *peer4.ip(),
            destination: waypoint,
            address,
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use tokio::sync::watch;

    use super::*;
    use crate::{
        identity::{CertificateAuthority, CertificateManager, Identity},
        metrics::Metrics,
        proxy::{
            MeshConfig,
            connections::Connections,
            hbone::pool::{Pool, PoolSettings},
            keepalive::KeepaliveSettings,
            limits::{LimitSettings, Limits},
            upstream::ServiceBalancer,
        },
    };

    /// Namespaces `shop` (enrolled) and `legacy` (not); on node `n1` the pods `shop/web-1`
    /// (10.0.1.1), `legacy/batch-1` (10.0.1.2) and `shop/cart-1` (10.0.1.3), on `n2`
    /// `shop/web-2` (10.0.2.1), `legacy/batch-2` (10.0.2.2) and `shop/plain-2` (10.0.2.3,
    /// released from the mesh by its label). The Service `shop/web` (10.96.0.10:80 -> 8080)
    /// selects `app: web` in `shop`: web-1, web-2 and plain-2.
    const STATE: &str = "---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {mesh-agent.dev/mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.0.1.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: batch-1, namespace: legacy, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: batch}
status: {podIP: 10.0.1.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {nodeName: n1, serviceAccountName: cart}
status: {podIP: 10.0.1.3, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 10.0.2.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: batch-2, namespace: legacy, labels: {app: web}}
spec: {nodeName: n2, serviceAccountName: batch}
status: {podIP: 10.0.2.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-2, namespace: shop, labels: {app: web, mesh-agent.dev/mode: none}}
spec: {nodeName: n2, serviceAccountName: plain}
status: {podIP: 10.0.2.3, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: none}, ports: [{port: 80}]}
";

    /// The proxy of node `n1` over [`STATE`].
    fn context() -> ProxyContext {
        let snapshot = crate::source::local::testing::load_text(STATE)
            .unwrap_or_else(|errors| panic!("test state must load: {errors}"));
        context_over(snapshot)
    }

    /// [`STATE`] with a waypoint `shop/waypoint` (its pod `waypoint-0`, 10.0.2.9 on `n2`,
    /// service account `waypoint`), and `extra` (labels that use it) appended.
    fn waypoint_state(extra: &str) -> String {
        format!(
            "{STATE}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: shop, labels: {{istio.io/waypoint-for: all}}}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: shop
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint, gateway.istio.io/managed: istio.io-mesh-controller}}
spec: {{nodeName: n2, serviceAccountName: waypoint}}
status: {{podIP: 10.0.2.9, phase: Running}}
{extra}"
        )
    }

    fn context_over(snapshot: Snapshot) -> ProxyContext {
        let ca = Arc::new(CertificateAuthority::self_signed("cluster.local").unwrap());
        let certs = CertificateManager::new(ca, Duration::from_secs(3600));
        let metrics = Arc::new(Metrics::new());
        ProxyContext {
            node: "n1".into(),
            mesh: MeshConfig {
                trust_domain: "cluster.local".into(),
                root_namespace: "istio-system".into(),
            },
            state: watch::channel(Arc::new(snapshot)).1,
            connections: Connections::new(metrics.clone()),
            pool: Pool::new(
                PoolSettings::default(),
                KeepaliveSettings::default(),
                certs.clone(),
            ),
            certs,
            limits: Limits::new(LimitSettings::for_open_files(1 << 20), metrics.clone()),
            metrics,
            services: ServiceBalancer::default(),
            draining: watch::channel(false).1,
            node_addresses: Default::default(),
            keepalive: KeepaliveSettings::default(),
        }
    }

    fn id(namespace: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", namespace, sa).unwrap()
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// The route of each attempt, in order: `tunnel <key>`, `local <ns/name>` or `direct`,
    /// with the address tried and what the record says.
    fn routes(plan: &Plan) -> Vec<String> {
        plan.attempts
            .iter()
            .map(|a| {
                let route = match &a.route {
                    Route::Local(w) => format!("local {}/{}", w.namespace, w.name),
                    Route::Tunnel(k) => format!(
                        "tunnel {} from {} to {} at {}",
                        k.source, k.source_ip, k.destination, k.address
                    ),
                    Route::Direct => "direct".into(),
                };
                format!(
                    "{} {route} [{} {:?}]",
                    a.address, a.info.route, a.info.security
                )
            })
            .collect()
    }

    fn plan_for(ctx: &ProxyContext, from: &str, to: &str) -> Plan {
        plan(ctx, &ctx.snapshot(), addr(from), addr(to))
    }

    #[test]
    fn an_enrolled_pod_on_another_node_is_reached_through_a_tunnel_as_the_source() {
        let ctx = context();
        let plan = plan_for(&ctx, "10.0.1.1:40000", "10.0.2.1:8080");
        assert_eq!((plan.service.as_deref(), plan.candidates), (None, 1));
        let [attempt] = &plan.attempts[..] else {
            panic!("{:?}", routes(&plan))
        };
        // Keyed by the source's identity and address and the destination's identity, and
        // addressed to the destination pod itself on 15008 (ztunnel's in-pod style).
        let Route::Tunnel(key) = &attempt.route else {
            panic!("{:?}", routes(&plan))
        };
        assert_eq!(
            key,
            &PoolKey {
                source: id("shop", "web"),
                source_ip: Ipv4Addr::new(10, 0, 1, 1),
                destination: id("shop", "web"),
                address: SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 1), 15008),
            }
        );
        assert_eq!(attempt.address, addr("10.0.2.1:8080"));
        let info = &attempt.info;
        assert_eq!(
            (info.route, info.security),
            (upstream::TUNNEL, Security::MutualTls)
        );
        assert_eq!(
            info.source_identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(
            info.destination_identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(info.original_destination, addr("10.0.2.1:8080"));
    }

    #[test]
    fn a_service_with_a_waypoint_is_reached_through_the_waypoint_asking_for_the_vip() {
        let text = waypoint_state(
            "---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.12, selector: {app: cart}, ports: [{port: 80, targetPort: 8080}]}
",
        );
        let snapshot = crate::source::local::testing::load_text(&text)
            .unwrap_or_else(|errors| panic!("test state must load: {errors}"));
        let ctx = context_over(snapshot);
        // cart-1 is on this node: without the waypoint it would be served here.
        let plan = plan_for(&ctx, "10.0.1.1:40000", "10.96.0.12:80");
        assert_eq!(
            routes(&plan),
            [
                "10.0.2.9:15008 tunnel spiffe://cluster.local/ns/shop/sa/web from 10.0.1.1 to spiffe://cluster.local/ns/shop/sa/waypoint at 10.0.2.9:15008 [waypoint MutualTls]"
            ]
        );
        let attempt = &plan.attempts[0];
        assert_eq!(
            attempt.authority,
            addr("10.96.0.12:80"),
            "ztunnel keeps the VIP"
        );
        assert_eq!(plan.service.as_deref(), Some("shop/cart"));
        assert_eq!(
            attempt
                .info
                .destination_workload
                .as_ref()
                .map(|w| w.name.as_str()),
            Some("waypoint-0")
        );
        // The Service without the label is not affected, nor is the pod addressed directly.
        assert_eq!(
            routes(&plan_for(&ctx, "10.0.1.1:40000", "10.0.1.3:8080")),
            ["10.0.1.3:8080 local shop/cart-1 [local MutualTls]"]
        );
    }

    #[test]
    fn a_pod_with_a_waypoint_is_reached_through_it_and_an_unusable_one_refuses() {
        let text = waypoint_state("").replace(
            "metadata: {name: web-2, namespace: shop, labels: {app: web}}",
            "metadata: {name: web-2, namespace: shop, labels: {app: web, istio.io/use-waypoint: waypoint}}",
        );
        let snapshot = crate::source::local::testing::load_text(&text)
            .unwrap_or_else(|errors| panic!("test state must load: {errors}"));
        let ctx = context_over(snapshot);
        let plan = plan_for(&ctx, "10.0.1.1:40000", "10.0.2.1:8080");
        assert_eq!(plan.attempts.len(), 1, "{:?}", routes(&plan));
        assert_eq!(plan.attempts[0].address, addr("10.0.2.9:15008"));
        assert_eq!(plan.attempts[0].authority, addr("10.0.2.1:8080"));

        // Its Gateway gone, the pod's traffic does not go around the waypoint: no attempt.
        let gone = text.replace(
            "gatewayClassName: istio-waypoint",
            "gatewayClassName: istio",
        );
        let (snapshot, errors) = crate::source::local::testing::assemble_text(&gone);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let ctx = context_over(snapshot);
        let plan = plan_for(&ctx, "10.0.1.1:40000", "10.0.2.1:8080");
        assert!(plan.attempts.is_empty(), "{:?}", routes(&plan));
        assert_eq!(
            plan.unusable_waypoint.as_deref(),
            Some("names waypoint shop/waypoint, which is not a valid istio-waypoint Gateway")
        );
    }

    #[test]
    fn an_enrolled_pod_on_the_same_node_is_served_here_under_its_policy() {
        let ctx = context();
        let plan = plan_for(&ctx, "10.0.1.1:40000", "10.0.1.3:8080");
        assert_eq!(
            routes(&plan),
            ["10.0.1.3:8080 local shop/cart-1 [local MutualTls]"]
        );
        assert_eq!(
            plan.attempts[0].info.destination_identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/cart")
        );
    }

    #[test]
    fn pods_outside_the_mesh_and_unknown_addresses_are_reached_directly() {
        let ctx = context();
        for to in [
            "10.0.2.2:8080",
            "10.0.1.2:8080",
            "10.0.2.3:8080",
            "192.0.2.1:443",
        ] {
            let plan = plan_for(&ctx, "10.0.1.1:40000", to);
            assert_eq!(routes(&plan), [format!("{to} direct [direct None]")]);
            assert_eq!(plan.attempts[0].info.destination_identity, None);
        }
        // The record still names a known plain destination.
        let plan = plan_for(&ctx, "10.0.1.1:40000", "10.0.2.2:8080");
        let workload = plan.attempts[0].info.destination_workload.as_ref().unwrap();
        assert_eq!(
            (workload.namespace.as_str(), workload.name.as_str()),
            ("legacy", "batch-2")
        );
    }

    #[test]
    fn a_source_outside_the_mesh_is_never_tunnelled_for() {
        let ctx = context();
        // batch-1 is not enrolled: the agent holds no certificate it could present for it.
        let plan = plan_for(&ctx, "10.0.1.2:40000", "10.0.2.1:8080");
        assert_eq!(routes(&plan), ["10.0.2.1:8080 direct [direct None]"]);
        assert_eq!(plan.attempts[0].info.source_identity, None);
        // Nor is an address the state does not know.
        let plan = plan_for(&ctx, "10.9.9.9:40000", "10.0.2.1:8080");
        assert_eq!(routes(&plan), ["10.0.2.1:8080 direct [direct None]"]);
    }

    #[test]
    fn a_service_vip_resolves_to_each_endpoint_with_its_own_route() {
        let ctx = context();
        let plan = plan_for(&ctx, "10.0.1.1:40000", "10.96.0.10:80");
        assert_eq!(plan.service.as_deref(), Some("shop/web"));
        assert_eq!(plan.candidates, 3);
        let mut routes = routes(&plan);
        // The starting endpoint rotates per connection; the set and each route do not.
        routes.sort();
        assert_eq!(
            routes,
            [
                "10.0.1.1:8080 local shop/web-1 [local MutualTls]",
                "10.0.2.1:8080 tunnel spiffe://cluster.local/ns/shop/sa/web from 10.0.1.1 to spiffe://cluster.local/ns/shop/sa/web at 10.0.2.1:15008 [tunnel MutualTls]",
                "10.0.2.3:8080 direct [direct None]",
            ]
        );
        for attempt in &plan.attempts {
            // Recorded as a connection to the Service, going to the endpoint.
            assert_eq!(attempt.info.original_destination, addr("10.96.0.10:80"));
            assert_eq!(attempt.info.destination, attempt.address);
            assert_eq!(
                attempt.info.destination_service.as_deref(),
                Some("shop/web")
            );
        }
        // Round robin: the next connection starts one endpoint further.
        let first = |p: &Plan| p.attempts[0].address;
        let next = plan_for(&ctx, "10.0.1.1:40001", "10.96.0.10:80");
        assert_ne!(first(&plan), first(&next));
    }

    #[test]
    fn a_service_without_ready_endpoints_has_nothing_to_try() {
        let ctx = context();
        let plan = plan_for(&ctx, "10.0.1.1:40000", "10.96.0.11:80");
        assert_eq!(plan.service.as_deref(), Some("shop/nobody"));
        assert_eq!(plan.candidates, 0);
        assert!(plan.attempts.is_empty());
        // A port the Service does not have is no Service at all: the VIP itself, directly.
        let plan = plan_for(&ctx, "10.0.1.1:40000", "10.96.0.10:81");
        assert_eq!(plan.service, None);
        assert_eq!(routes(&plan), ["10.96.0.10:81 direct [direct None]"]);
    }
}
