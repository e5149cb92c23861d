//! Tests of the harness alone, no mesh-agent: the wiring carries traffic intact between every
//! pair of pods, looks the way a routed CNI leaves it, writes valid state, and leaves nothing behind.

use std::{collections::BTreeMap, process::Command, time::Duration};

use mesh_tests::{AgentOptions, Cluster, ClusterSpec, PodSpec, require_root};

const ECHO: u16 = 7000;
const SINK: u16 = 7001;
const PEER: u16 = 7002;

fn four_pods() -> ClusterSpec {
    ClusterSpec::new()
        .namespace("shop", &[("mesh-agent.dev/mode", "ambient")])
        .namespace("legacy", &[])
        .pod(
            PodSpec::new("shop", "web-1", 0)
                .service_account("web")
                .label("app", "web"),
        )
        .pod(PodSpec::new("legacy", "batch-1", 0))
        .pod(
            PodSpec::new("shop", "web-2", 1)
                .service_account("web")
                .label("app", "web"),
        )
        .pod(PodSpec::new("legacy", "batch-2", 1))
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pod_pair_exchanges_intact_payloads() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new(four_pods()).unwrap();
    let mut servers = Vec::new();
    for pod in cluster.pods() {
        servers.push(pod.echo_server(ECHO).await.unwrap());
        servers.push(pod.sink_server(SINK).await.unwrap());
        servers.push(pod.peer_server(PEER).await.unwrap());
    }
    for from in cluster.pods() {
        for to in cluster.pods().iter().filter(|p| p.ip != from.ip) {
            let flow = format!("{} -> {}", from.id(), to.id());
            from.send_and_verify(to.addr(ECHO), 64 * 1024)
                .await
                .unwrap_or_else(|e| panic!("{flow}: echo: {e:#}"));
            from.send_to_sink(to.addr(SINK), 64 * 1024)
                .await
                .unwrap_or_else(|e| panic!("{flow}: sink: {e:#}"));
            let seen = from
                .ask_peer(to.addr(PEER))
                .await
                .unwrap_or_else(|e| panic!("{flow}: peer: {e:#}"));
            // Routed, no NAT: the server sees the client pod's own address and port.
            assert_eq!(seen.seen_by_server, seen.local, "{flow}");
            assert_eq!(seen.local.ip(), from.ip, "{flow}");
        }
    }
    // The extremes, on one same-node and one cross-node pair.
    let (web1, batch1, web2) = (
        cluster.pod("shop", "web-1"),
        cluster.pod("legacy", "batch-1"),
        cluster.pod("shop", "web-2"),
    );
    for len in [1, 16 * 1024 * 1024] {
        web1.send_and_verify(batch1.addr(ECHO), len).await.unwrap();
        web1.send_and_verify(web2.addr(ECHO), len).await.unwrap();
        batch1.send_to_sink(web2.addr(SINK), len).await.unwrap();
    }
    for server in &servers {
        assert!(
            server.errors().is_empty(),
            "server errors: {:?}",
            server.errors()
        );
    }
}

#[tokio::test]
async fn connecting_to_a_closed_port_fails_fast() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new(four_pods()).unwrap();
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let started = std::time::Instant::now();
    let err = web1.send_and_verify(web2.addr(9), 10).await.unwrap_err();
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn wiring_matches_a_routed_cni() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new(four_pods()).unwrap();
    let x = cluster.octet();
    for node in cluster.nodes() {
        assert_eq!(node.name, format!("mt{}-n{}", cluster.id(), node.index + 1));
        assert_eq!(node.netns().sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
        let other = 2 - node.index;
        let routes = cluster.ip(node.index, &["-4", "route", "show"]).unwrap();
        assert!(
            routes.contains(&format!(
                "10.{x}.{other}.0/24 via 192.168.{x}.{other} dev eth0"
            )),
            "{routes}"
        );
        for pod in cluster.pods().iter().filter(|p| p.node == node.index) {
            assert!(pod.host_veth.starts_with("veth") && pod.host_veth.len() == 12);
            // The route a CNI installs and the agent looks the pod's veth up by.
            let route = cluster
                .ip(
                    node.index,
                    &["-4", "route", "show", &format!("{}/32", pod.ip)],
                )
                .unwrap();
            assert_eq!(
                route.trim(),
                format!("{} dev {} scope link", pod.ip, pod.host_veth)
            );
            let addr = cluster
                .ip(
                    node.index,
                    &["-4", "-o", "addr", "show", "dev", &pod.host_veth],
                )
                .unwrap();
            assert!(addr.contains("169.254.1.1/32"), "{addr}");
            let pod_routes = pod.netns().ip(&["-4", "route", "show"]).unwrap();
            assert!(
                pod_routes.contains("default via 169.254.1.1 dev eth0"),
                "{pod_routes}"
            );
            assert!(
                pod_routes.contains("169.254.1.1 dev eth0 scope link"),
                "{pod_routes}"
            );
            let pod_addr = pod
                .exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
                .unwrap();
            assert!(pod_addr.contains(&format!("{}/32", pod.ip)), "{pod_addr}");
            assert_eq!(pod.ip.octets()[..3], [10, x, node.index as u8 + 1]);
        }
    }
    // Commands run in the namespace but keep the host's mounts (bpffs, cgroup2 stay visible).
    let mounts = cluster
        .node_exec(0, &["cat", "/proc/self/mountinfo"])
        .unwrap();
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(mounts.lines().count(), host_mounts.lines().count());
}

#[test]
fn state_files_are_kubernetes_yaml_and_relabelling_rewrites_them() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new(four_pods()).unwrap();
    let read = |file: &str| std::fs::read_to_string(cluster.state_dir().join(file)).unwrap();
    let shop: k8s_openapi::api::core::v1::Namespace =
        serde_yaml::from_str(&read("namespace-shop.yaml")).unwrap();
    assert_eq!(
        shop.metadata.labels.unwrap()["mesh-agent.dev/mode"],
        "ambient"
    );
    let pod: k8s_openapi::api::core::v1::Pod =
        serde_yaml::from_str(&read("pod-shop-web-2.yaml")).unwrap();
    let web2 = cluster.pod("shop", "web-2");
    assert_eq!(pod.metadata.uid.as_deref(), Some(web2.uid.as_str()));
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(cluster.node(1).name.as_str())
    );
    assert_eq!(
        pod.spec.unwrap().service_account_name.as_deref(),
        Some("web")
    );
    assert_eq!(pod.status.unwrap().pod_ip, Some(web2.ip.to_string()));

    cluster
        .set_namespace_labels("legacy", &[("mesh-agent.dev/mode", "ambient")])
        .unwrap();
    let legacy: k8s_openapi::api::core::v1::Namespace =
        serde_yaml::from_str(&read("namespace-legacy.yaml")).unwrap();
    assert_eq!(
        legacy.metadata.labels.unwrap()["mesh-agent.dev/mode"],
        "ambient"
    );

    cluster
        .set_pod_labels("legacy", "batch-1", &[("tier", "batch")])
        .unwrap();
    let batch: k8s_openapi::api::core::v1::Pod =
        serde_yaml::from_str(&read("pod-legacy-batch-1.yaml")).unwrap();
    let labels: BTreeMap<String, String> = batch.metadata.labels.unwrap();
    assert_eq!(
        labels,
        BTreeMap::from([("tier".to_owned(), "batch".to_owned())])
    );

    cluster
        .set_pod_in_state("legacy", "batch-1", false)
        .unwrap();
    assert!(!cluster.state_dir().join("pod-legacy-batch-1.yaml").exists());
    cluster.set_pod_in_state("legacy", "batch-1", true).unwrap();
    assert!(read("pod-legacy-batch-1.yaml").contains("tier"));

    cluster
        .write_state_file("broken.yaml", "kind: Pod\nmetadata: [\n")
        .unwrap();
    assert_eq!(read("broken.yaml"), "kind: Pod\nmetadata: [\n");
    // No temp files left behind by the atomic writes.
    let names: Vec<String> = std::fs::read_dir(cluster.state_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    assert_eq!(names.len(), 2 + 4 + 1, "{names:?}");
}

#[test]
fn dropping_the_cluster_removes_every_namespace_even_after_a_panic() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new(four_pods()).unwrap();
    let names = cluster.netns_names();
    let temp_dir = cluster.temp_dir().to_owned();
    assert_eq!(names.len(), 6);
    let listed = netns_list();
    assert!(
        names.iter().all(|n| listed.contains(n.as_str())),
        "{listed}"
    );
    drop(cluster);
    let listed = netns_list();
    assert!(
        names.iter().all(|n| !listed.contains(n.as_str())),
        "left behind: {listed}"
    );
    assert!(!temp_dir.exists());

    let panicked = std::thread::spawn(|| {
        let cluster = Cluster::new(four_pods()).unwrap();
        std::panic::panic_any((cluster.netns_names(), cluster.temp_dir().to_owned()));
    })
    .join()
    .unwrap_err();
    let (names, kept) = panicked
        .downcast_ref::<(Vec<String>, std::path::PathBuf)>()
        .unwrap();
    let listed = netns_list();
    assert!(
        names.iter().all(|n| !listed.contains(n.as_str())),
        "left behind: {listed}"
    );
    // After a panic the state and logs are kept for debugging.
    assert!(kept.join("state").is_dir());
    std::fs::remove_dir_all(kept).unwrap();
}

#[tokio::test]
async fn agent_handles_start_stop_and_report_with_a_stand_in_agent() {
    if !require_root() {
        return;
    }
    let spec = four_pods().agent_binary(env!("CARGO_BIN_EXE_fake-agent"));
    let cluster = Cluster::new(spec).unwrap();
    let mut agents = [
        cluster.start_agent(0).await.unwrap(),
        cluster.start_agent(1).await.unwrap(),
    ];
    for (i, agent) in agents.iter_mut().enumerate() {
        let line = agent
            .wait_for_log("started", Duration::from_secs(20))
            .await
            .unwrap();
        assert!(
            line.contains(&format!("node={}", cluster.node(i).name)),
            "{line}"
        );
        assert!(
            line.contains(&cluster.state_dir().display().to_string()),
            "{line}"
        );
        assert!(agent.rss_kib().unwrap() > 0);
        let ready = cluster.readiness(i).await.unwrap();
        assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    }
    let status = cluster.cli_json(0, &["status", "-o", "json"]).unwrap();
    assert_eq!(status["agent"], "fake");

    let exit = agents[0].terminate().await.unwrap();
    assert!(exit.success(), "{exit}");
    assert!(agents[0].log().contains("draining"));
    assert!(!agents[0].is_running());
    let killed = agents[1].kill().unwrap();
    assert!(!killed.success());

    // Readiness that never comes fails with the agent's log, in bounded time.
    let options = AgentOptions {
        ready_timeout: Duration::from_secs(1),
        ..AgentOptions::default()
    }
    .arg("--never-ready");
    let err = cluster.start_agent_with(0, options).await.err().unwrap();
    let err = format!("{err:#}");
    assert!(
        err.contains("not ready within")
            && err.contains("HTTP 503")
            && err.contains("fake-agent started"),
        "{err}"
    );
    // An agent that exits early fails at once, with its log.
    let err = cluster
        .start_agent_with(1, AgentOptions::default().arg("--exit-after-ms").arg("0"))
        .await
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("giving up"), "{err:#}");
}
