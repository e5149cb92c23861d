//! An issuer of JWTs for the waypoint's RequestAuthentication tests: a signing key made at test
//! time (ECDSA P-256), its JWKS to put in a policy's `jwks` or serve at a `jwksUri`, and tokens
//! it signs with whatever claims a test gives.

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// One issuer and its key.
pub struct Issuer {
    /// The `iss` of its tokens, and the `issuer` of the policy's rule.
    pub issuer: String,
    pub kid: String,
    key: rcgen::KeyPair,
}

impl Issuer {
    /// A new ES256 key for `issuer`, with key id `kid`.
    pub fn new(issuer: &str, kid: &str) -> Result<Issuer> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating a P-256 key")?;
        Ok(Issuer {
            issuer: issuer.to_string(),
            kid: kid.to_string(),
            key,
        })
    }

    /// The public key set, `{"keys": [{"kty": "EC", ...}]}`.
    pub fn jwks(&self) -> Value {
        // The uncompressed point: 0x04, then x and y, 32 bytes each.
        let raw = self.key.public_key_raw();
        let (x, y) = (
            raw.get(1..33).unwrap_or_default(),
            raw.get(33..).unwrap_or_default(),
        );
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]})
    }

    /// [`Issuer::jwks`] as the JSON text a policy's `jwks` field holds.
    pub fn jwks_text(&self) -> String {
        self.jwks().to_string()
    }

    /// A token with exactly `claims` (add `iss` yourself, or use [`Issuer::token_for`]).
    pub fn sign(&self, claims: &Value) -> Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let key = EncodingKey::from_ec_der(&self.key.serialize_der());
        jsonwebtoken::encode(&header, claims, &key).context("signing a JWT")
    }

    /// A token of this issuer for `sub`, valid for an hour, with `extra` claims merged in
    /// (they win over `iss`, `sub`, `iat` and `exp`).
    pub fn token_for(&self, sub: &str, extra: &Value) -> Result<String> {
        let now = now();
        let mut claims = json!({"iss": self.issuer, "sub": sub, "iat": now, "exp": now + 3600});
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            claims.extend(extra.clone());
        }
        self.sign(&claims)
    }
}

/// Seconds since the epoch, for `exp` and `nbf`.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_the_claims_and_the_key_id() -> Result<()> {
        let issuer = Issuer::new("https://issuer.example", "k1")?;
        let token = issuer.token_for("alice", &json!({"aud": "shop"}))?;
        let header = jsonwebtoken::decode_header(&token)?;
        assert_eq!(header.kid.as_deref(), Some("k1"));
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(issuer.jwks()["keys"][0].clone())?;
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk)?;
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&["shop"]);
        let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)?.claims;
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["iss"], "https://issuer.example");
        assert_eq!(issuer.jwks()["keys"][0]["kid"], "k1");
        Ok(())
    }
}
