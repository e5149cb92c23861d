//! Admin API on 127.0.0.1:15000 (JSON views of the node for the CLI), readiness on :15021 and
//! Prometheus metrics on :15020.

pub mod views;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

pub use self::views::AdminState;

type Body = Full<Bytes>;

/// An HTTP/1.1 listener serving one of the two routers below.
pub struct Server {
    name: &'static str,
    listener: TcpListener,
}

#[derive(Debug, thiserror::Error)]
#[error("binding the {name} server on {addr}: {source}")]
pub struct BindError {
    name: &'static str,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// A bound socket not yet tied to a runtime, so binding can happen (and fail) before the
/// admin runtime's thread starts.
pub struct Bound {
    name: &'static str,
    listener: std::net::TcpListener,
}

impl Bound {
    pub fn new(name: &'static str, addr: SocketAddr) -> Result<Self, BindError> {
        let err = |source| BindError { name, addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Self { name, listener })
    }

    /// A listener bound elsewhere (by the agent this one took over from).
    pub fn from_listener(
        name: &'static str,
        listener: std::net::TcpListener,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self { name, listener })
    }

    /// Must be called within the runtime that will serve it.
    pub fn into_server(self) -> std::io::Result<Server> {
        Ok(Server {
            name: self.name,
            listener: TcpListener::from_std(self.listener)?,
        })
    }
}

impl Server {
    pub fn address(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves the admin API until `shutdown` turns true.
    pub async fn run_admin(self, state: Arc<AdminState>, shutdown: watch::Receiver<bool>) {
        self.run(shutdown, move |req| {
            let state = state.clone();
            async move { admin_route(&state, req).await }
        })
        .await
    }

    /// Serves `/metrics` (Prometheus text format).
    pub async fn run_metrics(
        self,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: watch::Receiver<bool>,
    ) {
        self.run(shutdown, move |req| {
            std::future::ready(metrics_route(&metrics, &req))
        })
        .await
    }

    /// Serves `/healthz/ready`: 200 while `ready` is true, else 503.
    pub async fn run_readiness(
        self,
        ready: watch::Receiver<bool>,
        shutdown: watch::Receiver<bool>,
    ) {
        self.run(shutdown, move |req| {
            std::future::ready(if req.uri().path() != "/healthz/ready" {
                text(StatusCode::NOT_FOUND, "not found\n")
            } else if *ready.borrow() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            })
        })
        .await
    }

    async fn run<F, R>(self, mut shutdown: watch::Receiver<bool>, route: F)
    where
        F: Fn(Request<hyper::body::Incoming>) -> R + Send + Sync + Clone + 'static,
        R: std::future::Future<Output = Response<Body>> + Send + 'static,
    {
        if let Ok(addr) = self.address() {
            info!(component = self.name, address = %addr, "listener established");
        }
        loop {
            let (stream, _) = tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(component = self.name, error = %e, "accept failed");
                        continue;
                    }
                },
            };
            let route = route.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let response = route(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

/// `/metrics`: the Prometheus text of `metrics`.
fn metrics_route<B>(metrics: &crate::metrics::Metrics, req: &Request<B>) -> Response<Body> {
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    match metrics.encode() {
        Ok(body) => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

async fn admin_route(state: &AdminState, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    // Each view is written straight to its bytes: the workloads of a large cluster as a
    // `serde_json::Value` first would be several times their size again.
    let body = match req.uri().path() {
        "/status" => serde_json::to_vec_pretty(&state.status()),
        "/workloads" => serde_json::to_vec_pretty(&state.workloads()),
        "/connections" => serde_json::to_vec_pretty(&state.connections()),
        "/certs" => serde_json::to_vec_pretty(&state.certificates()),
        "/policies" => serde_json::to_vec_pretty(&state.policies()),
        "/explain" => {
            let query = query_pairs(req.uri().query().unwrap_or_default());
            let (Some(from), Some(to)) = (query.get("from"), query.get("to")) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "explain needs ?from=<pod|ip>&to=<ip:port>\n",
                );
            };
            let request = match http_request(req.uri().query().unwrap_or_default()) {
                Ok(request) => request,
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
            };
            match state.explain(from, to, request).await {
                Ok(explanation) => serde_json::to_vec_pretty(&explanation),
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
            }
        }
        "/bpf" => serde_json::to_vec_pretty(&state.bpf()),
        "/config_dump" => serde_json::to_vec_pretty(&state.config_dump()),
        "/" => serde_json::to_vec_pretty(&serde_json::json!({
            "endpoints": ["/status", "/workloads", "/connections", "/certs", "/policies", "/explain", "/bpf", "/config_dump"]
        })),
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    match body {
        Ok(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
}

/// The request `explain` is asked about, if any: `method`, `path`, `header` (each
/// `name: value`) and `token` (sent as `authorization: Bearer`).
fn http_request(query: &str) -> Result<Option<crate::waypoint::explain::HttpRequest>, String> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let wanted = |key: &'static str| pairs.iter().filter(move |(k, _)| k == key).map(|(_, v)| v);
    let asked = ["method", "path", "header", "token"]
        .iter()
        .any(|key| wanted(key).next().is_some());
    if !asked {
        return Ok(None);
    }
    let method = match wanted("method").next() {
        Some(method) => method
            .parse::<Method>()
            .map_err(|_| format!("method {method:?} is not an HTTP method"))?,
        None => Method::GET,
    };
    let path = wanted("path").next().cloned().unwrap_or_else(|| "/".into());
    if path.parse::<hyper::Uri>().is_err() || !path.starts_with('/') {
        return Err(format!("path {path:?} is not an absolute path"));
    }
    let mut headers = hyper::HeaderMap::new();
    for header in wanted("header") {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("header {header:?} is not name: value"))?;
        let name = hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("header name {name:?} is not valid"))?;
        let value = hyper::header::HeaderValue::from_str(value.trim())
            .map_err(|_| format!("header value of {name} is not valid"))?;
        headers.append(name, value);
    }
    if let Some(token) = wanted("token").next() {
        let value = hyper::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the token is not a valid header value".to_string())?;
        headers.insert(hyper::header::AUTHORIZATION, value);
    }
    Ok(Some(crate::waypoint::explain::HttpRequest {
        method,
        path,
        headers,
    }))
}

/// `a=1&b=x%2Fy` as a map, percent-decoded (values here are pod names and addresses).
fn query_pairs(query: &str) -> std::collections::HashMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_http_request_to_explain() {
        assert!(
            http_request("from=a%2Fb&to=10.0.0.1%3A80")
                .expect("no request")
                .is_none()
        );
        let request = http_request(
            "from=a&to=b&path=%2Fx%3Fy%3D1&header=x-user%3A+admin&header=x-user%3A+root&token=abc",
        )
        .expect("valid")
        .expect("a request");
        assert_eq!(request.method, Method::GET);
        assert_eq!(request.path, "/x?y=1");
        let users: Vec<_> = request.headers.get_all("x-user").iter().collect();
        assert_eq!(users, ["admin", "root"]);
        assert_eq!(request.headers["authorization"], "Bearer abc");
        let post = http_request("method=POST")
            .expect("valid")
            .expect("a request");
        assert_eq!((post.method, post.path.as_str()), (Method::POST, "/"));
        for bad in [
            "path=relative",
            "header=no-colon",
            "method=%20",
            "header=bad%20name%3A+x",
        ] {
            assert!(http_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decodes_queries() {
        let q = query_pairs("from=shop%2Fweb-1&to=10.0.2.10%3A8080&x");
        assert_eq!(q["from"], "shop/web-1");
        assert_eq!(q["to"], "10.0.2.10:8080");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
