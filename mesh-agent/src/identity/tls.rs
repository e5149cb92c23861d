//! rustls configurations for HBONE, wire-compatible with ztunnel: TLS 1.3 only, AES-GCM suites,
//! ALPN `h2`, and both ends authenticated by the SPIFFE identity in their certificates.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, LazyLock},
};

use rustls::{
    CertificateError as RustlsCertificateError, ClientConfig, CommonState, DigitallySignedStruct,
    DistinguishedName, OtherError, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring},
    server::{
        NoServerSessionStorage, ParsedCertificate, VerifierBuilderError, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    version::TLS13,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{
    certificate::{self, CertificateError, WorkloadCertificate, leaf_identity},
    spiffe::Identity,
};

/// HBONE is HTTP/2 CONNECT.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a configuration cannot be built, or why a handshake refused the peer's certificate
/// (the latter inside `rustls::Error::InvalidCertificate(CertificateError::Other(..))`).
#[derive(thiserror::Error)]
pub enum TlsError {
    #[error("building a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    #[error("identity mismatch: got {got}, expected {}", one_of(expected))]
    IdentityMismatch {
        got: Identity,
        expected: Vec<Identity>,
    },
    #[error("peer certificate carries no workload identity: {0}")]
    NoIdentity(CertificateError),
    #[error("peer identity {got} is outside trust domain {trust_domain}")]
    ForeignTrustDomain { got: Identity, trust_domain: String },
}

/// rustls prints a refusal's reason with `Debug` ("invalid peer certificate: Other(..)"), so
/// `Debug` is the message, to keep "identity mismatch: got X, expected Y" readable in logs.
impl fmt::Debug for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// ring, with only the TLS 1.3 AES-GCM suites ztunnel accepts.
static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    let mut provider = ring::default_provider();
    provider.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(provider)
});

/// The crypto provider every HBONE configuration uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::clone(&PROVIDER)
}

/// The name to connect with: the certificate check is by identity, never by name, and an IP
/// address keeps rustls from sending SNI.
pub fn server_name() -> ServerName<'static> {
    ServerName::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// A client that presents `cert` and accepts a server whose chain leads to `roots` and whose
/// identity is one of `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(ExpectedIdentity {
        roots,
        expected,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain().to_vec(), cert.key().clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A resumed session skips certificate verification, so each connection verifies afresh.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// A server that presents `cert` and requires a client certificate that leads to `roots` and
/// carries an identity of `cert`'s trust domain.
pub fn server_config(
    cert: &WorkloadCertificate,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let webpki =
        WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider)).build()?;
    let verifier = Arc::new(SameTrustDomain {
        webpki,
        trust_domain: cert.identity().trust_domain().to_owned(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain().to_vec(), cert.key().clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The SPIFFE identity of the peer's leaf certificate, once the handshake has verified it.
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    leaf_identity(conn.peer_certificates()?.first()?).ok()
}

/// The SPIFFE identity and certificate serial of the verified peer.
pub fn peer_certificate(conn: &CommonState) -> Option<(Identity, String)> {
    certificate::leaf_identity_and_serial(conn.peer_certificates()?.first()?).ok()
}

fn refuse(reason: TlsError) -> rustls::Error {
    RustlsCertificateError::Other(OtherError(Arc::new(reason))).into()
}

fn one_of(identities: &[Identity]) -> String {
    match identities {
        [] => "none".to_owned(),
        [one] => one.to_string(),
        many => {
            let all: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("one of {}", all.join(", "))
        }
    }
}

/// Verifies the server's chain to the roots, then its identity against the expected ones.
/// The server name is ignored: in the mesh, the identity is what is authenticated.
#[derive(Debug)]
struct ExpectedIdentity {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExpectedIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let leaf = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let got = leaf_identity(end_entity).map_err(|e| refuse(TlsError::NoIdentity(e)))?;
        if self.expected.contains(&got) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(refuse(TlsError::IdentityMismatch {
                got,
                expected: self.expected.clone(),
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// rustls' WebPKI client verification, plus: the client's identity is of our trust domain.
#[derive(Debug)]
struct SameTrustDomain {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SameTrustDomain {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        let got = leaf_identity(end_entity).map_err(|e| refuse(TlsError::NoIdentity(e)))?;
        if got.trust_domain() == self.trust_domain {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(refuse(TlsError::ForeignTrustDomain {
                got,
                trust_domain: self.trust_domain.clone(),
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        time::{Duration, SystemTime},
    };

    use rustls::{CipherSuite, ProtocolVersion, version::TLS12};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

    use super::*;
    use crate::identity::ca::CertificateAuthority;

    type Handshake = (
        io::Result<client::TlsStream<DuplexStream>>,
        io::Result<server::TlsStream<DuplexStream>>,
    );

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "ns", sa).unwrap()
    }

    fn ca() -> CertificateAuthority {
        CertificateAuthority::self_signed("cluster.local").unwrap()
    }

    fn issue(ca: &CertificateAuthority, sa: &str) -> WorkloadCertificate {
        ca.issue(&id(sa), Duration::from_secs(3600)).unwrap()
    }

    async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Handshake {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::join!(
            TlsConnector::from(client).connect(server_name(), client_io),
            TlsAcceptor::from(server).accept(server_io),
        )
    }

    /// The error a refusing side saw, as text (rustls errors travel inside `io::Error`).
    fn refused(result: io::Result<impl Sized>) -> String {
        match result {
            Ok(_) => panic!("the handshake succeeded"),
            Err(e) => e.to_string(),
        }
    }

    /// After the client finished its half of a TLS 1.3 handshake, a server refusal arrives as
    /// an alert on the client's first read.
    async fn client_sees_refusal(mut stream: client::TlsStream<DuplexStream>) {
        let mut buf = [0u8; 1];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => {}
            Ok(_) => panic!("the client read data from a server that refused it"),
        }
    }

    #[tokio::test]
    async fn a_good_pair_connects_and_each_sees_the_other() {
        let ca = ca();
        let (client_cert, server_cert) = (issue(&ca, "client"), issue(&ca, "server"));
        let (client, server) = handshake(
            client_config(&client_cert, ca.roots(), vec![id("server")]).unwrap(),
            server_config(&server_cert, ca.roots()).unwrap(),
        )
        .await;
        let (mut client, mut server) = (client.unwrap(), server.unwrap());

        let (_, client_conn) = client.get_ref();
        assert_eq!(peer_identity(client_conn), Some(id("server")));
        assert_eq!(client_conn.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            client_conn.protocol_version(),
            Some(ProtocolVersion::TLSv1_3)
        );
        let suite = client_conn.negotiated_cipher_suite().unwrap().suite();
        assert!(
            matches!(
                suite,
                CipherSuite::TLS13_AES_128_GCM_SHA256 | CipherSuite::TLS13_AES_256_GCM_SHA384
            ),
            "{suite:?}"
        );
        let (_, server_conn) = server.get_ref();
        assert_eq!(peer_identity(server_conn), Some(id("client")));
        assert_eq!(server_conn.alpn_protocol(), Some(ALPN_H2));

        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn the_server_refuses_a_client_of_an_untrusted_root() {
        let (ca, rogue) = (ca(), ca());
        let (client, server) = handshake(
            client_config(&issue(&rogue, "client"), ca.roots(), vec![id("server")]).unwrap(),
            server_config(&issue(&ca, "server"), ca.roots()).unwrap(),
        )
        .await;
        let err = refused(server);
        // Both roots have the same subject, so webpki finds the wrong one and its signature fails.
        assert!(
            err.contains("BadSignature") || err.contains("UnknownIssuer"),
            "{err}"
        );
        if let Ok(client) = client {
            client_sees_refusal(client).await;
        }
    }

    #[tokio::test]
    async fn the_server_refuses_an_expired_client_certificate() {
        let ca = ca();
        let now = SystemTime::now();
        let expired = ca
            .issue_with(
                &id("client"),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        let (client, server) = handshake(
            client_config(&expired, ca.roots(), vec![id("server")]).unwrap(),
            server_config(&issue(&ca, "server"), ca.roots()).unwrap(),
        )
        .await;
        let err = refused(server);
        assert!(err.contains("expired"), "{err}");
        if let Ok(client) = client {
            client_sees_refusal(client).await;
        }
    }

    #[tokio::test]
    async fn the_server_refuses_a_client_of_another_trust_domain() {
        let (ours, theirs) = (ca(), CertificateAuthority::self_signed("other.td").unwrap());
        // Trust both roots, so only the trust domain check can refuse.
        let mut roots = RootCertStore::empty();
        roots.roots.extend(ours.roots().roots.iter().cloned());
        roots.roots.extend(theirs.roots().roots.iter().cloned());
        let roots = Arc::new(roots);
        let foreign = theirs
            .issue(
                &Identity::new("other.td", "ns", "client").unwrap(),
                Duration::from_secs(60),
            )
            .unwrap();
        let (client, server) = handshake(
            client_config(&foreign, Arc::clone(&roots), vec![id("server")]).unwrap(),
            server_config(&issue(&ours, "server"), roots).unwrap(),
        )
        .await;
        let err = refused(server);
        assert!(err.contains("outside trust domain cluster.local"), "{err}");
        if let Ok(client) = client {
            client_sees_refusal(client).await;
        }
    }

    /// A certificate from the cluster's own CA, but with only a DNS SAN: it chains to the
    /// root, so only the identity check can refuse it, and it must do so in the handshake.
    #[tokio::test]
    async fn the_server_refuses_a_client_certificate_without_a_spiffe_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(
            &std::fs::read_to_string(dir.path().join("ca-cert.pem")).unwrap(),
            rcgen::KeyPair::from_pem(
                &std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["client.shop.svc".to_string()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params.signed_by(&key, &issuer).unwrap();
        let provider = crypto_provider();
        let verifier = Arc::new(ExpectedIdentity {
            roots: ca.roots(),
            expected: vec![id("server")],
            algorithms: provider.signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
                    key.serialize_der(),
                )),
            )
            .unwrap();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let (client, server) = handshake(
            Arc::new(config),
            server_config(&issue(&ca, "server"), ca.roots()).unwrap(),
        )
        .await;
        let err = refused(server);
        assert!(
            err.contains("carries no workload identity")
                && err.contains("has no URI SAN, so no SPIFFE identity"),
            "{err}"
        );
        if let Ok(client) = client {
            client_sees_refusal(client).await;
        }
    }

    #[tokio::test]
    async fn the_server_refuses_a_client_without_a_certificate() {
        let ca = ca();
        let provider = crypto_provider();
        let verifier = Arc::new(ExpectedIdentity {
            roots: ca.roots(),
            expected: vec![id("server")],
            algorithms: provider.signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let (client, server) = handshake(
            Arc::new(config),
            server_config(&issue(&ca, "server"), ca.roots()).unwrap(),
        )
        .await;
        let err = refused(server);
        assert!(err.contains("peer sent no certificates"), "{err}");
        if let Ok(client) = client {
            client_sees_refusal(client).await;
        }
    }

    #[tokio::test]
    async fn the_client_refuses_a_server_certificate_outside_its_validity() {
        let ca = ca();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let cases = [
            ("expired", now - 2 * hour, now - hour, "certificate expired"),
            (
                "not yet valid",
                now + hour,
                now + 2 * hour,
                "certificate not valid yet",
            ),
        ];
        for (case, not_before, not_after, reason) in cases {
            let server_cert = ca.issue_with(&id("server"), not_before, not_after).unwrap();
            let (client, server) = handshake(
                client_config(&issue(&ca, "client"), ca.roots(), vec![id("server")]).unwrap(),
                server_config(&server_cert, ca.roots()).unwrap(),
            )
            .await;
            let err = refused(client);
            assert!(err.contains(reason), "{case}: {err}");
            assert!(server.is_err(), "{case}: the server's handshake completed");
        }
    }

    #[tokio::test]
    async fn the_client_refuses_a_server_with_another_identity() {
        let ca = ca();
        let (client, server) = handshake(
            client_config(&issue(&ca, "client"), ca.roots(), vec![id("a")]).unwrap(),
            server_config(&issue(&ca, "b"), ca.roots()).unwrap(),
        )
        .await;
        let err = refused(client);
        assert!(
            err.contains(
                "identity mismatch: got spiffe://cluster.local/ns/ns/sa/b, \
                 expected spiffe://cluster.local/ns/ns/sa/a"
            ),
            "{err}"
        );
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn the_client_accepts_any_of_the_expected_identities() {
        let ca = ca();
        let (client, server) = handshake(
            client_config(&issue(&ca, "client"), ca.roots(), vec![id("a"), id("b")]).unwrap(),
            server_config(&issue(&ca, "b"), ca.roots()).unwrap(),
        )
        .await;
        assert!(client.is_ok() && server.is_ok());
    }

    #[tokio::test]
    async fn the_client_refuses_a_server_of_an_untrusted_root() {
        let (ca, rogue) = (ca(), ca());
        let (client, server) = handshake(
            client_config(&issue(&ca, "client"), ca.roots(), vec![id("server")]).unwrap(),
            server_config(&issue(&rogue, "server"), ca.roots()).unwrap(),
        )
        .await;
        let err = refused(client);
        assert!(
            err.contains("BadSignature") || err.contains("UnknownIssuer"),
            "{err}"
        );
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn the_server_refuses_a_tls12_only_client() {
        let ca = ca();
        let client_cert = issue(&ca, "client");
        let provider = Arc::new(ring::default_provider());
        let verifier = Arc::new(ExpectedIdentity {
            roots: ca.roots(),
            expected: vec![id("server")],
            algorithms: provider.signature_verification_algorithms,
        });
        let mut tls12 = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(client_cert.chain().to_vec(), client_cert.key().clone_key())
            .unwrap();
        tls12.alpn_protocols = vec![ALPN_H2.to_vec()];
        let (client, server) = handshake(
            Arc::new(tls12),
            server_config(&issue(&ca, "server"), ca.roots()).unwrap(),
        )
        .await;
        assert!(client.is_err());
        let err = refused(server);
        assert!(err.contains("incompatible"), "{err}");
    }

    #[tokio::test]
    async fn the_server_refuses_a_client_without_aes_gcm() {
        let ca = ca();
        let client_cert = issue(&ca, "client");
        let mut chacha_only = ring::default_provider();
        chacha_only.cipher_suites = vec![ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
        let provider = Arc::new(chacha_only);
        let verifier = Arc::new(ExpectedIdentity {
            roots: ca.roots(),
            expected: vec![id("server")],
            algorithms: provider.signature_verification_algorithms,
        });
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(client_cert.chain().to_vec(), client_cert.key().clone_key())
            .unwrap();
        let (client, server) = handshake(
            Arc::new(config),
            server_config(&issue(&ca, "server"), ca.roots()).unwrap(),
        )
        .await;
        assert!(client.is_err() && server.is_err());
    }

    #[test]
    fn configs_offer_only_tls13_aes_gcm_and_h2() {
        let ca = ca();
        let cert = issue(&ca, "a");
        let client = client_config(&cert, ca.roots(), vec![id("b")]).unwrap();
        let server = server_config(&cert, ca.roots()).unwrap();
        for suites in [
            &client.crypto_provider().cipher_suites,
            &server.crypto_provider().cipher_suites,
        ] {
            let names: Vec<_> = suites.iter().map(|s| s.suite()).collect();
            assert_eq!(
                names,
                vec![
                    CipherSuite::TLS13_AES_256_GCM_SHA384,
                    CipherSuite::TLS13_AES_128_GCM_SHA256
                ]
            );
        }
        assert_eq!(client.alpn_protocols, vec![b"h2".to_vec()]);
        assert_eq!(server.alpn_protocols, vec![b"h2".to_vec()]);
    }
}
