//! What the agent knows about an inbound connection at L4: addresses, port and the peer's identity.

use std::net::Ipv4Addr;

/// The attributes L4 authorization looks at. Principals are SPIFFE IDs without `spiffe://`
/// (`cluster.local/ns/shop/sa/cart`), the form Istio policies use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionAttributes {
    pub source_ip: Ipv4Addr,
    /// The peer's identity from mTLS; `None` for plaintext.
    pub source_principal: Option<String>,
    /// The namespace in the peer's identity; `None` for plaintext.
    pub source_namespace: Option<String>,
    pub destination_ip: Ipv4Addr,
    pub destination_port: u16,
}

impl ConnectionAttributes {
    /// An mTLS connection; the source namespace is read from the principal.
    pub fn mtls(
        source_ip: Ipv4Addr,
        principal: impl Into<String>,
        destination_ip: Ipv4Addr,
        destination_port: u16,
    ) -> Self {
        let principal = principal.into();
        ConnectionAttributes {
            source_ip,
            source_namespace: namespace_of_principal(&principal).map(str::to_string),
            source_principal: Some(principal),
            destination_ip,
            destination_port,
        }
    }

    /// A plaintext connection: no identity, no namespace.
    pub fn plaintext(source_ip: Ipv4Addr, destination_ip: Ipv4Addr, destination_port: u16) -> Self {
        ConnectionAttributes {
            source_ip,
            source_principal: None,
            source_namespace: None,
            destination_ip,
            destination_port,
        }
    }

    /// The peer's `(namespace, service account)`, from its principal.
    pub(super) fn source_service_account(&self) -> Option<(&str, &str)> {
        self.source_principal.as_deref().and_then(parts)
    }
}

/// The namespace of a principal `<trust-domain>/ns/<namespace>/sa/<account>` (a leading
/// `spiffe://` is tolerated); `None` for anything else.
pub fn namespace_of_principal(principal: &str) -> Option<&str> {
    parts(principal).map(|(namespace, _)| namespace)
}

fn parts(principal: &str) -> Option<(&str, &str)> {
    let principal = principal.strip_prefix("spiffe://").unwrap_or(principal);
    let segments: Vec<&str> = principal.split('/').collect();
    match segments.as_slice() {
        [trust_domain, "ns", namespace, "sa", account]
            if !trust_domain.is_empty() && !namespace.is_empty() && !account.is_empty() =>
        {
            Some((namespace, account))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_namespace_of_a_principal() {
        let cases = [
            ("cluster.local/ns/shop/sa/cart", Some("shop")),
            ("spiffe://example.org/ns/batch/sa/default", Some("batch")),
            ("cluster.local/ns//sa/cart", None),
            ("cluster.local/ns/shop/sa/", None),
            ("cluster.local/ns/shop", None),
            ("cluster.local/sa/cart/ns/shop", None),
            ("cluster.local/ns/shop/sa/cart/extra", None),
            ("", None),
        ];
        for (principal, expected) in cases {
            assert_eq!(namespace_of_principal(principal), expected, "{principal}");
        }
    }

    #[test]
    fn builds_mtls_and_plaintext_attributes() {
        let source = Ipv4Addr::new(10, 0, 0, 1);
        let destination = Ipv4Addr::new(10, 0, 0, 2);
        let mtls = ConnectionAttributes::mtls(source, "td/ns/shop/sa/cart", destination, 80);
        assert_eq!(mtls.source_namespace.as_deref(), Some("shop"));
        assert_eq!(mtls.source_service_account(), Some(("shop", "cart")));
        let plain = ConnectionAttributes::plaintext(source, destination, 80);
        assert_eq!(plain.source_principal, None);
        assert_eq!(plain.source_namespace, None);
        assert_eq!(plain.source_service_account(), None);
    }
}
