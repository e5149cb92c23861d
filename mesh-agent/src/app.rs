//! Wires the agent together: state source, capture, proxy listeners, admin; and tears it down.
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
    capture::{Capture, kernel, reconcile},
    config::Config,
    proxy::{self, Listener, ProxyContext, connections::Connections},
    state,
};

/// How often pods waiting for their veth, or with a changed veth, are looked at again.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

pub fn run(config: Config) -> anyhow::Result<()> {
    info!(config = ?config, "starting mesh-agent");
    let features = kernel::check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .thread_name("dataplane")
        .enable_all()
        .build()
        .context("starting the data-plane runtime")?;
    runtime.block_on(serve(config, features))
}

async fn serve(config: Config, features: kernel::KernelFeatures) -> anyhow::Result<()> {
    let watcher = state::Watcher::new(config.state_path.clone())
        .map_err(|errors| anyhow::anyhow!("the state at {} is invalid:\n{errors}", config.state_path.display()))?;
    let snapshot = watcher.snapshot();
    let state_status = watcher.status();
    tokio::spawn(watcher.run());

    // Listeners first: capture must never steer a SYN to a port nobody listens on.
    let outbound = Listener::bind("outbound", mesh_common::OUTBOUND_PORT)?;
    let inbound = Listener::bind("inbound", mesh_common::INBOUND_PORT)?;
    let capture = Arc::new(Mutex::new(Some(Capture::load(features)?)));

    let (shutdown_tx, shutdown) = watch::channel(false);
    let (ready_tx, ready) = watch::channel(false);
    let pending = Arc::new(Mutex::new(reconcile::Pending::new()));
    let connections = Connections::default();

    let result = async {
        let admin_state = Arc::new(AdminState {
            config: config.clone(),
            started: Instant::now(),
            snapshot: snapshot.clone(),
            state_status,
            capture: capture.clone(),
            pending: pending.clone(),
            connections: connections.clone(),
            ready: ready.clone(),
        });
        let admin_thread = spawn_admin(&config, admin_state, ready.clone(), shutdown.clone())?;

        apply_state(&capture, &snapshot.borrow(), &config.node, &pending);
        let reconciler = tokio::spawn(reconcile_loop(
            capture.clone(),
            snapshot.clone(),
            config.node.clone(),
            pending.clone(),
            shutdown.clone(),
        ));

        let ctx = Arc::new(ProxyContext { node: config.node.clone(), state: snapshot.clone(), connections: connections.clone() });
        let mut outbound = tokio::spawn(outbound.run(ctx.clone(), shutdown.clone(), proxy::outbound::handle));
        let mut inbound = tokio::spawn(inbound.run(ctx, shutdown.clone(), proxy::inbound::handle));
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
        })
        .await;
        if drained.is_err() {
            warn!(open = connections.open_count(), "drain timeout reached; closing remaining connections");
            // Aborting a listener task drops its connection tasks, closing their sockets.
            outbound.abort();
            inbound.abort();
        }
        let _ = reconciler.await;
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

fn apply_state(
    capture: &Mutex<Option<Capture>>,
    snapshot: &state::Snapshot,
    node: &str,
    pending: &Mutex<reconcile::Pending>,
) {
    let mut capture = capture.lock().unwrap_or_else(|p| p.into_inner());
    let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(capture) = capture.as_mut() {
        reconcile::reconcile(capture, snapshot, node, &mut pending);
    }
}

async fn reconcile_loop(
    capture: Arc<Mutex<Option<Capture>>>,
    mut snapshot: watch::Receiver<Arc<state::Snapshot>>,
    node: String,
    pending: Arc<Mutex<reconcile::Pending>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
    loop {
        tokio::select! {
            _ = crate::shutdown::requested(&mut shutdown) => return,
            changed = snapshot.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        let current = snapshot.borrow_and_update().clone();
        let (capture, pending, node) = (capture.clone(), pending.clone(), node.clone());
        // Netlink and bpf syscalls block briefly; keep them off the data-plane workers.
        let _ = tokio::task::spawn_blocking(move || apply_state(&capture, &current, &node, &pending)).await;
    }
}

fn spawn_admin(
    config: &Config,
    state: Arc<AdminState>,
    ready: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin runtime")?;
    let admin = admin::Bound::new("admin", config.admin_addr)?;
    let readiness = admin::Bound::new("readiness", config.readiness_addr)?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                let (admin, readiness) = match (admin.into_server(), readiness.into_server()) {
                    (Ok(a), Ok(r)) => (a, r),
                    (Err(e), _) | (_, Err(e)) => {
                        error!(error = %e, "admin servers could not start");
                        return;
                    }
                };
                tokio::join!(
                    admin.run_admin(state, shutdown.clone()),
                    readiness.run_readiness(ready, shutdown),
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
