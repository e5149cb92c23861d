//! The Kubernetes API as the state source: one list-then-watch reflector per kind (kube-rs, with
//! its default backoff), slimmed to what the mesh reads, and every burst of changes coalesced
//! into one rebuild of the snapshot, in which each bad object is rejected alone.
//!
//! A kind whose custom resource type is not installed (404) counts as empty and is retried by
//! the backoff; it never holds readiness back. When the API server cannot be reached the stores
//! keep what they hold, so the last state keeps serving; a relist (after 410 Gone) swaps a
//! store's contents in one step, so no pod is released and enrolled again on the way.

pub mod daemonset;
mod store;
mod wire;

use std::{
    collections::BTreeSet,
    fmt::Debug,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{Notify, watch};

use self::store::Store;
use super::StateStatus;
use crate::state::{
    self, AuthorizationPolicy, AuthorizationPolicyResource, Origin, PeerAuthentication, Record,
    Records, RequestAuthentication, RequestAuthenticationResource, Snapshot, StateError,
    TargetRefSpec, Workload, WorkloadSelector, record,
};

/// The pseudo file that state problems of API objects name.
pub const ORIGIN: &str = "kubernetes";
/// A burst of events is taken in one rebuild once it has been quiet this long...
const QUIET: Duration = Duration::from_millis(20);
/// ...or once it has lasted this long.
const MAX_COALESCE: Duration = Duration::from_millis(200);
/// How often a failing source asks whether the API server is back.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// How to reach the API server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Connection {
    /// From inside a pod: `KUBERNETES_SERVICE_HOST`/`_PORT` and the service account's token.
    InCluster,
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
}

impl Connection {
    /// `InCluster` when this process runs in a pod (`KUBERNETES_SERVICE_HOST` is set).
    pub fn in_cluster() -> Option<Connection> {
        std::env::var_os("KUBERNETES_SERVICE_HOST").map(|_| Connection::InCluster)
    }

    /// What `status` shows as the source: the API server's URL and how it is reached.
    fn describe(&self, api_server: &http::Uri) -> PathBuf {
        match self {
            Connection::InCluster => PathBuf::from(format!(
                "kubernetes {api_server} (in-cluster service account)"
            )),
            Connection::Kubeconfig(path) => PathBuf::from(format!(
                "kubernetes {api_server} (kubeconfig {})",
                path.display()
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("in-cluster configuration: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for `connection`, and the URL of the API server it talks to.
pub async fn client(connection: &Connection) -> Result<(Client, http::Uri), KubeError> {
    let config = match connection {
        Connection::InCluster => kube::Config::incluster()?,
        Connection::Kubeconfig(path) => {
            let error = |source| KubeError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(error)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(error)?
        }
    };
    let api_server = config.cluster_url.clone();
    Ok((Client::try_from(config)?, api_server))
}

/// How one watch is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchState {
    /// Listing (at start, or relisting after 410 Gone); the previous contents still serve.
    Listing,
    /// Listed, and watching.
    Synced,
    /// The kind is not installed (404): it counts as empty, and is checked again.
    NotInstalled,
}

/// One watched kind, for `mesh-agent status`.
#[derive(Debug, Clone, Serialize)]
pub struct WatchStatus {
    pub kind: &'static str,
    pub state: WatchState,
    /// Objects in its store.
    pub objects: usize,
    pub last_event: Option<SystemTime>,
    /// The last failure (API server unreachable, forbidden, …) and since when it lasts;
    /// cleared once the watch is back.
    pub last_error: Option<String>,
    pub failing_since: Option<SystemTime>,
}

/// What the watch tasks share with the rebuild loop.
struct Shared {
    watches: Mutex<Vec<WatchStatus>>,
    changed: Notify,
}

impl Shared {
    fn update(&self, slot: usize, f: impl FnOnce(&mut WatchStatus)) {
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(watch) = watches.get_mut(slot) {
            f(watch);
        }
    }

    /// Every kind has been listed once (or found not installed).
    fn ready(&self) -> bool {
        let watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        watches
            .iter()
            .all(|w| w.state != WatchState::Listing || w.last_event.is_some())
    }

    fn snapshot(&self) -> Vec<WatchStatus> {
        self.watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The records of every watched kind.
struct Stores {
    namespaces: Arc<Store<state::Namespace>>,
    pods: Arc<Store<Workload>>,
    services: Arc<Store<state::Service>>,
    endpoint_slices: Arc<Store<state::EndpointSlice>>,
    authorization_policies: Arc<Store<AuthorizationPolicy>>,
    peer_authentications: Arc<Store<PeerAuthentication>>,
    gateways: Arc<Store<state::Waypoint>>,
    http_routes: Arc<Store<state::HttpRoute>>,
    grpc_routes: Arc<Store<state::HttpRoute>>,
    request_authentications: Arc<Store<RequestAuthentication>>,
}

/// The running source: the snapshot, its status and each watch's.
pub struct KubeSource {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub status: watch::Receiver<StateStatus>,
    pub watches: watch::Receiver<Vec<WatchStatus>>,
}

const KINDS: [&str; 10] = [
    "Namespace",
    "Pod",
    "Service",
    "EndpointSlice",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "Gateway",
    "HTTPRoute",
    "RequestAuthentication",
    "GRPCRoute",
];

/// Starts a watch per kind and the rebuild loop on the current runtime, and returns once every
/// kind has been listed (or found not installed) and the first snapshot is built: until then
/// the agent is not ready.
pub async fn start(client: Client, api_server: &http::Uri, connection: &Connection) -> KubeSource {
    let now = SystemTime::now();
    let shared = Arc::new(Shared {
        watches: Mutex::new(
            KINDS
                .iter()
                .map(|kind| WatchStatus {
                    kind,
                    state: WatchState::Listing,
                    objects: 0,
                    last_event: None,
                    last_error: None,
                    failing_since: None,
                })
                .collect(),
        ),
        changed: Notify::new(),
    });
    let istio = |kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("security.istio.io", "v1", kind),
            plural,
        )
    };
    let (authz, peers, request_authns) = (
        istio("AuthorizationPolicy", "authorizationpolicies"),
        istio("PeerAuthentication", "peerauthentications"),
        istio("RequestAuthentication", "requestauthentications"),
    );
    let gateway_api = |kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(state::gateway_api::GROUP, "v1", kind),
            plural,
        )
    };
    let (gateways, http_routes, grpc_routes) = (
        gateway_api("Gateway", "gateways"),
        gateway_api("HTTPRoute", "httproutes"),
        gateway_api("GRPCRoute", "grpcroutes"),
    );
    let probe = Api::<Namespace>::all(client.clone());
    let stores = Stores {
        namespaces: spawn_watch(Api::all(client.clone()), read_namespace, 0, &shared),
        pods: spawn_watch(Api::all(client.clone()), read_pod, 1, &shared),
        services: spawn_watch(Api::all(client.clone()), read_service, 2, &shared),
        endpoint_slices: spawn_watch(Api::all(client.clone()), read_endpoint_slice, 3, &shared),
        authorization_policies: spawn_watch(
            Api::all_with(client.clone(), &authz),
            read_authorization_policy,
            4,
            &shared,
        ),
        peer_authentications: spawn_watch(
            Api::all_with(client.clone(), &peers),
            read_peer_authentication,
            5,
            &shared,
        ),
        gateways: spawn_watch(
            Api::all_with(client.clone(), &gateways),
            read_gateway,
            6,
            &shared,
        ),
        http_routes: spawn_watch(
            Api::all_with(client.clone(), &http_routes),
            read_http_route,
            7,
            &shared,
        ),
        request_authentications: spawn_watch(
            Api::all_with(client.clone(), &request_authns),
            read_request_authentication,
            8,
            &shared,
        ),
        grpc_routes: spawn_watch(
            Api::all_with(client, &grpc_routes),
            read_grpc_route,
            9,
            &shared,
        ),
    };

    while !shared.ready() {
        shared.changed.notified().await;
    }
    let (snapshot, errors) = build(&stores, &Snapshot::default());
    let reported = report(&errors, &BTreeSet::new());
    let status = StateStatus {
        path: connection.describe(api_server),
        generation: 1,
        last_loaded: Some(SystemTime::now()),
        last_error: summary(&errors),
        errors,
        last_failed: None,
    };
    tracing::info!(
        workloads = snapshot.workloads.len(),
        services = snapshot.services.len(),
        since_start = ?now.elapsed().unwrap_or_default(),
        "state listed from the Kubernetes API"
    );
    let snapshot_tx = watch::Sender::new(Arc::new(snapshot));
    let status_tx = watch::Sender::new(status);
    let watches_tx = watch::Sender::new(shared.snapshot());
    let source = KubeSource {
        snapshot: snapshot_tx.subscribe(),
        status: status_tx.subscribe(),
        watches: watches_tx.subscribe(),
    };
    tokio::spawn(probe_while_failing(probe, shared.clone()));
    tokio::spawn(rebuild_loop(
        stores,
        shared,
        snapshot_tx,
        status_tx,
        watches_tx,
        reported,
    ));
    source
}

/// A watch that resumes after a failure says nothing until an object changes (kube-rs does not
/// surface BOOKMARKs), so while any watch is failing the API server is asked for one namespace
/// every [`PROBE_INTERVAL`]; once it answers, the failures are over. It lives as long as the
/// watches do: the agent's whole life.
async fn probe_while_failing(api: Api<Namespace>, shared: Arc<Shared>) {
    let list = kube::api::ListParams::default().limit(1);
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let failing = shared.snapshot().iter().any(|w| w.failing_since.is_some());
        if failing && api.list_metadata(&list).await.is_ok() {
            for slot in 0..KINDS.len() {
                shared.update(slot, |w| {
                    if w.failing_since.take().is_some() {
                        w.last_error = None;
                    }
                });
            }
            tracing::info!("the Kubernetes API answers again");
            shared.changed.notify_one();
        }
    }
}

/// Waits for changes, coalesces each burst, rebuilds, and publishes what differs.
async fn rebuild_loop(
    stores: Stores,
    shared: Arc<Shared>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<StateStatus>,
    watches: watch::Sender<Vec<WatchStatus>>,
    mut reported: BTreeSet<String>,
) {
    loop {
        shared.changed.notified().await;
        let burst = tokio::time::Instant::now();
        while burst.elapsed() < MAX_COALESCE
            && tokio::time::timeout(QUIET, shared.changed.notified())
                .await
                .is_ok()
        {}
        if snapshot.is_closed() && status.is_closed() {
            return;
        }
        watches.send_replace(shared.snapshot());
        let previous = snapshot.borrow().clone();
        let (next, errors) = build(&stores, &previous);
        reported = report(&errors, &reported);
        if **snapshot.borrow() != next {
            snapshot.send_replace(Arc::new(next));
            status.send_modify(|status| {
                status.generation += 1;
                status.last_loaded = Some(SystemTime::now());
            });
        }
        status.send_if_modified(|status| {
            let last_error = summary(&errors);
            let changed = status.last_error != last_error;
            if changed {
                status.last_failed = last_error.as_ref().map(|_| SystemTime::now());
                status.last_error = last_error;
                status.errors = errors;
            }
            changed
        });
    }
}

/// Logs each problem once, when it first appears; returns the problems now present.
fn report(errors: &[StateError], reported: &BTreeSet<String>) -> BTreeSet<String> {
    let mut now = BTreeSet::new();
    for error in errors {
        let text = error.to_string();
        if !reported.contains(&text) {
            tracing::error!(
                object = %error.object,
                field = error.field.as_deref().unwrap_or("-"),
                reason = %error.reason,
                "object rejected; the rest of the state applies"
            );
        }
        now.insert(text);
    }
    now
}

fn summary(errors: &[StateError]) -> Option<String> {
    (!errors.is_empty()).then(|| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// Watches `api`, keeping the record `read` makes of each object in a store, and records each
/// event in slot `slot` of `shared`.
fn spawn_watch<K, M>(
    api: Api<K>,
    read: fn(K) -> Record<M>,
    slot: usize,
    shared: &Arc<Shared>,
) -> Arc<Store<M>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    M: Send + Sync + 'static,
{
    let store = Arc::new(Store::default());
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let (shared, writer) = (shared.clone(), store.clone());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let now = SystemTime::now();
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    failed(&shared, slot, &error, now);
                    continue;
                }
            };
            let settled = !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_));
            let listed = matches!(event, watcher::Event::InitDone);
            if matches!(event, watcher::Event::Init) {
                shared.update(slot, |w| w.state = WatchState::Listing);
            }
            writer.apply(event, read);
            if settled {
                shared.update(slot, |w| {
                    if listed {
                        w.state = WatchState::Synced;
                    }
                    w.last_event = Some(now);
                    w.last_error = None;
                    w.failing_since = None;
                    w.objects = writer.len();
                });
                shared.changed.notify_one();
            }
        }
    });
    store
}

/// Records a failed watch: a kind that is not installed counts as listed (and empty); any
/// other failure says since when it lasts. Each is logged when it starts.
fn failed(shared: &Shared, slot: usize, error: &watcher::Error, now: SystemTime) {
    let not_installed = matches!(
        error,
        watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 404
    );
    let mut first = false;
    shared.update(slot, |w| {
        first = w.last_error.is_none();
        w.last_error = Some(error.to_string());
        if not_installed {
            // Counts as listed: the kind is empty until it is installed.
            w.state = WatchState::NotInstalled;
            w.last_event.get_or_insert(now);
        } else {
            w.failing_since.get_or_insert(now);
        }
    });
    if first {
        let kind = KINDS[slot];
        if not_installed {
            tracing::warn!(
                kind,
                "custom resource type not installed; counted as none, checked again"
            );
        } else {
            tracing::warn!(kind, %error, "watch failing; the last state keeps serving");
        }
    }
    shared.changed.notify_one();
}

/// Everything the stores hold, as a snapshot with each bad object rejected alone.
fn build(stores: &Stores, previous: &Snapshot) -> (Snapshot, Vec<StateError>) {
    let records = Records {
        namespaces: stores.namespaces.records(),
        pods: stores.pods.records(),
        services: stores.services.records(),
        endpoint_slices: stores.endpoint_slices.records(),
        authorization_policies: stores.authorization_policies.records(),
        peer_authentications: stores.peer_authentications.records(),
        gateways: stores.gateways.records(),
        http_routes: stores.http_routes.records(),
        grpc_routes: stores.grpc_routes.records(),
        request_authentications: stores.request_authentications.records(),
    };
    Snapshot::join(&records, Vec::new(), previous)
}

/// Where an API object came from: the API. Its record's label names the object
/// (`Pod shop/web-1`); the origin does not repeat it for each of the cluster's objects.
fn origin() -> Origin {
    Origin::new(ORIGIN, "")
}

fn read_namespace(object: wire::Namespace) -> Record<state::Namespace> {
    let origin = origin();
    record::namespace(origin, &object.into())
}

fn read_pod(object: wire::Pod) -> Record<Workload> {
    let origin = origin();
    record::pod(origin, &object.into())
}

fn read_service(object: wire::Service) -> Record<state::Service> {
    let origin = origin();
    record::service(origin, &object.into())
}

fn read_endpoint_slice(object: wire::EndpointSlice) -> Record<state::EndpointSlice> {
    let origin = origin();
    record::endpoint_slice(origin, &object.into())
}

fn read_authorization_policy(object: DynamicObject) -> Record<AuthorizationPolicy> {
    let origin = origin();
    record::authorization_policy(origin, &authorization_policy(&object))
}

/// A PeerAuthentication that cannot be read is rejected alone: it has no safe stand-in that
/// would not also open (PERMISSIVE) or close (STRICT) what its author did not write.
fn read_peer_authentication(object: DynamicObject) -> Record<PeerAuthentication> {
    read_or_reject(object, record::peer_authentication)
}

/// A Gateway that cannot be read is rejected alone; a Service or pod that names it then cannot
/// use it, and fails closed.
fn read_gateway(object: DynamicObject) -> Record<state::Waypoint> {
    read_or_reject(object, record::gateway)
}

/// An HTTPRoute that cannot be read is rejected alone: its Service is routed as if it had none.
fn read_http_route(object: DynamicObject) -> Record<state::HttpRoute> {
    read_or_reject(object, record::http_route)
}

/// A GRPCRoute that cannot be read is rejected alone, as an HTTPRoute is.
fn read_grpc_route(object: DynamicObject) -> Record<state::HttpRoute> {
    read_or_reject(object, record::grpc_route)
}

fn read_request_authentication(object: DynamicObject) -> Record<RequestAuthentication> {
    record::request_authentication(origin(), &request_authentication(&object))
}

/// Reads a custom object as `R`; one that does not fit `R` is a record with no model and one
/// problem naming the field.
fn read_or_reject<R, M>(object: DynamicObject, read: fn(Origin, &R) -> Record<M>) -> Record<M>
where
    R: DeserializeOwned
        + Default
        + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
{
    match typed::<R>(&object) {
        Ok(resource) => read(origin(), &resource),
        Err(reason) => {
            let mut resource = R::default();
            *resource.metadata_mut() = object.metadata;
            let mut record = read(origin(), &resource);
            record.model = None;
            record.problems = vec![record.error(None, format!("cannot be read: {reason}"))];
            record
        }
    }
}

/// An Istio or Gateway API object as the model's resource type.
fn typed<T: DeserializeOwned>(object: &DynamicObject) -> Result<T, String> {
    let value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.into_inner())
    })
}

/// The policy, or, when its spec cannot be read, a resource that fails closed for the
/// workloads its selector names (as far as that can be read; else its whole namespace).
fn authorization_policy(object: &DynamicObject) -> AuthorizationPolicyResource {
    match typed::<AuthorizationPolicyResource>(object) {
        Ok(resource) => resource,
        Err(reason) => {
            let mut resource = AuthorizationPolicyResource {
                metadata: object.metadata.clone(),
                ..AuthorizationPolicyResource::default()
            };
            resource.spec.selector = object.data.pointer("/spec/selector").and_then(|selector| {
                serde_json::from_value::<WorkloadSelector>(selector.clone()).ok()
            });
            let (field, reason) = match reason.split_once(": ") {
                Some((path, why)) if !path.is_empty() && path != "." => {
                    (path.to_owned(), why.to_owned())
                }
                _ => ("spec".to_owned(), reason),
            };
            resource.unreadable = Some((field, reason));
            resource
        }
    }
}

/// The policy, or, when its spec cannot be read, a resource that fails closed on the targets
/// that can still be read (each reference on its own; none readable: it attaches nowhere).
fn request_authentication(object: &DynamicObject) -> RequestAuthenticationResource {
    match typed::<RequestAuthenticationResource>(object) {
        Ok(resource) => resource,
        Err(reason) => {
            let mut resource = RequestAuthenticationResource {
                metadata: object.metadata.clone(),
                ..RequestAuthenticationResource::default()
            };
            let spec = &mut resource.spec;
            let target = |value: &serde_json::Value| {
                serde_json::from_value::<TargetRefSpec>(value.clone()).ok()
            };
            spec.target_ref = object.data.pointer("/spec/targetRef").and_then(target);
            spec.target_refs = object
                .data
                .pointer("/spec/targetRefs")
                .and_then(serde_json::Value::as_array)
                .map(|refs| refs.iter().filter_map(target).collect())
                .unwrap_or_default();
            let (field, reason) = match reason.split_once(": ") {
                Some((path, why)) if !path.is_empty() && path != "." => {
                    (path.to_owned(), why.to_owned())
                }
                _ => ("spec".to_owned(), reason),
            };
            resource.unreadable = Some((field, reason));
            resource
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(json: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json).expect("an object")
    }

    #[test]
    fn a_policy_whose_spec_cannot_be_read_fails_closed_for_its_selector() {
        let object = dynamic(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "rules": "not a list"}
        }));
        let resource = authorization_policy(&object);
        let (field, reason) = resource.unreadable.clone().expect("unreadable");
        assert_eq!(field, "spec.rules");
        assert!(reason.contains("expected a sequence"), "{reason}");
        let errors =
            crate::state::AuthorizationPolicy::from_resource(&resource).expect_err("fails");
        let model = crate::state::AuthorizationPolicy::fail_closed(&resource, &errors);
        assert_eq!(model.action, crate::state::Action::Deny);
        assert_eq!(model.selector.value("app"), Some("web"));
        assert_eq!(
            (model.namespace.as_str(), model.name.as_str()),
            ("shop", "p")
        );
    }

    #[test]
    fn a_readable_policy_is_read_as_the_directory_source_reads_it() {
        let object = dynamic(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop", "annotations": {"istio.io/dry-run": "true"}},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["ops"]}}]}]}
        }));
        let resource = authorization_policy(&object);
        assert!(resource.unreadable.is_none());
        let model = crate::state::AuthorizationPolicy::from_resource(&resource).expect("valid");
        assert_eq!(model.action, crate::state::Action::Deny);
        assert!(model.dry_run);
        assert_eq!(model.rules.len(), 1);
    }

    #[test]
    fn a_request_authentication_whose_spec_cannot_be_read_fails_closed_on_its_targets() {
        let object = dynamic(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"group": "", "kind": "Service", "name": "web"}, {"kind": 7}],
                "jwtRules": [{"issuer": ["not", "a", "string"]}]
            }
        }));
        let record = read_request_authentication(object);
        let model = record.model.as_deref().expect("a fail-closed stand-in");
        assert_eq!(
            model.targets,
            Some(vec![crate::state::PolicyTarget::Service("web".into())])
        );
        let reason = model.invalid.as_deref().expect("invalid");
        assert!(
            reason.starts_with("spec.jwtRules[0].issuer: invalid type"),
            "{reason}"
        );
        assert_eq!(record.problems.len(), 1);
    }
}
