//! RequestAuthentication at the waypoint, with Envoy's `jwt_authn` semantics as Istio configures
//! it (each issuer "provider OR allow_missing"): a request without a token passes with no
//! identity; a token present must be valid for a rule that reads it where it was found, or the
//! request is refused (401, the error's text as body). An accepted token gives the request its
//! [`RequestAuth`], is removed from the request unless the rule forwards it, and fills the rule's
//! output headers.
//!
//! - [`token`]: where tokens are found and how one is taken out;
//! - [`verify`]: one token against one issuer's keys;
//! - [`jwks`]: key sets fetched from `jwksUri`, cached.

pub mod jwks;
#[cfg(test)]
pub(crate) mod testing;
pub mod token;
pub mod verify;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use http::header::HeaderName;
use http::request::Parts;
use serde_json::Value;
use tracing::debug;

use self::jwks::RemoteJwks;
use self::token::Found;
use self::verify::Token;
use crate::policy::RequestAuth;
use crate::state::{JwtRule, KeySource, RequestAuthentication, TokenLocation};

/// Why a request's token is refused. The text is Envoy's, which clients and tests match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    BadFormat,
    #[error("Jwt header is an invalid Base64url encoded")]
    HeaderBase64,
    #[error("Jwt header is an invalid JSON")]
    HeaderJson,
    #[error("Jwt header [alg] field is required and must be a string")]
    BadAlgorithm,
    /// `none`, an HMAC algorithm, or one nobody implements.
    #[error("Jwt header [alg] is not supported")]
    UnsupportedAlgorithm,
    #[error("Jwt header [kid] field is not a string")]
    BadKid,
    #[error("Jwt payload is an invalid Base64url encoded")]
    PayloadBase64,
    #[error("Jwt payload is an invalid JSON")]
    PayloadJson,
    #[error("Jwt payload [{claim}] field is not {expected}")]
    BadClaim {
        claim: &'static str,
        expected: &'static str,
    },
    #[error("Jwt signature is an invalid Base64url encoded")]
    SignatureBase64,
    /// No rule that reads the place the token was found has its `iss`.
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    NoMatchingKey,
    #[error("Jwt verification fails")]
    VerificationFails,
    #[error("Jwks remote fetch is failed")]
    JwksFetchFailed,
    /// A RequestAuthentication on the target cannot be understood (its `namespace/name`): no
    /// token is trusted there until it is fixed.
    #[error("Jwt verification fails")]
    PolicyInvalid(String),
}

/// Validates requests' tokens; one per waypoint, shared by its connections (it holds the
/// cache of fetched key sets).
#[derive(Default)]
pub struct Authenticator {
    remote: RemoteJwks,
}

/// A location and the rules that read tokens there.
type Readers<'a> = Vec<(&'a TokenLocation, Vec<&'a JwtRule>)>;

impl Authenticator {
    pub fn new() -> Self {
        Authenticator::default()
    }

    /// With other cache times for remote key sets (tests).
    pub fn with_cache_times(ttl: Duration, retry: Duration) -> Self {
        Authenticator {
            remote: RemoteJwks::new(ttl, retry),
        }
    }

    /// Finds the token(s) in the request per the policies' locations and validates them; the
    /// first valid one wins (it is stripped unless `forwardOriginalToken`, and the rule's
    /// `outputPayloadToHeader` / `outputClaimToHeaders` are set). No token: `Ok(None)`. Tokens
    /// but none valid: the first one's error. Any policy `invalid`: every token is refused.
    pub async fn authenticate(
        &self,
        policies: &[&RequestAuthentication],
        parts: &mut Parts,
    ) -> Result<Option<RequestAuth>, JwtError> {
        let defaults = TokenLocation::defaults();
        let invalid = policies.iter().find(|policy| policy.invalid.is_some());
        let mut readers = readers(policies);
        if invalid.is_some() {
            for location in &defaults {
                if !readers.iter().any(|(known, _)| *known == location) {
                    readers.push((location, Vec::new()));
                }
            }
        }
        let locations: Vec<&TokenLocation> =
            readers.iter().map(|(location, _)| *location).collect();
        let found = token::extract(parts, &locations);
        if found.is_empty() {
            return Ok(None);
        }
        if let Some(policy) = invalid {
            debug!(policy = %policy.key(), "token refused: a RequestAuthentication here is invalid");
            return Err(JwtError::PolicyInvalid(policy.key()));
        }
        let mut first_error = None;
        for found in &found {
            let rules = readers
                .iter()
                .find(|(location, _)| *location == found.location)
                .map_or(&[][..], |(_, rules)| rules.as_slice());
            match self.accept(found, rules, parts).await {
                Ok(auth) => return Ok(Some(auth)),
                Err(error) => {
                    debug!(%error, "token refused");
                    first_error.get_or_insert(error);
                }
            }
        }
        Err(first_error.unwrap_or(JwtError::VerificationFails))
    }

    /// Checks one token against the rules that read its location; once accepted, applies the
    /// rule's outputs and stripping to the request.
    async fn accept(
        &self,
        found: &Found<'_>,
        rules: &[&JwtRule],
        parts: &mut Parts,
    ) -> Result<RequestAuth, JwtError> {
        let token = Token::parse(&found.token)?;
        let issuer = token.issuer().unwrap_or_default();
        // Collected: an iterator with a closure held across `.await` would keep the future
        // from being `Send` for every lifetime (rust-lang/rust#102211).
        let candidates: Vec<&JwtRule> = rules
            .iter()
            .copied()
            .filter(|rule| rule.issuer == issuer)
            .collect();
        if candidates.is_empty() {
            return Err(JwtError::UnknownIssuer);
        }
        token.check_time(now())?;
        let mut first_error = None;
        for rule in candidates {
            match self.check(&token, rule).await {
                Ok(()) => {
                    let outputs = outputs(&token, rule);
                    let auth = token.into_auth()?;
                    if !rule.forward_original_token {
                        token::remove(parts, found);
                    }
                    for (name, value) in outputs {
                        parts.headers.insert(name, value);
                    }
                    return Ok(auth);
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        Err(first_error.unwrap_or(JwtError::VerificationFails))
    }

    async fn check(&self, token: &Token<'_>, rule: &JwtRule) -> Result<(), JwtError> {
        token.check_audiences(&rule.audiences)?;
        match &rule.keys {
            KeySource::Inline(jwks) => token.verify(jwks),
            KeySource::Uri(uri) => {
                let jwks = self
                    .remote
                    .get(uri, rule.timeout)
                    .await
                    .map_err(|_| JwtError::JwksFetchFailed)?;
                token.verify(&jwks)
            }
        }
    }
}

/// Every location the policies' rules read, each with its rules, in policy and rule order.
fn readers<'a>(policies: &[&'a RequestAuthentication]) -> Readers<'a> {
    let mut readers: Readers<'a> = Vec::new();
    for rule in policies.iter().flat_map(|policy| &policy.rules) {
        for location in &rule.locations {
            match readers.iter_mut().find(|(known, _)| *known == location) {
                Some((_, rules)) => rules.push(rule),
                None => readers.push((location, vec![rule])),
            }
        }
    }
    readers
}

/// The headers an accepted token sets: its payload as carried (base64url) and claims as text
/// (strings as they are, numbers and booleans written out; other values are skipped).
fn outputs(token: &Token<'_>, rule: &JwtRule) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = Vec::new();
    let mut push = |name: &str, value: &str| {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.push((name, value));
        }
    };
    if let Some(name) = &rule.output_payload_to_header {
        push(name, token.payload);
    }
    for pair in &rule.output_claim_to_headers {
        let mut value = token.claims.get(pair.claim.as_str());
        if value.is_none() && pair.claim.contains('.') {
            // A nested claim, `a.b`.
            let mut path = pair.claim.split('.');
            value = path
                .next()
                .and_then(|first| token.claims.get(first))
                .and_then(|value| path.try_fold(value, |value, key| value.get(key)));
        }
        match value {
            Some(Value::String(text)) => push(&pair.header, text),
            Some(other @ (Value::Number(_) | Value::Bool(_))) => {
                push(&pair.header, &other.to_string())
            }
            _ => {}
        }
    }
    headers
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests;
