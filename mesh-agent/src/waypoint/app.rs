//! The waypoint process: reads the cluster as the agents do, finds its own pod there (its
//! Gateway, identity and address), gets a certificate for that identity, serves HBONE on 15008
//! and readiness on 15021, and drains on SIGTERM.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{WaypointContext, telemetry::RequestMetrics, tunnel};
use crate::{
    admin,
    app::{Opened, Signals, certificates, open_source},
    identity::{Identity, IdentityConfig},
    metrics::Metrics,
    proxy::{
        Listener, MeshConfig,
        hbone::pool::{Pool, PoolSettings},
        keepalive::KeepaliveSettings,
    },
    source::StateSource,
    state::{GATEWAY_NAME_LABEL, Snapshot, WaypointRef},
};

#[derive(Debug, Clone, Serialize)]
pub struct WaypointConfig {
    /// This pod, as the state knows it.
    pub pod_namespace: String,
    pub pod_name: String,
    pub source: StateSource,
    pub tunnel_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    #[serde(with = "crate::config::secs")]
    pub drain_timeout: Duration,
    pub worker_threads: usize,
    pub identity: IdentityConfig,
    pub mesh: MeshConfig,
    pub pool: PoolSettings,
    pub keepalive: KeepaliveSettings,
    pub access_log: bool,
}

pub fn run(config: WaypointConfig) -> anyhow::Result<()> {
    info!(config = ?config, "starting the waypoint");
    let runtime = if config.worker_threads > 1 {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .thread_name("waypoint")
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .context("starting the waypoint runtime")?;
    runtime.block_on(serve(config))
}

/// Who this waypoint is, from its pod.
struct Me {
    gateway: WaypointRef,
    identity: Identity,
    ip: std::net::Ipv4Addr,
}

/// This pod in `snapshot`, once it is there with an address and its Gateway's label.
fn me(snapshot: &Snapshot, config: &WaypointConfig) -> Result<Me, String> {
    let pod = snapshot
        .workload(&config.pod_namespace, &config.pod_name)
        .ok_or_else(|| "not in the state yet".to_string())?;
    let gateway = pod
        .labels
        .value(GATEWAY_NAME_LABEL)
        .ok_or_else(|| format!("has no {GATEWAY_NAME_LABEL} label: it is no waypoint's pod"))?;
    let identity = Identity::new(
        &config.mesh.trust_domain,
        &pod.namespace,
        &pod.service_account,
    )
    .map_err(|e| format!("has no valid identity: {e}"))?;
    Ok(Me {
        gateway: WaypointRef {
            namespace: pod.namespace.clone(),
            name: gateway.to_string(),
        },
        identity,
        ip: pod.ip,
    })
}

async fn serve(config: WaypointConfig) -> anyhow::Result<()> {
    let Opened { snapshot, .. } = open_source(&config.source).await?;
    let certs = certificates(&config.identity)?;
    let mut metrics = Metrics::new();
    let requests = RequestMetrics::register(metrics.registry_mut());
    let metrics = Arc::new(metrics);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (ready_tx, ready) = watch::channel(false);
    let readiness = admin::Bound::new("readiness", config.readiness_addr)?.into_server()?;
    let metrics_server = admin::Bound::new("metrics", config.metrics_addr)?.into_server()?;
    let readiness = tokio::spawn(readiness.run_readiness(ready, shutdown.clone()));
    let metrics_server =
        tokio::spawn(metrics_server.run_metrics(metrics.clone(), shutdown.clone()));
    let mut signals = Signals::new()?;

    // Not ready until this pod is in the state: its Gateway and identity come from there.
    let me = {
        let mut state = snapshot.clone();
        let mut said = None;
        loop {
            match me(&state.borrow_and_update(), &config) {
                Ok(me) => break me,
                Err(why) => {
                    if said.as_ref() != Some(&why) {
                        warn!(pod = %format!("{}/{}", config.pod_namespace, config.pod_name), problem = %why, "waiting for this waypoint's pod");
                        said = Some(why);
                    }
                }
            }
            tokio::select! {
                changed = state.changed() => changed.context("the state source stopped")?,
                _ = signals.recv() => return Ok(()),
            }
        }
    };
    certs.set_wanted([me.identity.clone()].into());
    let rotation = tokio::spawn(certs.clone().run(shutdown.clone()));

    let listener = std::net::TcpListener::bind(config.tunnel_addr)
        .with_context(|| format!("binding the tunnel listener on {}", config.tunnel_addr))?;
    config
        .keepalive
        .apply(&listener)
        .context("TCP keepalive on the tunnel listener")?;
    let listener = Listener::from_std("waypoint", listener)?;
    let ctx = Arc::new(WaypointContext {
        gateway: me.gateway,
        identity: me.identity,
        ip: me.ip,
        mesh: config.mesh.clone(),
        state: snapshot,
        pool: Pool::new(config.pool.clone(), config.keepalive, certs.clone()),
        certs,
        balancer: Default::default(),
        backends: Default::default(),
        authenticator: Default::default(),
        metrics,
        requests,
        access_log: config.access_log,
        keepalive: config.keepalive,
        draining: shutdown.clone(),
    });
    let reaper = tokio::spawn(ctx.pool.clone().run_reaper(shutdown.clone()));
    let tunnel = tokio::spawn(listener.run(ctx.clone(), shutdown.clone(), tunnel::handle));
    let _ = ready_tx.send(true);
    info!(gateway = %ctx.gateway, identity = %ctx.identity, address = %ctx.ip, "waypoint ready");

    signals.recv().await;
    let _ = ready_tx.send(false);
    info!(drain = ?config.drain_timeout, "stopped accepting: draining");
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(config.drain_timeout, tunnel)
        .await
        .is_err()
    {
        warn!("drain period over; closing what is still open");
    }
    let _ = tokio::join!(rotation, reaper, readiness, metrics_server);
    Ok(())
}
