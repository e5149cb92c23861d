//! The agent's built-in certificate authority: Istio plug-in CA files, or a self-signed root it
//! creates and shares through the CA directory, signing short-lived workload certificates.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
    string::Ia5String,
};
use rustls::{
    RootCertStore, client::verify_server_cert_signed_by_trust_anchor, server::ParsedCertificate,
};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime, pem::PemObject,
};

use super::{
    cadir::{self, CaDir, CaDirError, CaFiles},
    certificate::{CertificateError, WorkloadCertificate},
    spiffe::{Identity, IdentityError},
};

/// How long a self-signed root is valid.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Workload certificates start this long before they are issued, for peers whose clocks lag.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The last instant an X.509 time (and rcgen) can express: 9999-12-31T23:59:59Z.
const LATEST: Duration = Duration::from_secs(253_402_300_799);

/// Why the CA cannot be loaded or created, or cannot sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Dir(#[from] CaDirError),
    #[error("trust domain: {0}")]
    TrustDomain(IdentityError),
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: certificate {index} is not valid X.509: {reason}")]
    Certificate {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{key} is not the key of {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{path}: not a CA certificate (it needs basicConstraints CA:true)")]
    NotCa { path: PathBuf },
    #[error("{path}: not usable as a trust root: {source}")]
    Root {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error(
        "certificates signed with {ca_cert} do not chain to {root_cert} through {cert_chain}: {reason}"
    )]
    Chain {
        ca_cert: PathBuf,
        root_cert: PathBuf,
        cert_chain: PathBuf,
        reason: String,
    },
    #[error("generating a self-signed root: {0}")]
    Generate(rcgen::Error),
    #[error("the generated root is not usable as a trust root: {0}")]
    GeneratedRoot(rustls::Error),
    #[error("{identity} is outside this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    #[error("certificate validity must be a non-empty window between 1970 and 9999")]
    Validity,
    #[error("signing a certificate for {identity}: {source}")]
    Sign {
        identity: Identity,
        source: rcgen::Error,
    },
    #[error("the certificate issued for {identity} is unusable: {source}")]
    Issued {
        identity: Identity,
        source: CertificateError,
    },
}

/// Signs workload certificates for one trust domain.
pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// From the signing certificate up to the root; sent after every leaf.
    cert_chain: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
}

impl CertificateAuthority {
    /// Loads Istio plug-in CA files from `dir`, or, when there are none, creates a self-signed
    /// root there so that every agent sharing `dir` trusts the same root.
    ///
    /// Takes an exclusive `flock` on `dir/.lock` for the duration, so agents starting at the same
    /// time create one CA between them. Blocking: call it before serving or on a blocking thread.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        check_trust_domain(trust_domain)?;
        let ca_dir = CaDir::lock(dir)?;
        if let Some(files) = ca_dir.read()? {
            return Self::from_files(&ca_dir, &files, trust_domain);
        }
        let (ca, files) = Self::generate(trust_domain)?;
        ca_dir.write(&files)?;
        tracing::info!(dir=%dir.display(), trust_domain, component="identity", "created a self-signed root CA");
        Ok(ca)
    }

    /// A fresh self-signed root held only in memory: an independent trust root, for tests.
    pub fn self_signed(trust_domain: &str) -> Result<Self, CaError> {
        check_trust_domain(trust_domain)?;
        Self::generate(trust_domain).map(|(ca, _)| ca)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust roots (`root-cert.pem`) peers' chains must lead to.
    pub fn roots(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots)
    }

    /// `cert-chain.pem`: what follows the leaf in every issued chain.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// A certificate for `id`, valid from a minute ago (clock skew) for `ttl` (rounded up to
    /// whole seconds, as certificates carry them).
    pub fn issue(&self, id: &Identity, ttl: Duration) -> Result<WorkloadCertificate, CaError> {
        let now = SystemTime::now();
        let not_before = now.checked_sub(CLOCK_SKEW).ok_or(CaError::Validity)?;
        let not_after = now
            .checked_add(ttl)
            .map(round_up_to_second)
            .ok_or(CaError::Validity)?;
        self.issue_with(id, not_before, not_after)
    }

    /// A certificate for `id` with an explicit validity window (e.g. an expired one in tests).
    ///
    /// The leaf has a fresh ECDSA P-256 key, a random serial, the SPIFFE id as its only SAN,
    /// CA:false, digitalSignature+keyEncipherment and serverAuth+clientAuth, like Istio's.
    pub fn issue_with(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                identity: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        check_validity(not_before, not_after)?;
        let sign_error = |source| CaError::Sign {
            identity: id.clone(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_error)?;
        let uri = Ia5String::try_from(id.to_string()).map_err(sign_error)?;
        let mut params = CertificateParams::default();
        // Like Istio's: an empty subject, so the SAN extension is critical (RFC 5280 4.2.1.6).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &self.issuer).map_err(sign_error)?;
        let chain = std::iter::once(leaf.der().clone())
            .chain(self.cert_chain.iter().cloned())
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCertificate::new(chain, key).map_err(|source| CaError::Issued {
            identity: id.clone(),
            source,
        })
    }

    fn generate(trust_domain: &str) -> Result<(Self, CaFiles), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        // Istio puts the trust domain in the root's organization.
        name.push(DnType::OrganizationName, trust_domain);
        name.push(DnType::CommonName, "mesh-agent root CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        let root = params.self_signed(&key).map_err(CaError::Generate)?;
        let mut roots = RootCertStore::empty();
        roots
            .add(root.der().clone())
            .map_err(CaError::GeneratedRoot)?;
        let files = CaFiles {
            ca_cert: root.pem().into_bytes(),
            ca_key: key.serialize_pem().into_bytes(),
            root_cert: root.pem().into_bytes(),
            cert_chain: root.pem().into_bytes(),
        };
        let ca = Self {
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(params, key),
            cert_chain: vec![root.der().clone()],
            roots: Arc::new(roots),
        };
        Ok((ca, files))
    }

    fn from_files(dir: &CaDir, files: &CaFiles, trust_domain: &str) -> Result<Self, CaError> {
        let ca_cert_path = dir.path(cadir::CA_CERT);
        let key_path = dir.path(cadir::CA_KEY);
        let root_path = dir.path(cadir::ROOT_CERT);
        let chain_path = dir.path(cadir::CERT_CHAIN);

        let ca_cert = pem_certificates(&ca_cert_path, &files.ca_cert)?
            .into_iter()
            .next()
            .ok_or_else(|| no_certificate(&ca_cert_path))?;
        let key = pem_key(&key_path, &files.ca_key)?;
        check_ca_cert(&ca_cert_path, &ca_cert, &key_path, &key)?;
        let mut roots = RootCertStore::empty();
        let root_certs = pem_certificates(&root_path, &files.root_cert)?;
        if root_certs.is_empty() {
            return Err(no_certificate(&root_path));
        }
        for root in root_certs {
            roots.add(root).map_err(|source| CaError::Root {
                path: root_path.clone(),
                source,
            })?;
        }
        // Istio's self-signed CA has no chain, so an empty cert-chain.pem is allowed.
        let cert_chain = pem_certificates(&chain_path, &files.cert_chain)?;
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| CaError::Certificate {
            path: ca_cert_path.clone(),
            index: 0,
            reason: e.to_string(),
        })?;
        let ca = Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            cert_chain,
            roots: Arc::new(roots),
        };
        // The real test of the four files together: what we would sign must verify as a peer would.
        ca.check_chain().map_err(|reason| CaError::Chain {
            ca_cert: ca_cert_path,
            root_cert: root_path,
            cert_chain: chain_path,
            reason,
        })?;
        Ok(ca)
    }

    /// Issues a throw-away certificate and verifies it against the roots, as peers will.
    fn check_chain(&self) -> Result<(), String> {
        let probe = Identity::new(self.trust_domain.as_str(), "mesh-agent", "ca-check")
            .map_err(|e| e.to_string())?;
        let cert = self
            .issue(&probe, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        let leaf = ParsedCertificate::try_from(cert.leaf()).map_err(|e| e.to_string())?;
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &self.roots,
            &cert.chain()[1..],
            UnixTime::now(),
            algorithms.all,
        )
        .map_err(|e| e.to_string())
    }
}

impl fmt::Debug for CertificateAuthority {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("cert_chain_len", &self.cert_chain.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

fn check_trust_domain(trust_domain: &str) -> Result<(), CaError> {
    Identity::new(trust_domain, "x", "x")
        .map(|_| ())
        .map_err(CaError::TrustDomain)
}

fn check_validity(not_before: SystemTime, not_after: SystemTime) -> Result<(), CaError> {
    let latest = UNIX_EPOCH + LATEST;
    if not_before >= UNIX_EPOCH && not_before < not_after && not_after <= latest {
        Ok(())
    } else {
        Err(CaError::Validity)
    }
}

fn round_up_to_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => UNIX_EPOCH + Duration::from_secs(d.as_secs() + 1),
        _ => t,
    }
}

/// 16 random bytes, positive (RFC 5280 allows up to 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn pem_certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Pem {
            path: path.to_owned(),
            reason: format!("unreadable PEM: {e}"),
        })?;
    for (index, cert) in certs.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(cert) {
            return Err(CaError::Certificate {
                path: path.to_owned(),
                index,
                reason: e.to_string(),
            });
        }
    }
    Ok(certs)
}

fn no_certificate(path: &Path) -> CaError {
    CaError::Pem {
        path: path.to_owned(),
        reason: "holds no CERTIFICATE block".to_owned(),
    }
}

fn pem_key(path: &Path, pem: &[u8]) -> Result<KeyPair, CaError> {
    let key_error = |reason: String| CaError::Key {
        path: path.to_owned(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| key_error(format!("no readable private key: {e}")))?;
    // rcgen with ring signs only with PKCS#8 keys.
    let format = match &key {
        PrivateKeyDer::Pkcs8(_) => None,
        PrivateKeyDer::Pkcs1(_) => Some("an RSA PRIVATE KEY (PKCS#1)"),
        PrivateKeyDer::Sec1(_) => Some("an EC PRIVATE KEY (SEC1)"),
        _ => Some("a private key of an unknown format"),
    };
    if let Some(format) = format {
        return Err(key_error(format!(
            "is {format}; only PKCS#8 (BEGIN PRIVATE KEY) is supported, convert it with \
             `openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.new`",
            path.display()
        )));
    }
    KeyPair::try_from(&key).map_err(|e| key_error(format!("unusable private key: {e}")))
}

fn check_ca_cert(
    cert_path: &Path,
    cert: &CertificateDer<'_>,
    key_path: &Path,
    key: &KeyPair,
) -> Result<(), CaError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| CaError::Certificate {
            path: cert_path.to_owned(),
            index: 0,
            reason: e.to_string(),
        })?;
    if !parsed.is_ca() {
        return Err(CaError::NotCa {
            path: cert_path.to_owned(),
        });
    }
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::KeyMismatch {
            key: key_path.to_owned(),
            cert: cert_path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        os::unix::fs::PermissionsExt,
        sync::Barrier,
        time::{Duration, SystemTime},
    };

    use x509_parser::extensions::{GeneralName, ParsedExtension};

    use super::*;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    /// Verifies a chain the way peers do.
    fn verify(cert: &WorkloadCertificate, roots: &RootCertStore) -> Result<(), rustls::Error> {
        let leaf = ParsedCertificate::try_from(cert.leaf()).unwrap();
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        verify_server_cert_signed_by_trust_anchor(
            &leaf,
            roots,
            &cert.chain()[1..],
            UnixTime::now(),
            algorithms.all,
        )
    }

    #[test]
    fn creates_a_root_once_and_reloads_it() {
        let tmp = tempfile::tempdir().unwrap();
        let first = CertificateAuthority::load_or_create(tmp.path(), "cluster.local").unwrap();
        let root_pem = fs::read(tmp.path().join("root-cert.pem")).unwrap();
        for name in ["ca-cert.pem", "cert-chain.pem"] {
            assert_eq!(fs::read(tmp.path().join(name)).unwrap(), root_pem, "{name}");
        }
        let key_mode = fs::metadata(tmp.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);

        let second = CertificateAuthority::load_or_create(tmp.path(), "cluster.local").unwrap();
        assert_eq!(first.cert_chain(), second.cert_chain());
        // A certificate from either verifies with the other's roots.
        let cert = second
            .issue(&id("a", "b"), Duration::from_secs(60))
            .unwrap();
        verify(&cert, &first.roots()).unwrap();
    }

    #[test]
    fn agents_starting_together_agree_on_one_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let barrier = Barrier::new(8);
        let roots: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        CertificateAuthority::load_or_create(&dir, "cluster.local")
                            .unwrap()
                            .cert_chain()
                            .to_vec()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(roots.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn issues_certificates_shaped_like_istios() {
        let ca = CertificateAuthority::self_signed("cluster.local").unwrap();
        let before = SystemTime::now();
        let cert = ca
            .issue(&id("ns1", "sa1"), Duration::from_secs(3600))
            .unwrap();
        verify(&cert, &ca.roots()).unwrap();
        assert_eq!(cert.identity(), &id("ns1", "sa1"));
        assert_eq!(cert.chain().len(), 2);
        assert_eq!(&cert.chain()[1..], ca.cert_chain());

        let skew = before.duration_since(cert.not_before()).unwrap();
        assert!(
            skew >= Duration::from_secs(59) && skew <= Duration::from_secs(61),
            "{skew:?}"
        );
        let lifetime = cert.not_after().duration_since(before).unwrap();
        assert!(lifetime >= Duration::from_secs(3600) && lifetime <= Duration::from_secs(3602));

        let (_, leaf) = x509_parser::parse_x509_certificate(cert.leaf()).unwrap();
        assert!(!leaf.is_ca());
        assert!(
            leaf.basic_constraints().unwrap().is_some(),
            "CA:false is explicit"
        );
        let usage = leaf.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature() && usage.key_encipherment() && !usage.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && eku.other.is_empty());
        let sans: Vec<_> = leaf
            .extensions()
            .iter()
            .filter_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(
            sans,
            vec![GeneralName::URI("spiffe://cluster.local/ns/ns1/sa/sa1")]
        );
    }

    #[test]
    fn every_certificate_gets_its_own_key_and_serial() {
        let ca = CertificateAuthority::self_signed("cluster.local").unwrap();
        let a = ca.issue(&id("a", "b"), Duration::from_secs(60)).unwrap();
        let b = ca.issue(&id("a", "b"), Duration::from_secs(60)).unwrap();
        assert_ne!(a.serial(), b.serial());
        assert_ne!(a.key().secret_der(), b.key().secret_der());
        assert!(a.serial().len() >= 30, "{}", a.serial());
    }

    #[test]
    fn refuses_identities_of_other_trust_domains_and_bad_windows() {
        let ca = CertificateAuthority::self_signed("cluster.local").unwrap();
        let foreign = Identity::new("other.td", "a", "b").unwrap();
        assert!(matches!(
            ca.issue(&foreign, Duration::from_secs(60)),
            Err(CaError::ForeignTrustDomain { .. })
        ));
        let now = SystemTime::now();
        assert!(matches!(
            ca.issue_with(&id("a", "b"), now, now),
            Err(CaError::Validity)
        ));
        assert!(matches!(
            ca.issue(&id("a", "b"), Duration::from_secs(u64::MAX / 4)),
            Err(CaError::Validity)
        ));
        assert!(CertificateAuthority::self_signed("Not A Domain").is_err());
    }

    #[test]
    fn independent_roots_do_not_trust_each_other() {
        let ours = CertificateAuthority::self_signed("cluster.local").unwrap();
        let theirs = CertificateAuthority::self_signed("cluster.local").unwrap();
        let cert = theirs
            .issue(&id("a", "b"), Duration::from_secs(60))
            .unwrap();
        assert!(verify(&cert, &ours.roots()).is_err());
    }

    #[test]
    fn expired_certificates_can_be_issued_and_fail_verification() {
        let ca = CertificateAuthority::self_signed("cluster.local").unwrap();
        let now = SystemTime::now();
        let cert = ca
            .issue_with(
                &id("a", "b"),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        let err = verify(&cert, &ca.roots()).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    /// An Istio-style plug-in CA: a root, and an intermediate that signs workload certificates.
    struct PluginCa {
        root_pem: String,
        ca_cert_pem: String,
        ca_key_pem: String,
    }

    fn plugin_ca() -> PluginCa {
        let ca_params = |cn: &str| {
            let mut params = CertificateParams::default();
            let mut name = DistinguishedName::new();
            name.push(DnType::CommonName, cn);
            params.distinguished_name = name;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params
        };
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params("plug-in root");
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params("plug-in intermediate")
            .signed_by(&ca_key, &root_issuer)
            .unwrap();
        PluginCa {
            root_pem: root.pem(),
            ca_cert_pem: ca_cert.pem(),
            ca_key_pem: ca_key.serialize_pem(),
        }
    }

    fn write_plugin(dir: &Path, ca: &PluginCa) {
        fs::write(dir.join("ca-cert.pem"), &ca.ca_cert_pem).unwrap();
        fs::write(dir.join("ca-key.pem"), &ca.ca_key_pem).unwrap();
        fs::write(dir.join("root-cert.pem"), &ca.root_pem).unwrap();
        fs::write(
            dir.join("cert-chain.pem"),
            format!("{}{}", ca.ca_cert_pem, ca.root_pem),
        )
        .unwrap();
    }

    #[test]
    fn loads_an_istio_plugin_ca_with_an_intermediate() {
        let tmp = tempfile::tempdir().unwrap();
        let plugin = plugin_ca();
        write_plugin(tmp.path(), &plugin);
        let ca = CertificateAuthority::load_or_create(tmp.path(), "cluster.local").unwrap();
        let cert = ca.issue(&id("a", "b"), Duration::from_secs(60)).unwrap();
        // leaf, intermediate, root: the chain Istio sends.
        assert_eq!(cert.chain().len(), 3);
        verify(&cert, &ca.roots()).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(cert.leaf()).unwrap();
        assert_eq!(leaf.issuer().to_string(), "CN=plug-in intermediate");
    }

    #[test]
    fn a_missing_plugin_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        write_plugin(tmp.path(), &plugin_ca());
        fs::remove_file(tmp.path().join("cert-chain.pem")).unwrap();
        let err = CertificateAuthority::load_or_create(tmp.path(), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("cert-chain.pem missing"), "{err}");
    }

    #[test]
    fn broken_plugin_files_are_named_with_the_reason() {
        type Breakage = fn(&Path);
        let cases: [(&str, Breakage, &str); 5] = [
            (
                "garbage cert",
                |dir| fs::write(dir.join("ca-cert.pem"), "not pem").unwrap(),
                "ca-cert.pem: holds no CERTIFICATE block",
            ),
            (
                "bad base64",
                |dir| {
                    fs::write(
                        dir.join("root-cert.pem"),
                        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                    )
                    .unwrap()
                },
                "root-cert.pem: unreadable PEM",
            ),
            (
                "foreign key",
                |dir| fs::write(dir.join("ca-key.pem"), plugin_ca().ca_key_pem).unwrap(),
                "ca-key.pem is not the key of",
            ),
            (
                "other root",
                |dir| fs::write(dir.join("root-cert.pem"), plugin_ca().root_pem).unwrap(),
                "do not chain to",
            ),
            (
                "leaf as ca",
                |dir| {
                    let key = KeyPair::generate().unwrap();
                    let cert = CertificateParams::new(vec!["x".to_owned()])
                        .unwrap()
                        .self_signed(&key)
                        .unwrap();
                    fs::write(dir.join("ca-cert.pem"), cert.pem()).unwrap();
                    fs::write(dir.join("ca-key.pem"), key.serialize_pem()).unwrap();
                },
                "ca-cert.pem: not a CA certificate",
            ),
        ];
        for (why, break_it, expected) in cases {
            let tmp = tempfile::tempdir().unwrap();
            write_plugin(tmp.path(), &plugin_ca());
            break_it(tmp.path());
            let err = CertificateAuthority::load_or_create(tmp.path(), "cluster.local")
                .expect_err(why)
                .to_string();
            assert!(err.contains(expected), "{why}: {err}");
        }
    }

    #[test]
    fn non_pkcs8_keys_get_an_actionable_error() {
        let tmp = tempfile::tempdir().unwrap();
        write_plugin(tmp.path(), &plugin_ca());
        // The key's contents do not matter: the format is refused before parsing.
        fs::write(
            tmp.path().join("ca-key.pem"),
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = CertificateAuthority::load_or_create(tmp.path(), "cluster.local")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("EC PRIVATE KEY (SEC1)") && err.contains("openssl pkcs8"),
            "{err}"
        );
    }
}
