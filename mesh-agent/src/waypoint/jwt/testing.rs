//! Test signing keys made at test time (rcgen), their JWKS, and tokens they sign.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// A fresh key pair with a key id.
pub struct SigningKey {
    kid: String,
    algorithm: Algorithm,
    key: rcgen::KeyPair,
}

impl SigningKey {
    /// An ECDSA P-256 key (ES256).
    pub fn es256(kid: &str) -> SigningKey {
        SigningKey::new(kid, Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256)
    }

    /// An Ed25519 key (EdDSA).
    pub fn ed25519(kid: &str) -> SigningKey {
        SigningKey::new(kid, Algorithm::EdDSA, &rcgen::PKCS_ED25519)
    }

    fn new(kid: &str, algorithm: Algorithm, alg: &'static rcgen::SignatureAlgorithm) -> Self {
        SigningKey {
            kid: kid.to_string(),
            algorithm,
            key: rcgen::KeyPair::generate_for(alg).expect("a test key"),
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        let raw = self.key.public_key_raw();
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        match self.algorithm {
            // The uncompressed point: 0x04, x, y.
            Algorithm::ES256 => json!({
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
                "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            }),
            _ => {
                json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": self.kid, "x": b64(raw)})
            }
        }
    }

    /// `{"keys": [<this key>]}`.
    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk()]})
    }

    /// A token with these claims, signed by this key (header `kid` set).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        let der = self.key.serialize_der();
        let key = match self.algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_der(&der),
            _ => EncodingKey::from_ed_der(&der),
        };
        jsonwebtoken::encode(&header, claims, &key).expect("signs")
    }
}

/// Now, in seconds since the epoch, plus `offset`.
pub fn now_plus(offset: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    now + offset
}
