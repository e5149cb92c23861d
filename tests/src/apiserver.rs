//! A test Kubernetes API server that speaks the real wire protocol (HTTPS, bearer token, paged
//! lists, chunked watches with BOOKMARK and 410 ERROR events, field and label selectors), so the
//! real kube-rs client can be tested against it without a cluster.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_tests::apiserver::ApiServerError> {
//! use mesh_tests::apiserver::{ApiServer, ApiServerConfig, Verb};
//! let api = ApiServer::bind("127.0.0.1:0".parse().unwrap(), ApiServerConfig::default()).await?;
//! api.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
//!                              "metadata": {"name": "shop"}}))?;
//! // Point kube-rs (or `mesh-agent --kubeconfig`) at api.kubeconfig_path().
//! api.expire_watches(); // every open watch gets a 410 ERROR event and ends
//! api.down().await;     // connections refused until up()
//! api.up().await?;
//! assert!(api.requests(Verb::List, "/api/v1/namespaces") <= 1);
//! # Ok(()) }
//! ```

mod http;
mod netns;
mod selector;
mod store;
mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

pub use selector::{FieldSelector, LabelSelector, SelectorError};
pub use store::{KINDS, Kind, StoreError};
pub use tls::TlsError;

/// What went wrong starting the server or changing its objects.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ApiServerError {
    let what = what.into();
    move |source| ApiServerError::Io { what, source }
}

/// Settings of a test API server.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// The bearer token a client must send.
    pub token: String,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK (the apiserver: ~1 min).
    pub bookmark_interval: Duration,
    /// A watch's length when the client sends no `timeoutSeconds`.
    pub watch_timeout: Duration,
    /// How many changes are kept for watches to resume from; older resourceVersions get 410.
    pub history_window: usize,
    /// Whether the Istio security kinds are served from the start (else 404 until installed).
    pub istio_installed: bool,
    /// An extra DNS name in the server certificate.
    pub server_name: String,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        Self {
            token: "mesh-tests-token".to_string(),
            bookmark_interval: Duration::from_secs(1),
            watch_timeout: Duration::from_secs(1800),
            history_window: 10_000,
            istio_installed: true,
            server_name: "kubernetes.mesh-tests".to_string(),
        }
    }
}

/// A request's verb, as counted by [`ApiServer::requests`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    List,
    Watch,
    Get,
    /// A path the server does not serve.
    Other,
}

/// What the request handlers and the server share.
struct Shared {
    config: ApiServerConfig,
    token: String,
    store: Mutex<store::Store>,
    /// Bumped on every change and knob, so open watches look again.
    notify: watch::Sender<u64>,
    drop_epoch: AtomicU64,
    expire_epoch: AtomicU64,
    requests: Mutex<HashMap<(Verb, String), u64>>,
    watches: Mutex<Vec<AbortHandle>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, store::Store> {
        lock(&self.store)
    }

    fn count(&self, verb: Verb, path: &str) {
        *lock(&self.requests)
            .entry((verb, path.to_string()))
            .or_default() += 1;
    }

    fn track_watch(&self, watch: AbortHandle) {
        let mut watches = lock(&self.watches);
        watches.retain(|w| !w.is_finished());
        watches.push(watch);
    }

    fn abort_watches(&self) {
        for watch in lock(&self.watches).drain(..) {
            watch.abort();
        }
    }

    fn wake(&self) {
        self.notify.send_modify(|n| *n += 1);
    }
}

/// A running test API server; dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    /// The listener's network namespace when it is not this process's (to bind again in `up`).
    netns: Option<std::os::fd::OwnedFd>,
    serving: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    ca_pem: String,
    _dir: tempfile::TempDir,
    kubeconfig_path: PathBuf,
}

impl ApiServer {
    /// Binds `addr` in this process's network namespace and serves.
    pub async fn bind(addr: SocketAddr, config: ApiServerConfig) -> Result<Self, ApiServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(io(format!("bind {addr}")))?;
        Self::start(listener, config)
    }

    /// Serves on an already-bound std listener (e.g. one made inside a network namespace).
    pub fn start_std(
        listener: std::net::TcpListener,
        config: ApiServerConfig,
    ) -> Result<Self, ApiServerError> {
        listener
            .set_nonblocking(true)
            .map_err(io("set_nonblocking"))?;
        let listener = TcpListener::from_std(listener).map_err(io("register listener"))?;
        Self::start(listener, config)
    }

    /// Serves on an already-bound listener (e.g. from [`crate::Netns::listen_on`]). Must be
    /// called inside a tokio runtime.
    pub fn start(listener: TcpListener, config: ApiServerConfig) -> Result<Self, ApiServerError> {
        let addr = listener.local_addr().map_err(io("listener address"))?;
        let netns = netns::of_socket(&listener);
        let identity = tls::ServerIdentity::generate(addr.ip(), &config.server_name)?;
        let acceptor = TlsAcceptor::from(identity.server_config()?);
        let dir = tempfile::Builder::new()
            .prefix("mesh-apiserver-")
            .tempdir()
            .map_err(io("temp dir"))?;
        let kubeconfig_path = dir.path().join("kubeconfig");
        let url = format!("https://{addr}");
        tls::write_kubeconfig(
            &kubeconfig_path,
            &tls::kubeconfig(&url, identity.ca_pem(), &config.token),
        )?;
        let shared = Arc::new(Shared {
            token: config.token.clone(),
            store: Mutex::new(store::Store::new(
                config.history_window,
                config.istio_installed,
            )),
            notify: watch::channel(0).0,
            drop_epoch: AtomicU64::new(0),
            expire_epoch: AtomicU64::new(0),
            requests: Mutex::new(HashMap::new()),
            watches: Mutex::new(Vec::new()),
            config,
        });
        let task = tokio::spawn(serve(listener, acceptor.clone(), shared.clone()));
        Ok(Self {
            shared,
            addr,
            acceptor,
            netns,
            serving: tokio::sync::Mutex::new(Some(task)),
            ca_pem: identity.ca_pem().to_string(),
            _dir: dir,
            kubeconfig_path,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ip:port`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A kubeconfig file (server URL, CA data, token) for kube-rs or `mesh-agent --kubeconfig`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The CA certificate (PEM) that signed the server's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Creates or replaces an object (any served kind, Istio kinds also while uninstalled);
    /// returns it with its new `metadata.resourceVersion` (and `uid`, `creationTimestamp`).
    pub fn apply(&self, object: Value) -> Result<Value, ApiServerError> {
        let stored = self.shared.lock().apply(object)?;
        self.shared.wake();
        Ok(stored)
    }

    /// Deletes an object; `kind` is its kind or plural (`Pod`, `pods`), `namespace` is ignored
    /// for cluster-scoped kinds.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<Value, ApiServerError> {
        let last = self.shared.lock().delete(kind, namespace, name)?;
        self.shared.wake();
        Ok(last)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().resource_version()
    }

    /// How many requests of `verb` reached `path` (the URL path, without the query).
    pub fn requests(&self, verb: Verb, path: &str) -> u64 {
        lock(&self.shared.requests)
            .get(&(verb, path.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Serves `security.istio.io` from now on.
    pub fn install_istio(&self) {
        self.shared.lock().istio_installed = true;
        self.shared.wake();
    }

    /// Answers `security.istio.io` with 404 from now on and ends open watches of those kinds.
    pub fn uninstall_istio(&self) {
        self.shared.lock().istio_installed = false;
        self.shared.wake();
    }

    /// Ends every open watch normally (the client re-watches from its last resourceVersion).
    pub fn drop_watches(&self) {
        self.shared.drop_epoch.fetch_add(1, Ordering::SeqCst);
        self.shared.wake();
    }

    /// Forgets the change history and list snapshots: a watch or `continue` from an older
    /// resourceVersion gets 410 Expired. Open watches are left alone.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// [`compact`](Self::compact), and every open watch gets an ERROR event with a 410 Expired
    /// Status and ends, so its client must relist.
    pub fn expire_watches(&self) {
        self.shared.lock().compact();
        self.shared.expire_epoch.fetch_add(1, Ordering::SeqCst);
        self.shared.wake();
    }

    /// Stops serving: the listener and every connection close, so clients see connection refused.
    pub async fn down(&self) {
        let mut serving = self.serving.lock().await;
        if let Some(task) = serving.take() {
            task.abort();
            let _ = task.await;
        }
        self.shared.abort_watches();
    }

    /// Serves again on the same address (and network namespace).
    pub async fn up(&self) -> Result<(), ApiServerError> {
        let mut serving = self.serving.lock().await;
        if serving.is_some() {
            return Ok(());
        }
        let listener = netns::listen(self.netns.as_ref(), self.addr)
            .map_err(io(format!("bind {} again", self.addr)))?;
        let listener = TcpListener::from_std(listener).map_err(io("register listener"))?;
        *serving = Some(tokio::spawn(serve(
            listener,
            self.acceptor.clone(),
            self.shared.clone(),
        )));
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.serving.get_mut().take() {
            task.abort();
        }
        self.shared.abort_watches();
    }
}

/// Accepts until aborted; aborting drops the listener and (with the JoinSet) every connection.
async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, acceptor.clone(), shared.clone()));
                }
                // EMFILE and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn connection(stream: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let Ok(Ok(stream)) =
        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
    else {
        return;
    };
    let service = hyper::service::service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(http::handle(shared, request).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}
