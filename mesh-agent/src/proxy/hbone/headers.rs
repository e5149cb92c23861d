//! The HBONE CONNECT request as ztunnel sends and expects it: `CONNECT <dst ip:port>` over
//! HTTP/2 with `Forwarded: for="<client ip:port>"` and a W3C `traceparent`.

use std::net::SocketAddr;

use http::{HeaderName, HeaderValue, Method, Request, Uri, uri::Authority};

pub const FORWARDED: &str = "forwarded";
pub const TRACEPARENT: &str = "traceparent";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("method {0} is not CONNECT")]
    NotConnect(String),
    #[error("authority {0:?} is not an ip:port")]
    BadAuthority(String),
    #[error("building the request: {0}")]
    Build(String),
}

/// The CONNECT request for a stream to `destination` on behalf of `client`.
///
/// Built once per proxied connection, so it is assembled directly rather than through the
/// request builder. `Forwarded` and `traceparent` differ on every request: they are sent as
/// never-indexed literals, so they do not churn either side's HPACK table (`:authority`, the
/// same for every connection to a pod, stays indexed).
pub fn connect_request(
    destination: SocketAddr,
    client: SocketAddr,
) -> Result<Request<()>, HeaderError> {
    let authority = Authority::try_from(destination.to_string())
        .map_err(|e| HeaderError::Build(e.to_string()))?;
    let mut uri = http::uri::Parts::default();
    uri.authority = Some(authority);
    let uri = Uri::from_parts(uri).map_err(|e| HeaderError::Build(e.to_string()))?;
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    let headers = request.headers_mut();
    headers.insert(HeaderName::from_static(FORWARDED), forwarded_for(client));
    headers.insert(HeaderName::from_static(TRACEPARENT), new_traceparent());
    Ok(request)
}

/// `for="1.2.3.4:5678"` (RFC 7239; the quotes are required because of the colon).
fn forwarded_for(client: SocketAddr) -> HeaderValue {
    // Only digits, dots, colons and quotes: always a valid header value.
    let mut value = HeaderValue::from_str(&format!("for=\"{client}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("for=unknown"));
    value.set_sensitive(true);
    value
}

/// A fresh W3C trace context: version 00, random trace and span ids, sampled.
pub fn new_traceparent() -> HeaderValue {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    let mut value = HeaderValue::from_str(&format!("00-{trace:032x}-{span:016x}-01"))
        .unwrap_or_else(|_| {
            HeaderValue::from_static("00-00000000000000000000000000000001-0000000000000001-01")
        });
    value.set_sensitive(true);
    value
}

/// What the inbound side needs from a CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTarget {
    pub destination: SocketAddr,
    /// From `Forwarded: for=`, when present and parseable.
    pub forwarded_for: Option<SocketAddr>,
    pub traceparent: Option<String>,
}

impl ConnectTarget {
    /// The client's address on a tunnel from `peer`: the tunnel's source is the client pod
    /// itself, and `Forwarded` says its port (a `Forwarded` of another address is not trusted).
    pub fn client(&self, peer: SocketAddr) -> SocketAddr {
        match self.forwarded_for {
            Some(f) if f.ip() == peer.ip() => f,
            _ => peer,
        }
    }
}

pub fn parse_connect<B>(request: &Request<B>) -> Result<ConnectTarget, HeaderError> {
    if request.method() != Method::CONNECT {
        return Err(HeaderError::NotConnect(request.method().to_string()));
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default();
    let destination = authority
        .parse::<SocketAddr>()
        .map_err(|_| HeaderError::BadAuthority(authority.to_string()))?;
    let forwarded_for = request
        .headers()
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded_for);
    let traceparent = request
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(ConnectTarget {
        destination,
        forwarded_for,
        traceparent,
    })
}

/// The first `for=` element of a Forwarded header, quoted or not.
fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    value
        .split([';', ','])
        .map(str::trim)
        .find_map(|part| {
            part.strip_prefix("for=")
                .or_else(|| part.strip_prefix("For="))
        })
        .map(|v| v.trim_matches('"'))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let dst: SocketAddr = "10.0.2.10:8080".parse().unwrap();
        let client: SocketAddr = "10.0.1.10:40000".parse().unwrap();
        let req = connect_request(dst, client).unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "10.0.2.10:8080");
        assert_eq!(req.headers()[FORWARDED], "for=\"10.0.1.10:40000\"");
        assert_eq!(req.version(), http::Version::HTTP_2);
        // Different on every request: kept out of the HPACK tables.
        assert!(req.headers()[FORWARDED].is_sensitive());
        assert!(req.headers()[TRACEPARENT].is_sensitive());
        let target = parse_connect(&req).unwrap();
        assert_eq!(target.destination, dst);
        assert_eq!(target.forwarded_for, Some(client));
        let tp = target.traceparent.unwrap();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
    }

    #[test]
    fn rejects_other_methods_and_bad_authorities() {
        let get = Request::builder()
            .method(Method::GET)
            .uri("http://x/")
            .body(())
            .unwrap();
        assert_eq!(
            parse_connect(&get),
            Err(HeaderError::NotConnect("GET".into()))
        );
        let bad = Request::builder()
            .method(Method::CONNECT)
            .uri("example.com:80")
            .body(())
            .unwrap();
        assert_eq!(
            parse_connect(&bad),
            Err(HeaderError::BadAuthority("example.com:80".into()))
        );
    }

    #[test]
    fn forwarded_variants() {
        assert_eq!(
            parse_forwarded_for("for=\"1.2.3.4:5\""),
            Some("1.2.3.4:5".parse().unwrap())
        );
        assert_eq!(
            parse_forwarded_for("proto=http;for=1.2.3.4:5"),
            Some("1.2.3.4:5".parse().unwrap())
        );
        assert_eq!(parse_forwarded_for("for=unknown"), None);
    }
}
