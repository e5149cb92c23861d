//! Certificates and TLS pieces for tests that play a rogue HBONE peer: leaves signed by the
//! cluster's CA or by a stranger, valid or not, and the TLS alert a refused side received.

use std::{path::Path, sync::Arc, time::SystemTime};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::{
    AlertDescription, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

/// A leaf certificate (alone in its chain) and its key.
pub type Leaf = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A day, the margin on either side of "now" for certificates that must be outside their window.
const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

/// When a leaf is valid, relative to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Current,
    Expired,
    NotYetValid,
}

/// A leaf whose only SAN is the URI `spiffe`, signed by `issuer`.
pub fn leaf(spiffe: &str, issuer: &Issuer<'_, KeyPair>, validity: Validity) -> Result<Leaf> {
    leaf_with_sans(vec![SanType::URI(spiffe.try_into()?)], issuer, validity)
}

/// A leaf with exactly these SANs (none of them need be a SPIFFE id), signed by `issuer`.
pub fn leaf_with_sans(
    sans: Vec<SanType>,
    issuer: &Issuer<'_, KeyPair>,
    validity: Validity,
) -> Result<Leaf> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = sans;
    let now = SystemTime::now();
    match validity {
        Validity::Current => {
            params.not_before = (now - DAY).into();
            params.not_after = (now + DAY).into();
        }
        Validity::Expired => {
            params.not_before = (now - 3 * DAY).into();
            params.not_after = (now - DAY).into();
        }
        Validity::NotYetValid => {
            params.not_before = (now + DAY).into();
            params.not_after = (now + 3 * DAY).into();
        }
    }
    let cert = params.signed_by(&key, issuer)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((vec![cert.der().clone()], der))
}

/// A CA nobody in the cluster trusts (its subject differs from the cluster root's, so the
/// agent's verdict is "unknown issuer", not a bad signature).
pub fn untrusted_ca() -> Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "rogue root");
    Ok(Issuer::new(params, key))
}

/// The cluster's own CA, from the directory its agents share (written by the first agent).
pub fn cluster_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let cert = std::fs::read_to_string(dir.join("ca-cert.pem")).context("reading ca-cert.pem")?;
    let key = KeyPair::from_pem(
        &std::fs::read_to_string(dir.join("ca-key.pem")).context("reading ca-key.pem")?,
    )?;
    Ok(Issuer::from_ca_cert_pem(&cert, key)?)
}

/// The TLS alert behind an I/O error of a TLS stream, if that is what it was: the peer's
/// refusal as TLS reports it (`None` for resets, timeouts, HTTP errors...).
pub fn alert_received(error: &std::io::Error) -> Option<AlertDescription> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// Takes any server certificate: for tests that check only the server's side.
#[derive(Debug)]
pub struct AnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3 client for the tunnel port, presenting `cert` (none at all when `None`), offering
/// HTTP/2 and accepting any server certificate (the tests check the server, not the client).
pub fn client_config(cert: Option<Leaf>) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The name a test client asks for (the agent's certificates carry none; the verifier above
/// does not look).
pub fn server_name() -> Result<ServerName<'static>> {
    Ok(ServerName::try_from("mesh.invalid")?.to_owned())
}
