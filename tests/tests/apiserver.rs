//! The test API server driven by the real kube-rs client: paged lists, watcher + reflector with
//! field selectors, 410 relists, BOOKMARK resumes, uninstalled custom kinds, auth, outages.
//! Needs no root.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Config, ResourceExt as _};
use mesh_tests::apiserver::{ApiServer, ApiServerConfig, Verb};
use serde_json::{Value, json};

const PODS: &str = "/api/v1/pods";

async fn server(config: ApiServerConfig) -> ApiServer {
    ApiServer::bind("127.0.0.1:0".parse().expect("addr"), config)
        .await
        .expect("start the test API server")
}

async fn client_from(kubeconfig: Kubeconfig) -> Client {
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig accepted");
    Client::try_from(config).expect("client")
}

async fn client(api: &ApiServer) -> Client {
    client_from(Kubeconfig::read_from(api.kubeconfig_path()).expect("read kubeconfig")).await
}

fn pod(name: &str, node: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]}})
}

/// Waits (at most 15 s) until `check` holds.
async fn eventually<F: Fn() -> bool>(what: &str, check: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("{what} took over 30 s"))
}

fn names(store: &Store<Pod>) -> Vec<String> {
    let mut names: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
    names.sort();
    names
}

/// A reflector over Pods on node `n1`, driven in the background; returns its store.
fn reflect_n1(
    client: Client,
    config: watcher::Config,
) -> (Store<Pod>, tokio::task::JoinHandle<()>) {
    let (store, writer) = reflector::store();
    let stream = watcher(Api::<Pod>::all(client), config.fields("spec.nodeName=n1"))
        .default_backoff()
        .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    (store, task)
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_list_returns_every_pod_and_an_unknown_continue_is_410() {
    let api = server(ApiServerConfig::default()).await;
    for i in 0..5 {
        api.apply(pod(&format!("p{i}"), "n1", json!({})))
            .expect("apply");
    }
    let pods = Api::<Pod>::all(client(&api).await);
    let (mut seen, mut token, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let mut params = ListParams::default().limit(2);
        if let Some(token) = &token {
            params = params.continue_token(token);
        }
        let page = bounded("list", pods.list(&params)).await.expect("list");
        pages += 1;
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|p| p.name_any()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(next) => token = Some(next),
            None => {
                assert_eq!(page.metadata.resource_version.as_deref(), Some("6"));
                break;
            }
        }
    }
    assert_eq!(
        (seen, pages),
        (
            vec!["p0", "p1", "p2", "p3", "p4"]
                .into_iter()
                .map(String::from)
                .collect(),
            3
        )
    );
    assert_eq!(api.requests(Verb::List, PODS), 3);
    let expired = pods
        .list(&ListParams::default().limit(2).continue_token("6.999"))
        .await;
    assert_eq!(api_error(expired), 410);
    // In a namespace, and one object.
    let shop = Api::<Pod>::namespaced(client(&api).await, "shop");
    assert_eq!(
        shop.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        5
    );
    assert_eq!(
        shop.get("p3")
            .await
            .expect("get")
            .spec
            .and_then(|s| s.node_name)
            .as_deref(),
        Some("n1")
    );
    assert_eq!(api_error(shop.get("nope").await), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflector_with_a_field_selector_follows_pods_onto_and_off_the_node() {
    let api = server(ApiServerConfig::default()).await;
    api.apply(pod("a", "n1", json!({"app": "a"})))
        .expect("apply");
    api.apply(pod("b", "n2", json!({}))).expect("apply");
    api.apply(pod("c", "n1", json!({}))).expect("apply");
    let (store, _task) = reflect_n1(client(&api).await, watcher::Config::default());
    bounded("initial list", store.wait_until_ready())
        .await
        .expect("ready");
    assert_eq!(names(&store), ["a", "c"]);

    api.apply(pod("d", "n1", json!({}))).expect("new pod");
    eventually("the new pod", || names(&store) == ["a", "c", "d"]).await;
    api.apply(pod("a", "n1", json!({"app": "changed"})))
        .expect("label change");
    eventually("the label change", || {
        store
            .state()
            .iter()
            .any(|p| p.labels().get("app").map(String::as_str) == Some("changed"))
    })
    .await;
    api.apply(pod("c", "n2", json!({})))
        .expect("move off the node");
    eventually("the pod that moved away", || names(&store) == ["a", "d"]).await;
    api.apply(pod("b", "n1", json!({})))
        .expect("move onto the node");
    eventually("the pod that moved in", || names(&store) == ["a", "b", "d"]).await;
    api.delete("Pod", "shop", "d").expect("delete");
    eventually("the deleted pod", || names(&store) == ["a", "b"]).await;
    assert_eq!(api.requests(Verb::List, PODS), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_makes_the_watcher_relist_and_the_store_stays_right() {
    let api = server(ApiServerConfig::default()).await;
    api.apply(pod("a", "n1", json!({}))).expect("apply");
    let (store, _task) = reflect_n1(client(&api).await, watcher::Config::default());
    bounded("initial list", store.wait_until_ready())
        .await
        .expect("ready");
    eventually("the watch", || api.requests(Verb::Watch, PODS) == 1).await;

    api.expire_watches();
    api.delete("Pod", "shop", "a").expect("delete");
    api.apply(pod("b", "n1", json!({}))).expect("apply");
    eventually("a relist", || api.requests(Verb::List, PODS) == 2).await;
    eventually("the store after the relist", || names(&store) == ["b"]).await;
    api.apply(pod("c", "n1", json!({}))).expect("apply");
    eventually("a pod after the relist", || names(&store) == ["b", "c"]).await;

    // As the apiserver does: a watch from a compacted resourceVersion is a 200 whose one event
    // is an ERROR carrying 410 Expired.
    api.compact();
    let pods = Api::<Pod>::all(client(&api).await);
    let events = pods
        .watch(&WatchParams::default(), "2")
        .await
        .expect("watch is a 200");
    let mut events = std::pin::pin!(events);
    match bounded("the ERROR event", events.next()).await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(
        bounded("the end of the stream", events.next())
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_let_a_watch_resume_after_its_timeout_without_relisting() {
    let api = server(ApiServerConfig {
        bookmark_interval: Duration::from_millis(200),
        ..ApiServerConfig::default()
    })
    .await;
    api.apply(pod("a", "n1", json!({}))).expect("apply");
    let (store, _task) = reflect_n1(client(&api).await, watcher::Config::default().timeout(3));
    bounded("initial list", store.wait_until_ready())
        .await
        .expect("ready");
    // Changes the watch does not see move the resourceVersion on; only bookmarks tell the client.
    for i in 0..5 {
        api.apply(pod(&format!("other{i}"), "n2", json!({})))
            .expect("apply");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Without the bookmarks, the re-watch would come from an RV older than the history: a 410.
    api.compact();
    eventually("the watch restarted after its timeout", || {
        api.requests(Verb::Watch, PODS) >= 2
    })
    .await;
    api.apply(pod("b", "n1", json!({}))).expect("apply");
    eventually("a pod after the restart", || names(&store) == ["a", "b"]).await;
    assert_eq!(
        api.requests(Verb::List, PODS),
        1,
        "resumed without a relist"
    );
}

fn authorization_policies() -> ApiResource {
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_kinds_are_404_until_installed_and_then_list_and_watch_as_dynamic_objects() {
    let api = server(ApiServerConfig {
        istio_installed: false,
        ..ApiServerConfig::default()
    })
    .await;
    let ar = authorization_policies();
    let policies = Api::<DynamicObject>::all_with(client(&api).await, &ar);
    assert_eq!(api_error(policies.list(&ListParams::default()).await), 404);

    api.apply(
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": "deny-all", "namespace": "shop"},
                     "spec": {"action": "DENY", "rules": [{}]}}),
    )
    .expect("apply");
    api.install_istio();
    let list = policies
        .list(&ListParams::default())
        .await
        .expect("list once installed");
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].data["spec"]["action"], "DENY");

    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let store = writer.as_reader();
    let stream = watcher(policies.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let _task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    bounded("initial list", store.wait_until_ready())
        .await
        .expect("ready");
    api.apply(
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": "allow", "namespace": "shop"},
                     "spec": {"action": "ALLOW"}}),
    )
    .expect("apply");
    eventually("the second policy", || store.state().len() == 2).await;

    let gvk = GroupVersionKind::gvk("security.istio.io", "v1beta1", "PeerAuthentication");
    let beta = ApiResource::from_gvk_with_plural(&gvk, "peerauthentications");
    let peer = Api::<DynamicObject>::all_with(client(&api).await, &beta);
    assert!(
        peer.list(&ListParams::default())
            .await
            .expect("v1beta1 lists")
            .items
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_401_and_malformed_requests_are_400() {
    let api = server(ApiServerConfig::default()).await;
    let text = std::fs::read_to_string(api.kubeconfig_path()).expect("kubeconfig");
    let wrong = Kubeconfig::from_yaml(&text.replace(api.token(), "wrong")).expect("yaml");
    let pods = Api::<Pod>::all(client_from(wrong).await);
    assert_eq!(api_error(pods.list(&ListParams::default()).await), 401);

    let client = client(&api).await;
    for bad in [
        "/api/v1/pods?&limit=many",
        "/api/v1/pods?&fieldSelector=spec.containers%3Dx",
        "/api/v1/pods?&labelSelector=a+in+(b",
        "/api/v1/pods?&watch=true&resourceVersion=abc",
        "/api/v1/pods?&x=%zz",
    ] {
        let request = http::Request::get(bad).body(Vec::new()).expect("request");
        let result = client.request_text(request).await;
        assert_eq!(api_error(result), 400, "{bad}");
    }
    let request = http::Request::get("/apis/apps/v1/deployments")
        .body(Vec::new())
        .expect("request");
    assert_eq!(api_error(client.request_text(request).await), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_recovers_when_the_server_comes_back() {
    let api = server(ApiServerConfig::default()).await;
    api.apply(pod("a", "n1", json!({}))).expect("apply");
    let client = client(&api).await;
    let (store, _task) = reflect_n1(client.clone(), watcher::Config::default());
    bounded("initial list", store.wait_until_ready())
        .await
        .expect("ready");

    api.down().await;
    let pods = Api::<Pod>::all(client.clone());
    let result = bounded("a list while down", pods.list(&ListParams::default())).await;
    assert!(result.is_err(), "the server is down: {result:?}");
    assert!(
        tokio::net::TcpStream::connect(api.addr()).await.is_err(),
        "connections refused"
    );
    api.apply(pod("b", "n1", json!({})))
        .expect("apply while down");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(names(&store), ["a"], "the last state stays");

    api.up().await.expect("up again");
    eventually("the watcher after the outage", || {
        names(&store) == ["a", "b"]
    })
    .await;
    assert!(pods.list(&ListParams::default()).await.is_ok());
}

/// A server started on a listener inside a network namespace comes back up in that namespace.
/// Creating the namespace needs root; without it there is nothing to check here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_and_up_inside_a_network_namespace() {
    if !mesh_tests::is_root() {
        mesh_tests::skip("creating a network namespace needs root");
        return;
    }
    let name = format!("mtapi{:x}", std::process::id());
    let netns = mesh_tests::Netns::create(&name).expect("netns");
    let listener = netns
        .listen_on("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("listen in the netns");
    let api = ApiServer::start(listener, ApiServerConfig::default()).expect("start");
    assert!(
        netns.connect(api.addr()).await.is_ok(),
        "serving in the netns"
    );
    assert!(
        tokio::net::TcpStream::connect(api.addr()).await.is_err(),
        "not in this namespace"
    );
    api.down().await;
    assert!(netns.connect(api.addr()).await.is_err(), "down: refused");
    api.up().await.expect("up");
    assert!(
        netns.connect(api.addr()).await.is_ok(),
        "up again in the netns"
    );
}
