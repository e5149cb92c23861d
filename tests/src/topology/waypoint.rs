//! Waypoints on the simulated cluster: `mesh-agent waypoint` in a pod's namespace, as the
//! Deployment Istio's Gateway controller creates for a Gateway of class `istio-waypoint`.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, bail};

use super::{Cluster, PodSpec};
use crate::agent::{Agent, AgentOptions, READY_PATH, READY_PORT};

/// What the Gateway controller labels a waypoint's pods with.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
pub const MANAGED_BY_MESH: &str = "istio.io-mesh-controller";

impl PodSpec {
    /// A pod of the waypoint Gateway `gateway`, as Istio deploys it: the Gateway's name as
    /// label and as service account (Istio's default identity for a waypoint).
    pub fn waypoint(namespace: &str, name: &str, gateway: &str, node: usize) -> PodSpec {
        PodSpec::new(namespace, name, node)
            .service_account(gateway)
            .label(GATEWAY_NAME_LABEL, gateway)
            .label(MANAGED_LABEL, MANAGED_BY_MESH)
    }
}

/// A waypoint Gateway as `istioctl waypoint generate` writes it, for `for_traffic` (`service`,
/// `workload`, `all`; `None`: the default, Services).
pub fn gateway_yaml(namespace: &str, name: &str, for_traffic: Option<&str>) -> String {
    let labels = for_traffic
        .map(|t| format!("\n  labels:\n    istio.io/waypoint-for: {t}"))
        .unwrap_or_default();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: {namespace}{labels}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n"
    )
}

impl Cluster {
    /// Starts `mesh-agent waypoint` in pod `namespace/name` (a pod of [`PodSpec::waypoint`]),
    /// reading the same state as the agents, and waits until its readiness (15021 in the pod)
    /// answers 200.
    pub async fn start_waypoint(&self, namespace: &str, name: &str) -> Result<Agent> {
        self.start_waypoint_with(namespace, name, AgentOptions::default())
            .await
    }

    pub async fn start_waypoint_with(
        &self,
        namespace: &str,
        name: &str,
        options: AgentOptions,
    ) -> Result<Agent> {
        let pod = self.pod(namespace, name);
        let subcommand = [
            "waypoint".to_string(),
            "--pod-namespace".into(),
            namespace.into(),
            "--pod-name".into(),
            name.into(),
        ];
        let mut waypoint = self.spawn(
            pod.netns(),
            pod.node,
            &format!("waypoint-{name}"),
            &subcommand,
            &options,
        )?;
        if !options.wait_ready {
            return Ok(waypoint);
        }
        let ready = SocketAddr::from(([127, 0, 0, 1], READY_PORT));
        let deadline = tokio::time::Instant::now() + options.ready_timeout;
        loop {
            if let Some(status) = waypoint.try_exit()? {
                bail!(
                    "waypoint {namespace}/{name} exited ({status}) before it was ready; log:\n{}",
                    waypoint.log_tail(200)
                );
            }
            let last = match pod.netns().http_get(ready, READY_PATH).await {
                Ok(r) if r.status == 200 => return Ok(waypoint),
                Ok(r) => format!("HTTP {} {}", r.status, r.body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "waypoint {namespace}/{name} not ready within {:?} (last probe: {last}); log:\n{}",
                    options.ready_timeout,
                    waypoint.log_tail(200)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
