//! Wires the agent together: state source, identities, capture, proxy listeners, admin; and
//! tears it down.
//!
//! Two runtimes, as in ztunnel: the data plane runs on a multi-threaded worker runtime, the
//! admin and readiness servers on a small runtime of their own so inspection never competes
//! with traffic.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminState},
    capture::{Capture, capabilities, kernel, reconcile, route_table::RouteTable},
    config::Config,
    identity::{CertificateAuthority, CertificateManager},
    metrics::Metrics,
    proxy::{self, Listener, ProxyContext, connections::Connections, hbone::pool::Pool},
    source::{StateSource, kube, local},
};

/// How often pods waiting for their veth, or with a changed veth, are looked at again.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

pub fn run(config: Config) -> anyhow::Result<()> {
    info!(config = ?config, "starting mesh-agent");
    capabilities::check()?;
    let features = kernel::check()?;
    // One worker: tokio's current-thread scheduler on a thread of its own, which skips the
    // multi-thread scheduler's per-poll bookkeeping (work stealing, queue-interval tuning).
    if config.worker_threads > 1 {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .thread_name("dataplane")
            .enable_all()
            .build()
            .context("starting the data-plane runtime")?;
        return runtime.block_on(serve(config, features));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("dataplane-blocking")
        .enable_all()
        .build()
        .context("starting the data-plane runtime")?;
    std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || runtime.block_on(serve(config, features)))
        .context("starting the data-plane thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the data-plane thread panicked"))?
}

async fn serve(config: Config, features: kernel::KernelFeatures) -> anyhow::Result<()> {
    let (snapshot, state_status, source_watches) = match &config.source {
        StateSource::Files(path) => {
            let watcher = local::Watcher::new(path.clone()).map_err(|errors| {
                anyhow::anyhow!("the state at {} is invalid:\n{errors}", path.display())
            })?;
            let (snapshot, status) = (watcher.snapshot(), watcher.status());
            tokio::spawn(watcher.run());
            (snapshot, status, None)
        }
        StateSource::Kubernetes(connection) => {
            let (client, api_server) = kube::client(connection).await?;
            info!(?connection, %api_server, "listing the cluster from the Kubernetes API");
            // Not ready (nothing listens yet) until every kind has been listed once.
            let source = kube::start(client, &api_server, connection).await;
            (source.snapshot, source.status, Some(source.watches))
        }
    };

    let ca = CertificateAuthority::load_or_create(
        &config.identity.ca_dir,
        &config.identity.trust_domain,
    )
    .with_context(|| {
        format!(
            "certificate authority in {}",
            config.identity.ca_dir.display()
        )
    })?;
    let certs = CertificateManager::new(Arc::new(ca), config.identity.cert_ttl);
    let metrics = Arc::new(Metrics::new());

    // Listeners first: capture must never steer a SYN to a port nobody listens on.
    let outbound = Listener::bind("outbound", mesh_common::OUTBOUND_PORT)?;
    let inbound = Listener::bind("inbound", mesh_common::INBOUND_PORT)?;
    let tunnel = Listener::bind("tunnel", mesh_common::TUNNEL_PORT)?;
    let capture = Arc::new(Mutex::new(Some(Capture::load(features)?)));

    let (shutdown_tx, shutdown) = watch::channel(false);
    let (ready_tx, ready) = watch::channel(false);
    let pending = Arc::new(Mutex::new(reconcile::Pending::new()));
    let connections = Connections::new(metrics.clone());
    let ctx = Arc::new(ProxyContext {
        node: config.node.clone(),
        mesh: config.mesh.clone(),
        state: snapshot.clone(),
        connections: connections.clone(),
        certs: certs.clone(),
        pool: Pool::new(config.pool.clone(), certs.clone()),
        metrics: metrics.clone(),
        services: Default::default(),
    });

    let result = async {
        let admin_state = Arc::new(AdminState {
            config: config.clone(),
            started: Instant::now(),
            state_status,
            source_watches,
            capture: capture.clone(),
            pending: pending.clone(),
            proxy: ctx.clone(),
            ready: ready.clone(),
        });
        let admin_thread = spawn_admin(&config, admin_state, metrics.clone(), ready.clone(), shutdown.clone())?;

        apply_state(&capture, &ctx, &pending);
        let reconciler = tokio::spawn(reconcile_loop(capture.clone(), ctx.clone(), pending.clone(), shutdown.clone()));
        let rotation = tokio::spawn(certs.clone().run(shutdown.clone()));
        let reaper = tokio::spawn(ctx.pool.clone().run_reaper(shutdown.clone()));

        let mut outbound = tokio::spawn(outbound.run(ctx.clone(), shutdown.clone(), proxy::outbound::handle));
        let mut inbound = tokio::spawn(inbound.run(ctx.clone(), shutdown.clone(), proxy::inbound::handle));
        let mut tunnel = tokio::spawn(tunnel.run(ctx.clone(), shutdown.clone(), proxy::hbone::server::handle));
        let _ = ready_tx.send(true);
        info!(node = %config.node, "mesh-agent ready");

        wait_for_signal().await?;
        let _ = ready_tx.send(false);
        let open = connections.open_count();
        info!(open_connections = open, drain = ?config.drain_timeout, "shutting down: draining connections");
        let _ = shutdown_tx.send(true);
        let drained = tokio::time::timeout(config.drain_timeout, async {
            let _ = (&mut outbound).await;
            let _ = (&mut inbound).await;
            let _ = (&mut tunnel).await;
        })
        .await;
        if drained.is_err() {
            warn!(open = connections.open_count(), "drain timeout reached; closing remaining connections");
            // Aborting a listener task drops its connection tasks, closing their sockets.
            outbound.abort();
            inbound.abort();
            tunnel.abort();
        }
        let _ = reconciler.await;
        let _ = rotation.await;
        let _ = reaper.await;
        let _ = admin_thread.join();
        anyhow::Ok(())
    }
    .await;

    // Whatever happened above, the kernel state we added goes.
    let taken = capture.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(capture) = taken
        && let Err(e) = capture.shutdown()
    {
        error!(error = %e, "removing capture failed; run `mesh-agent cleanup`");
    }
    info!("mesh-agent stopped");
    result
}

/// Brings capture and certificates in line with the current state.
fn apply_state(
    capture: &Mutex<Option<Capture>>,
    ctx: &ProxyContext,
    pending: &Mutex<reconcile::Pending>,
) {
    let snapshot = ctx.snapshot();
    {
        let mut capture = capture.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(capture) = capture.as_mut() {
            // One read of the main routing table serves both: pods' veths and the uplinks.
            let routes = RouteTable::read();
            reconcile::reconcile(capture, &snapshot, &ctx.node, &mut pending, routes.as_ref());
            match &routes {
                Ok(table) => capture.set_uplinks(&reconcile::uplinks(table, &snapshot, &ctx.node)),
                Err(e) => {
                    if capture.uplinks_unknown(e.to_string()) {
                        warn!(error = %e, "reading the routing table for uplinks failed; keeping the current ones");
                    }
                }
            }
        }
    }
    // Certificates for exactly the identities of this node's enrolled pods, issued ahead of use.
    let wanted = snapshot
        .workloads_on_node(&ctx.node)
        .filter(|w| w.is_enrolled())
        .filter_map(|w| ctx.identity_of(w))
        .collect();
    ctx.certs.set_wanted(wanted);
}

async fn reconcile_loop(
    capture: Arc<Mutex<Option<Capture>>>,
    ctx: Arc<ProxyContext>,
    pending: Arc<Mutex<reconcile::Pending>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut snapshot = ctx.state.clone();
    let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
    loop {
        tokio::select! {
            _ = crate::shutdown::requested(&mut shutdown) => return,
            changed = snapshot.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        snapshot.borrow_and_update();
        let (capture, ctx, pending) = (capture.clone(), ctx.clone(), pending.clone());
        // Netlink and bpf syscalls block briefly; keep them off the data-plane workers.
        let _ = tokio::task::spawn_blocking(move || apply_state(&capture, &ctx, &pending)).await;
    }
}

fn spawn_admin(
    config: &Config,
    state: Arc<AdminState>,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin runtime")?;
    let admin = admin::Bound::new("admin", config.admin_addr)?;
    let readiness = admin::Bound::new("readiness", config.readiness_addr)?;
    let metrics_server = admin::Bound::new("metrics", config.metrics_addr)?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let servers = (
                    admin.into_server(),
                    readiness.into_server(),
                    metrics_server.into_server(),
                );
                let (admin, readiness, metrics_server) = match servers {
                    (Ok(a), Ok(r), Ok(m)) => (a, r, m),
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                        error!(error = %e, "admin servers could not start");
                        return;
                    }
                };
                tokio::join!(
                    admin.run_admin(state, shutdown.clone()),
                    readiness.run_readiness(ready, shutdown.clone()),
                    metrics_server.run_metrics(metrics, shutdown),
                );
            })
        })
        .context("starting the admin thread")
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}
