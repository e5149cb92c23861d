//! The test API server's TLS identity (a self-signed CA and a server certificate made with
//! rcgen) and the kubeconfig that points a kube-rs client at it.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Why the certificate or the kubeconfig could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("write kubeconfig {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// A CA and a server certificate it signed, valid for `127.0.0.1`, `localhost`, the listen
/// address and the extra name.
pub struct ServerIdentity {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl ServerIdentity {
    pub fn generate(ip: IpAddr, name: &str) -> Result<Self, TlsError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mesh-tests apiserver CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let mut names = vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes.default.svc".to_string(),
        ];
        for extra in [ip.to_string(), name.to_string()] {
            if !extra.is_empty() && !names.contains(&extra) {
                names.push(extra);
            }
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "mesh-tests apiserver");
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Self {
            ca_pem,
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }

    /// The CA certificate (PEM) a client must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// rustls server configuration: HTTP/1.1 only (ALPN `http/1.1`), as kube-rs speaks it.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A kubeconfig (YAML is a superset of JSON, so it is written as JSON) with one cluster, one
/// user holding `token`, and one current context.
pub fn kubeconfig(server_url: &str, ca_pem: &str, token: &str) -> String {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "mesh-tests", "cluster": {
            "server": server_url,
            "certificate-authority-data": ca_data,
        }}],
        "users": [{"name": "mesh-tests", "user": {"token": token}}],
        "contexts": [{"name": "mesh-tests", "context": {
            "cluster": "mesh-tests",
            "user": "mesh-tests",
            "namespace": "default",
        }}],
        "current-context": "mesh-tests",
        "preferences": {},
    });
    format!("{config:#}\n")
}

pub fn write_kubeconfig(path: &Path, contents: &str) -> Result<(), TlsError> {
    std::fs::write(path, contents).map_err(|source| TlsError::Write {
        path: path.display().to_string(),
        source,
    })
}
