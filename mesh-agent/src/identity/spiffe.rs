//! A workload's SPIFFE identity, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";

/// Why a string or a set of parts is not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE id: it must start with spiffe://")]
    Scheme(String),
    #[error("{0:?} has no trust domain")]
    EmptyTrustDomain(String),
    /// SPIFFE trust domains are lowercase letters, digits, `.`, `-` and `_`.
    #[error("trust domain {0:?} may only hold lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error("{0:?} does not have the path /ns/<namespace>/sa/<service-account>")]
    Path(String),
    #[error("the {part} of an identity must not be empty")]
    EmptySegment { part: &'static str },
    /// SPIFFE path segments are letters, digits, `.`, `-` and `_`, and are never `.` or `..`.
    #[error("{part} {value:?} is not a valid SPIFFE path segment")]
    Segment { part: &'static str, value: String },
}

/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`: who a workload is.
///
/// The parts are validated on construction, so `Display` always yields a URI that parses back.
/// Ordering is by trust domain, then namespace, then service account.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let identity = Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        check_trust_domain(&identity.trust_domain)?;
        check_segment("namespace", &identity.namespace)?;
        check_segment("service account", &identity.service_account)?;
        Ok(identity)
    }

    /// Parses exactly `spiffe://td/ns/X/sa/Y`; anything else is an error.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme(uri.to_owned()))?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if trust_domain.is_empty() {
            return Err(IdentityError::EmptyTrustDomain(uri.to_owned()));
        }
        let mut segments = path.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) => {
                Self::new(trust_domain, namespace, service_account)
            }
            _ => Err(IdentityError::Path(uri.to_owned())),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn check_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    if trust_domain.is_empty() {
        return Err(IdentityError::EmptySegment {
            part: "trust domain",
        });
    }
    let valid = trust_domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(IdentityError::TrustDomain(trust_domain.to_owned()))
    }
}

fn check_segment(part: &'static str, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError::EmptySegment { part });
    }
    let valid = value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(IdentityError::Segment {
            part,
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let uri = String::deserialize(deserializer)?;
        Self::parse(&uri).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_round_trip() {
        let uri = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        let id = Identity::parse(uri).unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(id.to_string(), uri);
        assert_eq!(uri.parse::<Identity>().unwrap(), id);
    }

    #[test]
    fn rejects_everything_but_the_exact_shape() {
        let bad = [
            ("", "scheme"),
            ("http://cluster.local/ns/a/sa/b", "scheme"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe:///ns/a/sa/b", "empty td"),
            ("spiffe://cluster.local", "no path"),
            ("spiffe://cluster.local/", "empty path"),
            ("spiffe://cluster.local/ns/a", "short"),
            ("spiffe://cluster.local/ns/a/sa", "short"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "extra segment"),
            ("spiffe://cluster.local/ns/a/sa/b/", "trailing slash"),
            ("spiffe://cluster.local/ns//sa/b", "empty namespace"),
            ("spiffe://cluster.local/ns/a/sa/", "empty sa"),
            ("spiffe://cluster.local/sa/b/ns/a", "swapped"),
            ("spiffe://cluster.local//ns/a/sa/b", "double slash"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "uppercase td"),
            ("spiffe://cluster.local:8080/ns/a/sa/b", "port"),
            ("spiffe://cluster.local/ns/../sa/b", "dot-dot"),
            ("spiffe://cluster.local/ns/a b/sa/b", "space"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
        ];
        for (uri, why) in bad {
            assert!(Identity::parse(uri).is_err(), "{why}: {uri:?} was accepted");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            Identity::parse("https://x/ns/a/sa/b"),
            Err(IdentityError::Scheme("https://x/ns/a/sa/b".into()))
        );
        assert_eq!(
            Identity::parse("spiffe://td/ns//sa/b"),
            Err(IdentityError::EmptySegment { part: "namespace" })
        );
        assert_eq!(
            Identity::new("td", "a", "b/c"),
            Err(IdentityError::Segment {
                part: "service account",
                value: "b/c".into()
            })
        );
    }

    #[test]
    fn serializes_as_the_uri() {
        let id = Identity::new("cluster.local", "ns1", "sa1").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/ns1/sa/sa1\"");
        assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), id);
        assert!(serde_json::from_str::<Identity>("\"spiffe://x/ns/a\"").is_err());
    }

    #[test]
    fn orders_by_trust_domain_namespace_then_service_account() {
        let a = Identity::new("a.td", "z", "z").unwrap();
        let b = Identity::new("b.td", "a", "a").unwrap();
        let c = Identity::new("b.td", "a", "b").unwrap();
        assert!(a < b && b < c);
    }
}
