//! One token, checked in Envoy's order: its form, its issuer, its time window (60 s of clock
//! skew), its audiences, then its signature by a key of the issuer's set. Decoding the parts is
//! done here so each failure gets Envoy's message; the signature is `jsonwebtoken`'s.

use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use super::JwtError;
use crate::policy::RequestAuth;
use crate::state::Jwks;

/// Envoy's default `clock_skew_seconds`.
pub const CLOCK_SKEW_SECONDS: u64 = 60;

/// A token split and decoded, not yet trusted.
#[derive(Debug)]
pub struct Token<'t> {
    pub algorithm: Algorithm,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
    /// `header.payload`, what the signature covers.
    signed: &'t str,
    signature: &'t str,
    /// The payload as the token carries it (base64url).
    pub payload: &'t str,
}

impl<'t> Token<'t> {
    pub fn parse(text: &'t str) -> Result<Token<'t>, JwtError> {
        let mut sections = text.split('.');
        let (Some(header), Some(payload), Some(signature), None) = (
            sections.next(),
            sections.next(),
            sections.next(),
            sections.next(),
        ) else {
            return Err(JwtError::BadFormat);
        };
        let header = decode_json(header, JwtError::HeaderBase64, JwtError::HeaderJson)?;
        let algorithm = match header.get("alg") {
            Some(Value::String(alg)) => supported(alg).ok_or(JwtError::UnsupportedAlgorithm)?,
            _ => return Err(JwtError::BadAlgorithm),
        };
        let kid = match header.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(JwtError::BadKid),
        };
        let claims = decode_json(payload, JwtError::PayloadBase64, JwtError::PayloadJson)?;
        for (claim, expected) in [("iss", "a string"), ("sub", "a string")] {
            if claims.get(claim).is_some_and(|v| !v.is_string()) {
                return Err(JwtError::BadClaim { claim, expected });
            }
        }
        if URL_SAFE_NO_PAD.decode(signature).is_err() {
            return Err(JwtError::SignatureBase64);
        }
        // Exactly two dots: everything before the last one.
        let signed = &text[..text.len() - signature.len() - 1];
        Ok(Token {
            algorithm,
            kid,
            claims,
            signed,
            signature,
            payload,
        })
    }

    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// `nbf` and `exp` against `now` (seconds since the epoch), with Envoy's clock skew.
    pub fn check_time(&self, now: u64) -> Result<(), JwtError> {
        if let Some(nbf) = self.seconds("nbf")?
            && now.saturating_add(CLOCK_SKEW_SECONDS) < nbf
        {
            return Err(JwtError::NotYetValid);
        }
        if let Some(exp) = self.seconds("exp")?
            && now > exp.saturating_add(CLOCK_SKEW_SECONDS)
        {
            return Err(JwtError::Expired);
        }
        Ok(())
    }

    fn seconds(&self, claim: &'static str) -> Result<Option<u64>, JwtError> {
        match self.claims.get(claim) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value.as_u64().map(Some).ok_or(JwtError::BadClaim {
                claim,
                expected: "a positive integer",
            }),
        }
    }

    /// `aud`, a string or a list of strings.
    pub fn audiences(&self) -> Result<Vec<String>, JwtError> {
        let bad = JwtError::BadClaim {
            claim: "aud",
            expected: "a string or string list",
        };
        match self.claims.get("aud") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(aud)) => Ok(vec![aud.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_string).ok_or(bad.clone()))
                .collect(),
            Some(_) => Err(bad),
        }
    }

    /// When `allowed` is not empty, one of the token's audiences must be in it.
    pub fn check_audiences(&self, allowed: &[String]) -> Result<(), JwtError> {
        if allowed.is_empty() || self.audiences()?.iter().any(|aud| allowed.contains(aud)) {
            Ok(())
        } else {
            Err(JwtError::AudienceNotAllowed)
        }
    }

    /// Checks the signature with the keys of `jwks` that fit the token's `alg` (and `kid`,
    /// when both name one).
    pub fn verify(&self, jwks: &Jwks) -> Result<(), JwtError> {
        let mut tried = false;
        for jwk in jwks.keys.iter().filter(|jwk| self.fits(jwk)) {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            tried = true;
            let verified = jsonwebtoken::crypto::verify(
                self.signature,
                self.signed.as_bytes(),
                &key,
                self.algorithm,
            );
            if verified.unwrap_or(false) {
                return Ok(());
            }
        }
        Err(if tried {
            JwtError::VerificationFails
        } else {
            JwtError::NoMatchingKey
        })
    }

    fn fits(&self, jwk: &Jwk) -> bool {
        if let (Some(wanted), Some(kid)) = (&self.kid, &jwk.common.key_id)
            && wanted != kid
        {
            return false;
        }
        if let Some(alg) = jwk.common.key_algorithm
            && jsonwebtoken::jwk::KeyAlgorithm::from(self.algorithm) != alg
        {
            return false;
        }
        match (&jwk.algorithm, self.algorithm) {
            (AlgorithmParameters::RSA(_), alg) => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
                ec.curve == EllipticCurve::P256
            }
            (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES384) => {
                ec.curve == EllipticCurve::P384
            }
            (AlgorithmParameters::OctetKeyPair(okp), Algorithm::EdDSA) => {
                okp.curve == EllipticCurve::Ed25519
            }
            _ => false,
        }
    }

    /// The identity the (verified) token gives the request: principal `iss/sub`.
    pub fn into_auth(self) -> Result<RequestAuth, JwtError> {
        let audiences = self.audiences()?;
        let text = |claim: &str| self.claims.get(claim).and_then(Value::as_str);
        let principal = format!(
            "{}/{}",
            text("iss").unwrap_or_default(),
            text("sub").unwrap_or_default()
        );
        let presenter = text("azp").map(str::to_string);
        Ok(RequestAuth {
            principal,
            audiences,
            presenter,
            claims: self.claims,
        })
    }
}

/// The signing algorithms the waypoint verifies: public-key ones only. A shared secret (`HS*`)
/// has no place in a policy every node can read.
fn supported(alg: &str) -> Option<Algorithm> {
    Algorithm::from_str(alg)
        .ok()
        .filter(|alg| !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
}

/// A base64url section (padding tolerated) holding a JSON object.
fn decode_json(
    section: &str,
    base64_error: JwtError,
    json_error: JwtError,
) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(section.trim_end_matches('='))
        .map_err(|_| base64_error)?;
    serde_json::from_slice(&bytes).map_err(|_| json_error)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::waypoint::jwt::testing::{SigningKey, now_plus};

    fn jwks(key: &SigningKey) -> Jwks {
        Jwks::parse(&key.jwks().to_string()).expect("jwks")
    }

    #[test]
    fn a_good_token_verifies_and_names_its_principal() {
        for key in [SigningKey::es256("a"), SigningKey::ed25519("b")] {
            let text = key.sign(&json!({"iss": "i", "sub": "alice", "aud": "shop", "azp": "web", "exp": now_plus(60)}));
            let token = Token::parse(&text).expect("parses");
            token.check_time(now_plus(0) as u64).expect("in time");
            token.check_audiences(&["shop".into()]).expect("audience");
            token.verify(&jwks(&key)).expect("signed");
            let auth = token.into_auth().expect("auth");
            assert_eq!(auth.principal, "i/alice");
            assert_eq!(auth.audiences, ["shop"]);
            assert_eq!(auth.presenter.as_deref(), Some("web"));
            assert_eq!(auth.claims["sub"], "alice");
        }
    }

    #[test]
    fn another_key_or_a_changed_payload_fails() {
        let (key, other) = (SigningKey::es256("a"), SigningKey::es256("a"));
        let text = key.sign(&json!({"iss": "i", "sub": "alice"}));
        let token = Token::parse(&text).expect("parses");
        assert_eq!(
            token.verify(&jwks(&other)),
            Err(JwtError::VerificationFails)
        );
        let forged = json!({"iss": "i", "sub": "admin"}).to_string();
        let mut sections: Vec<String> = text.split('.').map(str::to_string).collect();
        sections[1] = URL_SAFE_NO_PAD.encode(forged);
        let text = sections.join(".");
        let token = Token::parse(&text).expect("parses");
        assert_eq!(token.verify(&jwks(&key)), Err(JwtError::VerificationFails));
        let ed = SigningKey::ed25519("a");
        let token = Token::parse(&text).expect("parses");
        assert_eq!(token.verify(&jwks(&ed)), Err(JwtError::NoMatchingKey));
        let text = SigningKey::es256("z").sign(&json!({"iss": "i"}));
        let token = Token::parse(&text).expect("parses");
        assert_eq!(token.verify(&jwks(&key)), Err(JwtError::NoMatchingKey));
    }

    #[test]
    fn time_window_with_clock_skew() {
        let key = SigningKey::es256("a");
        let now = now_plus(0) as u64;
        let check = |claims: serde_json::Value| {
            let text = key.sign(&claims);
            Token::parse(&text).expect("parses").check_time(now)
        };
        assert_eq!(check(json!({"exp": now - 61})), Err(JwtError::Expired));
        assert_eq!(check(json!({"exp": now - 30})), Ok(()));
        assert_eq!(check(json!({"nbf": now + 61})), Err(JwtError::NotYetValid));
        assert_eq!(check(json!({"nbf": now + 30})), Ok(()));
        assert_eq!(check(json!({})), Ok(()));
        assert_eq!(
            check(json!({"exp": "soon"})).map_err(|e| e.to_string()),
            Err("Jwt payload [exp] field is not a positive integer".into())
        );
    }

    #[test]
    fn audiences_as_string_or_list() {
        let key = SigningKey::es256("a");
        let check = |claims: serde_json::Value, allowed: &[&str]| {
            let text = key.sign(&claims);
            let allowed: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
            Token::parse(&text)
                .expect("parses")
                .check_audiences(&allowed)
        };
        assert_eq!(check(json!({"aud": ["x", "shop"]}), &["shop"]), Ok(()));
        assert_eq!(check(json!({}), &[]), Ok(()));
        assert_eq!(
            check(json!({"aud": "x"}), &["shop"]),
            Err(JwtError::AudienceNotAllowed)
        );
        assert_eq!(
            check(json!({}), &["shop"]),
            Err(JwtError::AudienceNotAllowed)
        );
        assert!(matches!(
            check(json!({"aud": 7}), &["shop"]),
            Err(JwtError::BadClaim { claim: "aud", .. })
        ));
    }

    #[test]
    fn malformed_tokens_get_envoys_messages() {
        let b64 = |text: &str| URL_SAFE_NO_PAD.encode(text);
        let header = b64(r#"{"alg":"ES256"}"#);
        let cases = [
            (
                "a.b".to_string(),
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
            ),
            (
                "a.b.c.d".to_string(),
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
            ),
            (
                format!("!.{header}.c"),
                "Jwt header is an invalid Base64url encoded",
            ),
            (
                format!("{}.e30.c", b64("[")),
                "Jwt header is an invalid JSON",
            ),
            (
                format!("{}.e30.c", b64("{}")),
                "Jwt header [alg] field is required and must be a string",
            ),
            (
                format!("{}.e30.c", b64(r#"{"alg":"none"}"#)),
                "Jwt header [alg] is not supported",
            ),
            (
                format!("{}.e30.c", b64(r#"{"alg":"HS256"}"#)),
                "Jwt header [alg] is not supported",
            ),
            (
                format!("{}.e30.c", b64(r#"{"alg":"ES256","kid":1}"#)),
                "Jwt header [kid] field is not a string",
            ),
            (
                format!("{header}.!.c"),
                "Jwt payload is an invalid Base64url encoded",
            ),
            (
                format!("{header}.{}.c", b64("x")),
                "Jwt payload is an invalid JSON",
            ),
            (
                format!("{header}.e30.!"),
                "Jwt signature is an invalid Base64url encoded",
            ),
            (
                format!("{header}.{}.c", b64(r#"{"iss":1}"#)),
                "Jwt payload [iss] field is not a string",
            ),
        ];
        for (text, message) in cases {
            let error = Token::parse(&text).expect_err(&text);
            assert_eq!(error.to_string(), message, "{text}");
        }
    }
}
