//! Workload identities (SPIFFE ids) and their certificates: the built-in CA, the per-node
//! certificate manager, and the rustls configurations HBONE connections use.

mod ca;
mod cadir;
mod certificate;
mod manager;
pub mod rfc3339;
mod spiffe;
pub mod tls;

use std::{path::PathBuf, time::Duration};

use serde::Serialize;

pub use ca::{CaError, CertificateAuthority};
pub use cadir::CaDirError;
pub use certificate::{
    CertificateError, CertificateView, ChainCertificateView, WorkloadCertificate,
};
pub use manager::{CertificateManager, ManagerError};
pub use spiffe::{Identity, IdentityError};
pub use tls::{TlsError, client_config, peer_certificate, peer_identity, server_config};

/// Where workload identities come from and how long their certificates live.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityConfig {
    /// The `<trust-domain>` of `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub trust_domain: String,
    /// Istio plug-in CA files (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`),
    /// or where a self-signed root shared by this node's agents is created.
    pub ca_dir: PathBuf,
    /// Lifetime of workload certificates; they are rotated at half of it.
    #[serde(serialize_with = "crate::config::secs::serialize")]
    pub cert_ttl: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            ca_dir: PathBuf::from("/var/lib/mesh-agent/ca"),
            cert_ttl: Duration::from_secs(24 * 60 * 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_serializes() {
        let config = IdentityConfig::default();
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["trust_domain"], "cluster.local");
        assert_eq!(json["ca_dir"], "/var/lib/mesh-agent/ca");
        assert_eq!(json["cert_ttl"], 86400.0);
    }
}
