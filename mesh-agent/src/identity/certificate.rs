//! A workload's certificate chain and private key, and the view of it that `mesh-agent certs` prints.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use super::{
    rfc3339,
    spiffe::{Identity, IdentityError},
};

/// Why a chain and key do not make a usable workload certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("chain element {index} is not a valid X.509 certificate: {reason}")]
    Parse { index: usize, reason: String },
    #[error("the leaf certificate's subjectAltName is unreadable: {0}")]
    SubjectAltName(String),
    #[error("the leaf certificate has no URI SAN, so no SPIFFE identity")]
    NoUriSan,
    /// The X.509-SVID spec allows exactly one URI SAN, so the identity is never ambiguous.
    #[error("the leaf certificate has {0} URI SANs; a SPIFFE certificate has exactly one")]
    ManyUriSans(usize),
    #[error("the leaf certificate's URI SAN is not a workload identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("the private key is not a usable PKCS#8 key: {0}")]
    Key(rcgen::Error),
    #[error("the private key does not belong to the leaf certificate")]
    KeyMismatch,
}

/// A workload's leaf certificate (first in `chain`, followed by its issuers) and private key.
///
/// Built only through [`WorkloadCertificate::new`], which checks the leaf carries exactly one
/// SPIFFE identity and matches the key, so the fields below always agree with the DER.
#[derive(Clone)]
pub struct WorkloadCertificate {
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
    view: CertificateView,
}

/// What `mesh-agent certs` and the admin API show about a workload certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateView {
    pub identity: Identity,
    /// Lowercase hex of the leaf's serial number.
    pub serial: String,
    /// RFC 3339, UTC.
    pub not_before: String,
    pub not_before_unix: i64,
    pub not_after: String,
    pub not_after_unix: i64,
    /// Leaf first, then its issuers.
    pub chain: Vec<ChainCertificateView>,
}

/// One certificate of a chain, as `mesh-agent certs` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainCertificateView {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_after: String,
    pub not_after_unix: i64,
}

impl WorkloadCertificate {
    /// Checks and describes a chain (leaf first) and the leaf's PKCS#8 private key.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, CertificateError> {
        let parsed = chain
            .iter()
            .enumerate()
            .map(|(index, der)| parse(index, der))
            .collect::<Result<Vec<_>, _>>()?;
        let leaf = parsed.first().ok_or(CertificateError::EmptyChain)?;
        let identity = identity_of(leaf)?;
        let key_pair = KeyPair::try_from(&key).map_err(CertificateError::Key)?;
        if key_pair.public_key_raw() != leaf.public_key().subject_public_key.data.as_ref() {
            return Err(CertificateError::KeyMismatch);
        }
        let not_before_unix = leaf.validity().not_before.timestamp();
        let not_after_unix = leaf.validity().not_after.timestamp();
        let serial = hex(leaf.raw_serial());
        let view = CertificateView {
            identity: identity.clone(),
            serial: serial.clone(),
            not_before: rfc3339::format_unix(not_before_unix),
            not_before_unix,
            not_after: rfc3339::format_unix(not_after_unix),
            not_after_unix,
            chain: parsed.iter().map(chain_view).collect(),
        };
        Ok(Self {
            identity,
            not_before: system_time(not_before_unix),
            not_after: system_time(not_after_unix),
            serial,
            view,
            chain,
            key: Arc::new(key),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Leaf first, then the issuers up to (and possibly including) the root.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `new` refuses an empty chain.
        &self.chain[0]
    }

    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Lowercase hex of the leaf's serial number.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    pub fn view(&self) -> CertificateView {
        self.view.clone()
    }
}

impl fmt::Debug for WorkloadCertificate {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.view.not_before)
            .field("not_after", &self.view.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The SPIFFE identity in a peer's leaf certificate (its only URI SAN).
pub(crate) fn leaf_identity(der: &CertificateDer<'_>) -> Result<Identity, CertificateError> {
    identity_of(&parse(0, der)?)
}

/// A peer's leaf certificate's identity and serial (lowercase hex, as `mesh-agent certs` shows
/// serials), from one parse.
pub(crate) fn leaf_identity_and_serial(
    der: &CertificateDer<'_>,
) -> Result<(Identity, String), CertificateError> {
    let leaf = parse(0, der)?;
    Ok((identity_of(&leaf)?, hex(leaf.raw_serial())))
}

fn parse<'a>(index: usize, der: &'a [u8]) -> Result<X509Certificate<'a>, CertificateError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((rest, _)) if !rest.is_empty() => Err(CertificateError::Parse {
            index,
            reason: format!("{} trailing bytes", rest.len()),
        }),
        Ok((_, cert)) => Ok(cert),
        Err(e) => Err(CertificateError::Parse {
            index,
            reason: e.to_string(),
        }),
    }
}

fn identity_of(leaf: &X509Certificate<'_>) -> Result<Identity, CertificateError> {
    let san = leaf
        .subject_alternative_name()
        .map_err(|e| CertificateError::SubjectAltName(e.to_string()))?
        .ok_or(CertificateError::NoUriSan)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(CertificateError::NoUriSan),
        [uri] => Ok(Identity::parse(uri)?),
        many => Err(CertificateError::ManyUriSans(many.len())),
    }
}

fn chain_view(cert: &X509Certificate<'_>) -> ChainCertificateView {
    let not_after_unix = cert.validity().not_after.timestamp();
    ChainCertificateView {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: hex(cert.raw_serial()),
        not_after: rfc3339::format_unix(not_after_unix),
        not_after_unix,
    }
}

fn system_time(unix: i64) -> SystemTime {
    let magnitude = Duration::from_secs(unix.unsigned_abs());
    if unix >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, DistinguishedName, SanType, string::Ia5String};
    use rustls_pki_types::PrivatePkcs8KeyDer;

    use super::*;

    fn self_signed_with(sans: Vec<SanType>) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        let cert = params.self_signed(&key).unwrap();
        (cert.der().clone(), key)
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s).unwrap())
    }

    fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
    }

    #[test]
    fn describes_a_spiffe_leaf() {
        let (der, key) = self_signed_with(vec![uri("spiffe://td/ns/a/sa/b")]);
        let cert = WorkloadCertificate::new(vec![der], pkcs8(&key)).unwrap();
        assert_eq!(cert.identity().to_string(), "spiffe://td/ns/a/sa/b");
        let view = cert.view();
        assert_eq!(view.serial, cert.serial());
        assert_eq!(view.chain.len(), 1);
        assert_eq!(view.chain[0].serial, cert.serial());
        // rcgen's default validity: 1975-01-01 .. 4096-01-01.
        assert_eq!(view.not_before, "1975-01-01T00:00:00Z");
        assert_eq!(view.not_after, "4096-01-01T00:00:00Z");
        assert_eq!(
            cert.not_before(),
            UNIX_EPOCH + Duration::from_secs(view.not_before_unix as u64)
        );
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["identity"], "spiffe://td/ns/a/sa/b");
        assert!(json["chain"][0]["not_after"].is_string());
        assert!(!format!("{cert:?}").contains("key"));
    }

    #[test]
    fn refuses_leaves_without_exactly_one_spiffe_uri() {
        let cases = [
            (vec![], "no san"),
            (
                vec![SanType::DnsName("a.b".try_into().unwrap())],
                "dns only",
            ),
            (
                vec![uri("spiffe://td/ns/a/sa/b"), uri("spiffe://td/ns/a/sa/c")],
                "two uris",
            ),
            (vec![uri("spiffe://td/ns/a")], "not a workload id"),
        ];
        for (sans, why) in cases {
            let (der, key) = self_signed_with(sans);
            assert!(
                WorkloadCertificate::new(vec![der], pkcs8(&key)).is_err(),
                "{why} accepted"
            );
        }
    }

    #[test]
    fn refuses_a_key_of_another_certificate() {
        let (der, _) = self_signed_with(vec![uri("spiffe://td/ns/a/sa/b")]);
        let other = KeyPair::generate().unwrap();
        assert!(matches!(
            WorkloadCertificate::new(vec![der], pkcs8(&other)),
            Err(CertificateError::KeyMismatch)
        ));
    }

    #[test]
    fn refuses_empty_and_garbage_chains() {
        let key = KeyPair::generate().unwrap();
        assert!(matches!(
            WorkloadCertificate::new(vec![], pkcs8(&key)),
            Err(CertificateError::EmptyChain)
        ));
        assert!(matches!(
            WorkloadCertificate::new(vec![CertificateDer::from(vec![0x30, 0x00])], pkcs8(&key)),
            Err(CertificateError::Parse { index: 0, .. })
        ));
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0x00, 0x0a, 0xff]), "000aff");
    }
}
