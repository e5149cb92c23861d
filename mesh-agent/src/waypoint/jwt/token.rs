//! Where a request carries a JWT, as Envoy's extractor reads it: a header after its prefix, a
//! query parameter or a cookie; and taking a token out of the request once it is accepted.

use http::header::{COOKIE, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};

use crate::state::TokenLocation;

/// A token found at `location`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found<'a> {
    pub location: &'a TokenLocation,
    pub token: String,
}

/// The first token at each location, in the order of `locations`.
pub fn extract<'a>(parts: &Parts, locations: &[&'a TokenLocation]) -> Vec<Found<'a>> {
    locations
        .iter()
        .filter_map(|location| {
            let token = match location {
                TokenLocation::Header { name, prefix } => from_header(parts, name, prefix),
                TokenLocation::Param(name) => from_query(parts.uri.query(), name),
                TokenLocation::Cookie(name) => from_cookies(parts, name),
            }?;
            Some(Found { location, token })
        })
        .collect()
}

fn from_header(parts: &Parts, name: &str, prefix: &str) -> Option<String> {
    parts.headers.get_all(name).iter().find_map(|value| {
        let value = value.to_str().ok()?;
        token_after(value, prefix)
    })
}

/// The token after `prefix` (compared ignoring ASCII case, as `Bearer` is a case-insensitive
/// scheme), trimmed; `None` when the value does not start with it or nothing follows.
fn token_after(value: &str, prefix: &str) -> Option<String> {
    let head = value.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let token = value[prefix.len()..].trim();
    (!token.is_empty()).then(|| token.to_string())
}

fn from_query(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(key, value)| key == name && !value.is_empty())
        .map(|(_, value)| value.into_owned())
}

fn from_cookies(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            let value = value.trim().trim_matches('"');
            (key.trim() == name && !value.is_empty()).then(|| value.to_string())
        })
}

/// Takes the token `found` out of the request: the header value carrying it, or the query
/// parameter. A cookie is left as it is, as Envoy leaves it.
pub fn remove(parts: &mut Parts, found: &Found<'_>) {
    match found.location {
        TokenLocation::Header { name, prefix } => {
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                return;
            };
            let kept: Vec<HeaderValue> = parts
                .headers
                .get_all(&header)
                .iter()
                .filter(|value| {
                    value.to_str().ok().and_then(|v| token_after(v, prefix))
                        != Some(found.token.clone())
                })
                .cloned()
                .collect();
            parts.headers.remove(&header);
            for value in kept {
                parts.headers.append(header.clone(), value);
            }
        }
        TokenLocation::Param(name) => {
            if let Some(uri) = without_param(&parts.uri, name) {
                parts.uri = uri;
            }
        }
        TokenLocation::Cookie(_) => {}
    }
}

/// `uri` without the query parameter `name` (every occurrence); the other parameters keep
/// their encoding and order.
fn without_param(uri: &Uri, name: &str) -> Option<Uri> {
    let query = uri.query()?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            form_urlencoded::parse(key.as_bytes())
                .next()
                .is_none_or(|(decoded, _)| decoded != name)
        })
        .collect();
    let path_and_query = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("request").into_parts().0
    }

    fn header(name: &str, prefix: &str) -> TokenLocation {
        TokenLocation::Header {
            name: name.into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn finds_tokens_at_envoys_default_locations() {
        let defaults = TokenLocation::defaults();
        let locations: Vec<&TokenLocation> = defaults.iter().collect();
        let parts = request(
            "/a?x=1&access_token=q.r.s",
            &[("authorization", "bearer h.e.t ")],
        );
        let found = extract(&parts, &locations);
        let tokens: Vec<&str> = found.iter().map(|f| f.token.as_str()).collect();
        assert_eq!(tokens, ["h.e.t", "q.r.s"]);
        let parts = request("/a", &[("authorization", "Basic dXNlcjpwdw==")]);
        assert!(extract(&parts, &locations).is_empty());
        let parts = request("/a?access_token=", &[("authorization", "Bearer ")]);
        assert!(extract(&parts, &locations).is_empty());
    }

    #[test]
    fn custom_headers_params_and_cookies() {
        let (custom, bare, param, cookie) = (
            header("x-jwt", "Token "),
            header("x-raw", ""),
            TokenLocation::Param("jwt".into()),
            TokenLocation::Cookie("session".into()),
        );
        let locations = [&custom, &bare, &param, &cookie];
        let parts = request(
            "/a?jwt=p%2Eq.r",
            &[
                ("x-jwt", "Bearer wrong"),
                ("x-jwt", "Token c.u.s"),
                ("x-raw", "r.a.w"),
                ("cookie", "theme=dark; session=\"c.o.k\""),
            ],
        );
        let found: Vec<(&TokenLocation, String)> = extract(&parts, &locations)
            .into_iter()
            .map(|f| (f.location, f.token))
            .collect();
        assert_eq!(
            found,
            [
                (&custom, "c.u.s".to_string()),
                (&bare, "r.a.w".to_string()),
                (&param, "p.q.r".to_string()),
                (&cookie, "c.o.k".to_string()),
            ]
        );
    }

    #[test]
    fn removes_only_the_accepted_token() {
        let bearer = header("authorization", "Bearer ");
        let mut parts = request(
            "http://web.shop/a?x=1&access_token=q.r.s&y=%20",
            &[
                ("authorization", "Bearer h.e.t"),
                ("authorization", "Basic x"),
            ],
        );
        let found = extract(&parts, &[&bearer]).remove(0);
        remove(&mut parts, &found);
        let left: Vec<&HeaderValue> = parts.headers.get_all("authorization").iter().collect();
        assert_eq!(left, ["Basic x"]);
        let param = TokenLocation::Param("access_token".into());
        let found = extract(&parts, &[&param]).remove(0);
        remove(&mut parts, &found);
        assert_eq!(parts.uri.to_string(), "http://web.shop/a?x=1&y=%20");
        let mut parts = request("/a?access_token=q.r.s", &[]);
        remove(&mut parts, &found);
        assert_eq!(parts.uri.to_string(), "/a");
    }
}
