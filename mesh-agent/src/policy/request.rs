//! What a waypoint knows about one HTTP request, for L7 authorization: the connection it came
//! on, the request line and headers, and the identity a validated JWT gave it.

use std::net::IpAddr;

use http::HeaderMap;
use serde::Serialize;

use super::connection::ConnectionAttributes;

/// The request's attributes. The connection's are the client's, as the waypoint learned them
/// from the tunnel: its principal from mTLS and its address from `Forwarded`.
#[derive(Debug, Clone, Copy)]
pub struct RequestAttributes<'a> {
    pub connection: &'a ConnectionAttributes,
    /// `remote.ip` and `remoteIpBlocks`: the original client behind trusted proxies. The mesh
    /// trusts no proxy hop (Istio's default `numTrustedProxies: 0`), so it is the source IP.
    pub remote_ip: IpAddr,
    pub method: &'a str,
    /// The path without its query, as Istio's `paths` see it.
    pub path: &'a str,
    /// `:authority` or `Host`.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// From a JWT that RequestAuthentication validated; `None` without a token.
    pub auth: Option<&'a RequestAuth>,
}

/// The identity a validated JWT carries: what `requestPrincipals` and `request.auth.*` match.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestAuth {
    /// `<iss>/<sub>`, Istio's request principal.
    pub principal: String,
    /// `aud`, a string or a list in the token, always a list here.
    pub audiences: Vec<String>,
    /// `azp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presenter: Option<String>,
    /// The whole payload, for `request.auth.claims[...]`.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl RequestAuth {
    /// The claim at `path` (`claims[a][b]` is `["a", "b"]`) as the strings policy matches: a
    /// string is itself, a list gives its string items, a boolean or number its text; anything
    /// else (or nothing there) matches no value.
    pub fn claim(&self, path: &[String]) -> Vec<String> {
        let Some((first, rest)) = path.split_first() else {
            return Vec::new();
        };
        let mut value = self.claims.get(first);
        for key in rest {
            value = value.and_then(|v| v.get(key));
        }
        match value {
            Some(serde_json::Value::String(text)) => vec![text.clone()],
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|item| match item {
                    serde_json::Value::String(text) => Some(text.clone()),
                    serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {
                        Some(item.to_string())
                    }
                    _ => None,
                })
                .collect(),
            Some(other @ (serde_json::Value::Bool(_) | serde_json::Value::Number(_))) => {
                vec![other.to_string()]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_read_by_path_as_strings() {
        let claims = serde_json::json!({
            "sub": "alice",
            "groups": ["dev", "ops", 7, {"x": 1}],
            "nested": {"team": "payments", "admin": true},
        });
        let auth = RequestAuth {
            claims: claims.as_object().cloned().unwrap_or_default(),
            ..RequestAuth::default()
        };
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(auth.claim(&path(&["sub"])), ["alice"]);
        assert_eq!(auth.claim(&path(&["groups"])), ["dev", "ops", "7"]);
        assert_eq!(auth.claim(&path(&["nested", "team"])), ["payments"]);
        assert_eq!(auth.claim(&path(&["nested", "admin"])), ["true"]);
        assert!(auth.claim(&path(&["nested"])).is_empty());
        assert!(auth.claim(&path(&["missing", "x"])).is_empty());
        assert!(auth.claim(&[]).is_empty());
    }
}
