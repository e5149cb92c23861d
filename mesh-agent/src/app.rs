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
    lifecycle::{
        Handovers, Process, drain,
        handover::{self, Offer, Previous, Successor},
        listeners::{self, Obtained, Sockets},
        pins::{self, PinDir},
        uninstall,
    },
    limits,
    metrics::Metrics,
    proxy::{
        self, Listener, ProxyContext, connections::Connections, hbone::pool::Pool, limits::Limits,
    },
    source::{StateSource, kube, local},
};

/// How often pods waiting for their veth, or with a changed veth, are looked at again.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

pub fn run(config: Config) -> anyhow::Result<()> {
    info!(config = ?config, "starting mesh-agent");
    capabilities::check()?;
    let open_files = limits::raise_open_files();
    info!(
        open_files = open_files.current,
        hard = open_files.hard,
        "open-files limit"
    );
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
        return runtime.block_on(serve(config, features, open_files));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("dataplane-blocking")
        .enable_all()
        .build()
        .context("starting the data-plane runtime")?;
    std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || runtime.block_on(serve(config, features, open_files)))
        .context("starting the data-plane thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the data-plane thread panicked"))?
}

async fn serve(
    config: Config,
    features: kernel::KernelFeatures,
    open_files: limits::OpenFiles,
) -> anyhow::Result<()> {
    let Opened {
        snapshot,
        status: state_status,
        watches: source_watches,
        client: kube_client,
    } = open_source(&config.source).await?;

    let certs = certificates(&config.identity)?;
    let metrics = Arc::new(Metrics::new());

    // Listeners before capture: capture must never steer a SYN to a port nobody listens on. An
    // agent already serving the node hands its own over, so no SYN goes unanswered meanwhile.
    let pins = PinDir::for_this_netns(&features.bpffs)?;
    let Obtained { sockets, previous } =
        listeners::obtain(&config, &pins::handover_token(&pins)).await?;
    // Keepalive is set on the proxy's listeners, also on those taken over from an agent that
    // did not set it: the sockets they accept inherit it.
    let proxy_listener = |name: &'static str| -> anyhow::Result<Listener> {
        let listener = sockets.take(name)?;
        config
            .keepalive
            .apply(&listener)
            .with_context(|| format!("TCP keepalive on the {name} listener"))?;
        Ok(Listener::from_std(name, listener)?)
    };
    let outbound = proxy_listener("outbound")?;
    let inbound = proxy_listener("inbound")?;
    let tunnel = proxy_listener("tunnel")?;
    proxy::socket::set_upstream_keepalive(config.keepalive);
    let limits = config.limits.resolve(open_files.current);
    info!(?limits, "proxy limits");
    let capture = Arc::new(Mutex::new(Some(Capture::load(features, pins)?)));

    let (shutdown_tx, shutdown) = watch::channel(false);
    let (ready_tx, ready) = watch::channel(false);
    let (handovers_tx, handovers) = watch::channel(Handovers::default());
    let pending = Arc::new(Mutex::new(reconcile::Pending::new()));
    let connections = Connections::new(metrics.clone());
    let ctx = Arc::new(ProxyContext {
        node: config.node.clone(),
        mesh: config.mesh.clone(),
        state: snapshot.clone(),
        connections: connections.clone(),
        certs: certs.clone(),
        pool: Pool::new(config.pool.clone(), config.keepalive, certs.clone()),
        metrics: metrics.clone(),
        services: Default::default(),
        draining: shutdown.clone(),
        node_addresses: Default::default(),
        limits: Limits::new(limits, metrics.clone()),
        keepalive: config.keepalive,
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
            handovers: handovers.clone(),
            open_files,
            authenticator: Default::default(),
        });
        let admin_thread = spawn_admin(&sockets, admin_state, metrics.clone(), ready.clone(), shutdown.clone())?;

        apply_state(&capture, &ctx, &pending);
        if let Some(capture) = capture.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            capture.adopted();
        }
        let reconciler = tokio::spawn(reconcile_loop(capture.clone(), ctx.clone(), pending.clone(), shutdown.clone()));
        let rotation = tokio::spawn(certs.clone().run(shutdown.clone()));
        let reaper = tokio::spawn(ctx.pool.clone().run_reaper(shutdown.clone()));
        let idle_sweep = tokio::spawn(ctx.connections.clone().run_idle_sweep(config.keepalive.idle_timeout, shutdown.clone()));

        let outbound = tokio::spawn(outbound.run(ctx.clone(), shutdown.clone(), proxy::outbound::handle));
        let inbound = tokio::spawn(inbound.run(ctx.clone(), shutdown.clone(), proxy::inbound::handle));
        let tunnel = tokio::spawn(tunnel.run(ctx.clone(), shutdown.clone(), proxy::hbone::server::handle));
        if let Some(previous) = previous {
            predecessor_stops(previous, handovers_tx.clone()).await;
        }
        let token = capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.handover_token().to_owned())
            .unwrap_or_default();
        let mut offer = match Offer::bind(handover::SOCKET_NAME, OFFER_BIND_WAIT, token).await {
            Ok(offer) => Some(offer),
            Err(e) => {
                warn!(error = %e, "cannot offer the listeners to a successor: an upgrade will have to bind afresh");
                None
            }
        };
        let _ = ready_tx.send(true);
        info!(node = %config.node, "mesh-agent ready");

        // Serve until told to stop or replaced by a successor that took the listeners over.
        let mut signals = Signals::new()?;
        let mut stop_requested = false;
        let mut successor = None;
        tokio::select! {
            _ = signals.recv() => stop_requested = true,
            next = next_successor(&mut offer, &sockets) => successor = Some(next),
        }
        let _ = ready_tx.send(false);
        // Stopped, not replaced: is mesh-agent being removed from the cluster? Asked while the
        // drain runs.
        let fate = match (&successor, &kube_client, &config.daemonset) {
            (None, Some(client), Some(daemonset)) => {
                let (client, daemonset) = (client.clone(), daemonset.clone());
                Some(tokio::spawn(async move { kube::daemonset::fate(client, &daemonset).await }))
            }
            _ => None,
        };
        let open = connections.open_count();
        info!(open_connections = open, drain = ?config.drain_timeout, replaced = successor.is_some(), "stopped accepting: draining connections");
        let _ = shutdown_tx.send(true);
        // Our copies of the listening sockets go too. Replaced, the successor holds its own;
        // stopped, the sockets close, and enrolled pods' new connections are dropped in the
        // kernel (fail closed) until an agent is back, which their SYN retransmissions then
        // reach. Kept open and unaccepted they would complete handshakes nobody serves, to be
        // reset when this process exits (measured by the bench: every new connection to the
        // node hung for the whole drain).
        drop(sockets);
        drop(offer);

        // Drain.
        let drain = async {
            let _ = tokio::join!(outbound, inbound, tunnel);
        };
        tokio::pin!(drain);
        let deadline = tokio::time::sleep(config.drain_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut drain => break,
                _ = &mut deadline => {
                    let reset = drain::reset_open_connections().unwrap_or(0);
                    warn!(open = connections.open_count(), reset, "drain period over; resetting the connections still open");
                    break;
                }
                _ = signals.recv(), if !stop_requested => stop_requested = true,
            }
        }
        let mut uninstall = false;
        if let (Some(fate), None) = (fate, &successor) {
            match fate.await {
                Ok(kube::daemonset::Fate::Removed(why)) => {
                    info!(reason = why, "mesh-agent is being removed from the cluster: uninstalling the data plane");
                    uninstall = true;
                }
                Ok(kube::daemonset::Fate::Kept) => info!("the DaemonSet stays: capture stays in place for the next agent"),
                Ok(kube::daemonset::Fate::Unknown(e)) => warn!(error = %e, "cannot tell whether the DaemonSet is being removed: capture stays in place"),
                Err(e) => warn!(error = %e, "asking about the DaemonSet failed: capture stays in place"),
            }
        }
        if let Some(successor) = &successor {
            handovers_tx.send_modify(|h| h.successor = Some(Process { pid: successor.pid, version: successor.version.clone(), state: "serving" }));
        }
        if !stop_requested {
            // Replaced, but not told to stop: a DaemonSet's old pod waits to be deleted
            // (exiting on its own would only make the kubelet start it again).
            info!("handed over and drained; waiting for SIGTERM");
            signals.recv().await;
        }
        let _ = reconciler.await;
        let _ = rotation.await;
        let _ = reaper.await;
        let _ = idle_sweep.await;
        let _ = admin_thread.join();
        // Gone: the successor learns it when this connection closes.
        drop(successor);
        anyhow::Ok(uninstall)
    }
    .await;

    // Closing our descriptors leaves the pinned data plane attached, failing closed until an
    // agent is back; only a removal of mesh-agent itself takes it away.
    drop(capture.lock().unwrap_or_else(|p| p.into_inner()).take());
    match &result {
        Ok(true) => match uninstall::uninstall(true) {
            Ok(report) => info!(
                links = report.removed_links.len(),
                sockets = report.closed_sockets,
                "data plane uninstalled; pods talk directly"
            ),
            Err(e) => {
                error!(error = %e, "uninstalling failed; run `mesh-agent uninstall` on the node")
            }
        },
        Ok(false) => info!(
            "mesh-agent stopped; capture stays in place until an agent is back (`mesh-agent uninstall` removes it)"
        ),
        Err(_) => {}
    }
    result.map(|_| ())
}

/// The certificate manager over the CA in `identity.ca_dir` (loaded, or created once).
pub fn certificates(
    identity: &crate::identity::IdentityConfig,
) -> anyhow::Result<CertificateManager> {
    let ca = CertificateAuthority::load_or_create(&identity.ca_dir, &identity.trust_domain)
        .with_context(|| format!("certificate authority in {}", identity.ca_dir.display()))?;
    Ok(CertificateManager::new(Arc::new(ca), identity.cert_ttl))
}

/// A state source, started: its snapshots and status, and for the API its watches and client.
pub struct Opened {
    pub snapshot: watch::Receiver<Arc<crate::state::Snapshot>>,
    pub status: watch::Receiver<crate::source::StateStatus>,
    pub watches: Option<watch::Receiver<Vec<kube::WatchStatus>>>,
    pub client: Option<::kube::Client>,
}

/// Starts reading the cluster from `source`; returns once the first snapshot is built (for the
/// API: once every kind has been listed). A directory whose files are bad at start is an error.
pub async fn open_source(source: &StateSource) -> anyhow::Result<Opened> {
    match source {
        StateSource::Files(path) => {
            let watcher = local::Watcher::new(path.clone()).map_err(|errors| {
                anyhow::anyhow!("the state at {} is invalid:\n{errors}", path.display())
            })?;
            let (snapshot, status) = (watcher.snapshot(), watcher.status());
            tokio::spawn(watcher.run());
            Ok(Opened {
                snapshot,
                status,
                watches: None,
                client: None,
            })
        }
        StateSource::Kubernetes(connection) => {
            let (client, api_server) = kube::client(connection).await?;
            info!(?connection, %api_server, "listing the cluster from the Kubernetes API");
            // Not ready (nothing listens yet) until every kind has been listed once.
            let source = kube::start(client.clone(), &api_server, connection).await;
            Ok(Opened {
                snapshot: source.snapshot,
                status: source.status,
                watches: Some(source.watches),
                client: Some(client),
            })
        }
    }
}

/// How long binding the hand-over socket waits for a predecessor to let go of it.
const OFFER_BIND_WAIT: Duration = Duration::from_secs(5);

/// Tells the predecessor that this process accepts now (it then stops accepting and drains),
/// and follows it until it exits.
async fn predecessor_stops(mut previous: Previous, handovers: watch::Sender<Handovers>) {
    let (pid, version) = (previous.pid, previous.version.clone());
    if let Err(e) = previous.serving().await {
        warn!(pid, error = %e, "telling the previous agent to stop accepting failed; it serves alongside until it exits");
    }
    info!(pid, %version, "the previous agent stopped accepting and drains");
    let set = move |state| {
        handovers.send_modify(|h| {
            h.previous = Some(Process {
                pid,
                version: version.clone(),
                state,
            });
        })
    };
    set("draining");
    tokio::spawn(async move {
        previous.exited().await;
        info!(pid, "the previous agent exited");
        set("exited");
    });
}

/// The next successor that takes the listeners; pending forever without an offer.
async fn next_successor(offer: &mut Option<Offer>, sockets: &Sockets) -> Successor {
    let Some(offer) = offer else {
        return std::future::pending().await;
    };
    loop {
        match offer.next(&sockets.fds()).await {
            Ok(successor) => {
                info!(pid = successor.pid, version = %successor.version, "handed the listeners over to a new agent");
                return successor;
            }
            // A probe (`mesh-agent uninstall` asking whether an agent serves) says nothing.
            Err(e @ handover::HandoverError::Closed { .. }) => {
                tracing::debug!(error = %e, "a hand-over connection closed early");
            }
            Err(e) => {
                warn!(error = %e, "a hand-over did not complete; still serving");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Brings capture and certificates in line with the current state.
fn apply_state(
    capture: &Mutex<Option<Capture>>,
    ctx: &ProxyContext,
    pending: &Mutex<reconcile::Pending>,
) {
    let snapshot = ctx.snapshot();
    ctx.node_addresses.refresh();
    {
        let mut capture = capture.lock().unwrap_or_else(|p| p.into_inner());
        let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(capture) = capture.as_mut() {
            // One read of the main routing table serves both: pods' veths and the uplinks.
            let routes = RouteTable::read();
            reconcile::reconcile(capture, &snapshot, &ctx.node, &mut pending, routes.as_ref());
            match &routes {
                Ok(table) => match reconcile::uplinks(table, &snapshot, &ctx.node) {
                    Ok(uplinks) => capture.set_uplinks(&uplinks),
                    Err(e) => {
                        if capture.uplinks_unknown(e.to_string()) {
                            warn!(error = %e, "looking up the uplinks failed; keeping the current ones");
                        }
                    }
                },
                Err(e) => {
                    if capture.uplinks_unknown(e.to_string()) {
                        warn!(error = %e, "reading the routing table for uplinks failed; keeping the current ones");
                    }
                }
            }
            ctx.metrics
                .capture_problems
                .set(capture.problems().len() as i64);
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
    sockets: &Sockets,
    state: Arc<AdminState>,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin runtime")?;
    let admin = admin::Bound::from_listener("admin", sockets.take("admin")?)?;
    let readiness = admin::Bound::from_listener("readiness", sockets.take("readiness")?)?;
    let metrics_server = admin::Bound::from_listener("metrics", sockets.take("metrics")?)?;
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

/// SIGTERM and SIGINT, installed once so that none is missed between waits.
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM received"),
            _ = self.int.recv() => info!("SIGINT received"),
        }
    }
}
