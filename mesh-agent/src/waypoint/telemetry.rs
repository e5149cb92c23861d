//! The waypoint's request telemetry, as Istio's waypoint reports it: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes` and `istio_response_bytes` with
//! `reporter="waypoint"` and Istio's labels, and one access-log line per request
//! ([`super::access_log`]). A request is recorded when its response has been sent to the end
//! (or abandoned), so durations and sizes are whole.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, Response};
use hyper::body::{Body as _, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::{access_log::AccessLog, backends::Body};
use crate::state::{Labels, Workload};

/// Envoy's default histogram buckets, which Istio's request metrics keep.
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's standard request labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: &'static str,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: &'static str,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// gRPC's status code for gRPC requests, empty otherwise.
    pub grpc_response_status: String,
    /// Envoy's response flags: `-`, `NR`, `UH`, `UF`, `UT`...
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The four request families.
#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl RequestMetrics {
    /// The families, registered under Istio's names.
    pub fn register(registry: &mut Registry) -> RequestMetrics {
        let metrics = RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
            request_bytes: Family::new_with_constructor(histogram),
            response_bytes: Family::new_with_constructor(histogram),
        };
        registry.register(
            "istio_requests",
            "Requests handled",
            metrics.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request durations, from the request to the end of the response",
            metrics.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            metrics.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            metrics.response_bytes.clone(),
        );
        metrics
    }

    fn record(&self, labels: &RequestLabels, millis: f64, received: u64, sent: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(millis);
        self.request_bytes
            .get_or_create(labels)
            .observe(received as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(sent as f64);
    }
}

/// The labels Istio derives from a pod: `(workload, namespace, app, version, canonical
/// service, canonical revision)`, `unknown` where there is no pod.
pub fn workload_labels(workload: Option<&Workload>) -> [String; 6] {
    let Some(workload) = workload else {
        return std::array::from_fn(|_| "unknown".to_string());
    };
    let label = |labels: &Labels, keys: &[&str]| {
        keys.iter()
            .find_map(|key| labels.value(key))
            .map(str::to_string)
    };
    let app = label(&workload.labels, &["app", "app.kubernetes.io/name"]);
    let version = label(&workload.labels, &["version", "app.kubernetes.io/version"]);
    [
        workload.name.clone(),
        workload.namespace.clone(),
        app.clone().unwrap_or_else(|| "unknown".into()),
        version.clone().unwrap_or_else(|| "unknown".into()),
        label(&workload.labels, &["service.istio.io/canonical-name"])
            .or(app)
            .unwrap_or_else(|| workload.name.clone()),
        label(&workload.labels, &["service.istio.io/canonical-revision"])
            .or(version)
            .unwrap_or_else(|| "latest".into()),
    ]
}

/// One request being served: its labels as far as known, what its log line needs, and the
/// body byte counts. Recorded once, when dropped.
pub struct Exchange {
    pub metrics: RequestMetrics,
    pub labels: RequestLabels,
    pub log: Option<AccessLog>,
    pub started: Instant,
    pub started_at: SystemTime,
    /// Request body bytes read (shared with the counting request body).
    pub received: Arc<AtomicU64>,
    sent: u64,
    /// Milliseconds from the request to the endpoint's response headers.
    pub upstream_time: Option<u64>,
}

impl Exchange {
    pub fn new(metrics: RequestMetrics, labels: RequestLabels, log: Option<AccessLog>) -> Self {
        Exchange {
            metrics,
            labels,
            log,
            started: Instant::now(),
            started_at: SystemTime::now(),
            received: Arc::default(),
            sent: 0,
            upstream_time: None,
        }
    }

    /// The response, whose body records the exchange when it ends.
    pub fn finish(mut self, response: Response<Body>) -> Response<Body> {
        self.labels.response_code = response.status().as_u16();
        if self.labels.request_protocol == "grpc" {
            self.labels.grpc_response_status = grpc_status(response.headers());
        }
        let (parts, body) = response.into_parts();
        if body.is_end_stream() {
            self.sent = 0;
            drop(self);
            return Response::from_parts(parts, body);
        }
        Response::from_parts(
            parts,
            http_body_util::BodyExt::boxed(Counted {
                body,
                exchange: Some(self),
            }),
        )
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let millis = self.started.elapsed().as_secs_f64() * 1000.0;
        let received = self.received.load(Ordering::Relaxed);
        self.metrics
            .record(&self.labels, millis, received, self.sent);
        if let Some(log) = &self.log {
            log.write(self, received, self.sent, millis as u64);
        }
    }
}

/// `grpc-status` from headers or trailers; `2` (UNKNOWN) is not assumed: absent is empty.
fn grpc_status(headers: &HeaderMap) -> String {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A response body that counts what it sends and records the exchange at its end.
struct Counted {
    body: Body,
    exchange: Option<Exchange>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(exchange) = self.exchange.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        exchange.sent += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref()
                        && exchange.labels.request_protocol == "grpc"
                    {
                        exchange.labels.grpc_response_status = grpc_status(trailers);
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                // Recorded now rather than when the body is dropped.
                self.exchange = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that counts the bytes read from the client.
pub struct CountedRequest<B> {
    pub body: B,
    pub received: Arc<AtomicU64>,
}

impl<B> hyper::body::Body for CountedRequest<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.received
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_labels_and_buckets() {
        let mut registry = Registry::default();
        let metrics = RequestMetrics::register(&mut registry);
        let labels = RequestLabels {
            reporter: "waypoint",
            source_workload: "web".into(),
            source_workload_namespace: "shop".into(),
            source_principal: "spiffe://cluster.local/ns/shop/sa/web".into(),
            source_app: "web".into(),
            source_version: "v1".into(),
            source_canonical_service: "web".into(),
            source_canonical_revision: "v1".into(),
            source_cluster: "Kubernetes",
            destination_workload: "db".into(),
            destination_workload_namespace: "shop".into(),
            destination_principal: "spiffe://cluster.local/ns/shop/sa/db".into(),
            destination_app: "db".into(),
            destination_version: "unknown".into(),
            destination_service: "db.shop.svc.cluster.local".into(),
            destination_service_name: "db".into(),
            destination_service_namespace: "shop".into(),
            destination_canonical_service: "db".into(),
            destination_canonical_revision: "latest".into(),
            destination_cluster: "Kubernetes",
            request_protocol: "http",
            response_code: 200,
            grpc_response_status: String::new(),
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        };
        metrics.record(&labels, 3.0, 10, 2000);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(
            text.contains("istio_requests_total{reporter=\"waypoint\",source_workload=\"web\"")
        );
        assert!(text.contains("response_code=\"200\""));
        assert!(
            text.lines().any(
                |l| l.starts_with("istio_request_duration_milliseconds_bucket{")
                    && l.contains("le=\"5.0\"")
                    && l.ends_with(" 1")
            ),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_response_bytes_bucket{")
                    && l.contains("le=\"1000.0\"")
                    && l.ends_with(" 0")),
            "{text}"
        );
        assert!(text.contains("istio_request_bytes_sum{"));
    }
}
