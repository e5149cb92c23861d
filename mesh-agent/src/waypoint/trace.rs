//! W3C trace context through the waypoint: a valid `traceparent` goes on in the same trace
//! with a new span id (the waypoint's own hop), its flags kept; `tracestate` goes on
//! unchanged. A malformed `traceparent` is dropped, as the W3C spec asks, and with it
//! `tracestate`. A request without one starts no trace (no tracing provider is configured).

use http::{HeaderMap, HeaderValue, header::HeaderName};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Rewrites the request's trace headers for the next hop.
pub fn propagate(headers: &mut HeaderMap) {
    let Some(parent) = headers.get(&TRACEPARENT) else {
        return;
    };
    match next_hop(parent.as_bytes(), rand::random::<u64>()) {
        Some(next) => {
            if let Ok(value) = HeaderValue::from_str(&next) {
                headers.insert(TRACEPARENT, value);
            }
        }
        None => {
            headers.remove(TRACEPARENT);
            headers.remove(TRACESTATE);
        }
    }
}

/// `version-traceid-parentid-flags` with `span` as the new parent id; `None` when `parent`
/// is not a valid version-00 header (or a later version's, read as 00 allows).
fn next_hop(parent: &[u8], span: u64) -> Option<String> {
    let text = std::str::from_utf8(parent).ok()?.trim();
    let mut fields = text.split('-');
    let (version, trace, _, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || fields.next().is_none())
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    if !valid {
        return None;
    }
    // A zero span id is invalid; any other random value will do.
    let span = span.max(1);
    Some(format!("00-{trace}-{span:016x}-{flags}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn a_valid_parent_keeps_its_trace_and_flags_with_a_new_span() {
        let parent = format!("00-{TRACE}-00f067aa0ba902b7-01");
        assert_eq!(
            next_hop(parent.as_bytes(), 0xabc),
            Some(format!("00-{TRACE}-0000000000000abc-01"))
        );
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_str(&parent).expect("ascii"));
        headers.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        propagate(&mut headers);
        let next = headers[&TRACEPARENT].to_str().expect("ascii");
        assert!(next.starts_with(&format!("00-{TRACE}-")) && next.ends_with("-01"));
        assert_ne!(next, parent, "a new span");
        assert_eq!(headers[&TRACESTATE], "vendor=x");
    }

    #[test]
    fn malformed_parents_are_dropped_with_their_state() {
        for bad in [
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("ff-{TRACE}-00f067aa0ba902b7-01"),
            format!("00-{TRACE}-00f067aa0ba902b7-01-extra"),
            format!("00-{}-00f067aa0ba902b7-01", TRACE.to_uppercase()),
            "garbage".to_string(),
        ] {
            assert_eq!(next_hop(bad.as_bytes(), 1), None, "{bad}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static("nonsense"));
        headers.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        propagate(&mut headers);
        assert!(headers.is_empty());
        let mut none = HeaderMap::new();
        propagate(&mut none);
        assert!(none.is_empty(), "no trace is started");
    }
}
