//! One access-log line per request on the waypoint's standard output, in Istio's default text
//! format (`pilot/pkg/model/telemetry_logging.go`), so the tools that read Istio's logs read
//! these:
//!
//! `[START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS DETAILS TERMINATION "TRANSPORT_FAILURE"
//! BYTES_RECEIVED BYTES_SENT DURATION UPSTREAM_SERVICE_TIME "X-FORWARDED-FOR" "USER-AGENT"
//! "X-REQUEST-ID" "AUTHORITY" "UPSTREAM_HOST" UPSTREAM_CLUSTER UPSTREAM_LOCAL_ADDRESS
//! DOWNSTREAM_LOCAL_ADDRESS DOWNSTREAM_REMOTE_ADDRESS REQUESTED_SERVER_NAME ROUTE_NAME`
//!
//! A value that is missing is `-`, as Envoy writes it.

use std::{borrow::Cow, io::Write, net::SocketAddr, time::UNIX_EPOCH};

use http::{HeaderMap, Version, request::Parts};

use super::telemetry::Exchange;
use crate::identity::rfc3339;

/// What the log line says of a request, taken when it arrives and completed by the outcome.
#[derive(Debug, Clone, Default)]
pub struct AccessLog {
    pub method: String,
    /// As the client sent it (before any rewrite), with its query.
    pub path: String,
    pub protocol: &'static str,
    pub forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub authority: Option<String>,
    /// The Service `VIP:port` the client dialed.
    pub downstream_local: Option<SocketAddr>,
    pub downstream_remote: Option<SocketAddr>,
    /// Envoy's `RESPONSE_CODE_DETAILS`: `via_upstream`, `route_not_found`...
    pub details: Cow<'static, str>,
    pub upstream_host: Option<SocketAddr>,
    /// `inbound-vip|<port>|http|<service host>`, Istio's waypoint cluster name.
    pub upstream_cluster: Option<String>,
    /// `<namespace>.<route>.<rule>` for a request an HTTPRoute routed.
    pub route: Option<String>,
}

impl AccessLog {
    /// The request's side of the line.
    pub fn of_request(parts: &Parts, local: SocketAddr, remote: SocketAddr) -> AccessLog {
        let header = |headers: &HeaderMap, name: &str| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        AccessLog {
            method: parts.method.as_str().to_owned(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".into(), |p| p.as_str().to_owned()),
            protocol: match parts.version {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            forwarded_for: header(&parts.headers, "x-forwarded-for"),
            user_agent: header(&parts.headers, "user-agent"),
            request_id: header(&parts.headers, "x-request-id"),
            authority: super::http::request_host(parts).map(str::to_owned),
            downstream_local: Some(local),
            downstream_remote: Some(remote),
            details: Cow::Borrowed("-"),
            ..AccessLog::default()
        }
    }

    /// The whole line, without its newline.
    pub fn line(&self, exchange: &Exchange, received: u64, sent: u64, millis: u64) -> String {
        fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
            value.map_or_else(|| "-".to_string(), |v| v.to_string())
        }
        let labels = &exchange.labels;
        format!(
            "[{}] \"{} {} {}\" {} {} {} - \"-\" {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} - {} {} - {}",
            start_time(exchange),
            self.method,
            self.path,
            self.protocol,
            labels.response_code,
            labels.response_flags,
            self.details,
            received,
            sent,
            millis,
            or_dash(exchange.upstream_time),
            or_dash(self.forwarded_for.as_deref()),
            or_dash(self.user_agent.as_deref()),
            or_dash(self.request_id.as_deref()),
            or_dash(self.authority.as_deref()),
            or_dash(self.upstream_host),
            or_dash(self.upstream_cluster.as_deref()),
            or_dash(self.downstream_local),
            or_dash(self.downstream_remote),
            or_dash(self.route.as_deref()),
        )
    }

    /// Writes the line to standard output, in one write.
    pub fn write(&self, exchange: &Exchange, received: u64, sent: u64, millis: u64) {
        let mut line = self.line(exchange, received, sent, millis);
        line.push('\n');
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

/// `2026-12-07T18:40:00.123Z`.
fn start_time(exchange: &Exchange) -> String {
    let since = exchange
        .started_at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = rfc3339::format_unix(since.as_secs() as i64);
    let millis = since.subsec_millis();
    match seconds.strip_suffix('Z') {
        Some(whole) => format!("{whole}.{millis:03}Z"),
        None => seconds,
    }
}
