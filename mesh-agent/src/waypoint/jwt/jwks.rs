//! Key sets named by `jwksUri`: fetched over HTTP or HTTPS (the system's root certificates),
//! within the rule's timeout and [`MAX_JWKS_BYTES`], and cached per URI for [`CACHE_TTL`], as
//! Envoy's remote JWKS. Requests that need a URI being fetched wait for that one fetch. When a
//! refresh fails the keys fetched before stay in use; a URI that never answered is asked again
//! at most every [`RETRY_AFTER`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tracing::warn;

use crate::state::{Jwks, JwksError, MAX_JWKS_BYTES};

/// How long fetched keys are used before they are fetched again (Envoy's default).
pub const CACHE_TTL: Duration = Duration::from_secs(5 * 60);
/// How long after a failed fetch the URI is asked again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Entries unused this long are dropped when another URI is added.
const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);

/// Why a key set could not be fetched (logged; the client sees `Jwks remote fetch is failed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not a URL")]
    Uri(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("the body cannot be read: {0}")]
    Body(String),
    #[error("the key set {0}")]
    Jwks(#[from] JwksError),
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The cache of remote key sets, shared by every request of the waypoint.
pub struct RemoteJwks {
    client: HttpsClient,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    ttl: Duration,
    retry: Duration,
}

/// One URI: its lock is held while it is fetched, so concurrent requests share the fetch.
#[derive(Default)]
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
    /// When a request last asked for this URI (for forgetting unused ones).
    used: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct SlotState {
    /// The last keys fetched, and when.
    keys: Option<(Arc<Jwks>, Instant)>,
    /// The last failure, and when, while no fetch has succeeded since.
    failure: Option<(FetchError, Instant)>,
}

impl Default for RemoteJwks {
    fn default() -> Self {
        RemoteJwks::new(CACHE_TTL, RETRY_AFTER)
    }
}

impl RemoteJwks {
    pub fn new(ttl: Duration, retry: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let connector = match builder.with_provider_and_native_roots(provider.clone()) {
            Ok(builder) => builder.https_or_http().enable_http1().wrap_connector(http),
            Err(error) => {
                // No system roots: HTTPS key sets cannot be trusted; plain HTTP still works.
                warn!(%error, "no root certificates found: a jwksUri over https will fail");
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(without_roots(provider))
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http)
            }
        };
        RemoteJwks {
            client: Client::builder(TokioExecutor::new()).build(connector),
            slots: Mutex::new(HashMap::new()),
            ttl,
            retry,
        }
    }

    /// The key set at `uri`, from the cache or fetched within `timeout`.
    pub async fn get(&self, uri: &str, timeout: Duration) -> Result<Arc<Jwks>, FetchError> {
        let slot = self.slot(uri);
        let mut state = slot.state.lock().await;
        let now = Instant::now();
        if let Some((keys, at)) = &state.keys
            && now.duration_since(*at) < self.ttl
        {
            return Ok(keys.clone());
        }
        if let Some((error, at)) = &state.failure
            && now.duration_since(*at) < self.retry
        {
            return match &state.keys {
                Some((keys, _)) => Ok(keys.clone()),
                None => Err(error.clone()),
            };
        }
        match self.fetch(uri, timeout).await {
            Ok(jwks) => {
                let keys = Arc::new(jwks);
                state.keys = Some((keys.clone(), Instant::now()));
                state.failure = None;
                Ok(keys)
            }
            Err(error) => {
                warn!(uri, %error, stale = state.keys.is_some(), "jwksUri fetch failed");
                state.failure = Some((error.clone(), Instant::now()));
                match &state.keys {
                    Some((keys, _)) => Ok(keys.clone()),
                    None => Err(error),
                }
            }
        }
    }

    fn slot(&self, uri: &str) -> Arc<Slot> {
        let now = Instant::now();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match slots.get(uri) {
            Some(slot) => slot.clone(),
            None => {
                slots.retain(|_, slot| {
                    let used = *slot.used.lock().unwrap_or_else(|e| e.into_inner());
                    used.is_some_and(|at| now.duration_since(at) < FORGET_AFTER)
                });
                slots.entry(uri.to_string()).or_default().clone()
            }
        };
        *slot.used.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
        slot
    }

    async fn fetch(&self, uri: &str, timeout: Duration) -> Result<Jwks, FetchError> {
        let parsed: http::Uri = uri.parse().map_err(|_| FetchError::Uri(uri.to_string()))?;
        let request = http::Request::get(parsed)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|_| FetchError::Uri(uri.to_string()))?;
        let answer = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| FetchError::Request(error_chain(&e)))?;
            if !response.status().is_success() {
                return Err(FetchError::Status(response.status()));
            }
            let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| FetchError::Body(e.to_string()))?
                .to_bytes();
            let text =
                std::str::from_utf8(&body).map_err(|_| FetchError::Body("not UTF-8".into()))?;
            Ok(Jwks::parse(text)?)
        };
        tokio::time::timeout(timeout, answer)
            .await
            .map_err(|_| FetchError::Timeout(timeout))?
    }
}

/// A TLS client that trusts no server.
fn without_roots(provider: Arc<rustls::crypto::CryptoProvider>) -> rustls::ClientConfig {
    let roots = rustls::RootCertStore::empty();
    match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
        // ring supports the default versions; this is the process default's same config.
        Err(_) => rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
