//! An IP block (`10.0.0.0/8`, or one address as `/32`), as written in Istio policies' `ipBlocks`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// An address block. IPv6 blocks are accepted (dual-stack manifests carry them) but never
/// contain an IPv4 address: the agent only sees IPv4 traffic for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address, host bits cleared.
    network: IpAddr,
    prefix: u8,
}

/// Text that is not an IP block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or CIDR block")]
    Syntax(String),
    #[error("{text:?}: prefix length must be at most {max}")]
    Prefix { text: String, max: u8 },
}

impl Cidr {
    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the block; never across address families.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                u32::from(network) == u32::from(ip) & mask_v4(self.prefix)
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                u128::from(network) == u128::from(ip) & mask_v6(self.prefix)
            }
            _ => false,
        }
    }
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Reads `a.b.c.d`, `a.b.c.d/n` and their IPv6 forms. Host bits are cleared, as Istio does
    /// (`10.1.2.3/8` is `10.0.0.0/8`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || CidrError::Syntax(text.to_string());
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| syntax())?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // `u8::from_str` takes a leading `+`; a prefix is digits only.
            Some(prefix) if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(syntax());
            }
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| CidrError::Prefix {
                    text: text.to_string(),
                    max,
                })?,
        };
        let network = match address {
            IpAddr::V4(ip) => IpAddr::V4((u32::from(ip) & mask_v4(prefix)).into()),
            IpAddr::V6(ip) => IpAddr::V6((u128::from(ip) & mask_v6(prefix)).into()),
        };
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("valid block")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("valid IP")
    }

    #[test]
    fn parses_blocks_and_single_addresses() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("10.1.2.3").to_string(), "10.1.2.3/32");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("fd00::1/64").to_string(), "fd00::/64");
        assert_eq!(cidr("fd00::1").prefix(), 128);
    }

    #[test]
    fn contains() {
        let cases = [
            ("10.0.0.0/8", "10.255.1.1", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.0.0.5", "10.0.0.5", true),
            ("10.0.0.5", "10.0.0.6", false),
            ("0.0.0.0/0", "192.168.1.1", true),
            ("192.168.1.0/31", "192.168.1.1", true),
            ("192.168.1.0/31", "192.168.1.2", false),
            ("::/0", "10.0.0.1", false),
            ("fd00::/8", "fd12::1", true),
        ];
        for (block, address, expected) in cases {
            assert_eq!(
                cidr(block).contains(ip(address)),
                expected,
                "{block} {address}"
            );
        }
    }

    #[test]
    fn rejects_malformed_blocks() {
        let cases = [
            (
                "10.0.0.x",
                "\"10.0.0.x\" is not an IP address or CIDR block",
            ),
            (
                "10.0.0.0/",
                "\"10.0.0.0/\" is not an IP address or CIDR block",
            ),
            (
                "10.0.0.0/+8",
                "\"10.0.0.0/+8\" is not an IP address or CIDR block",
            ),
            (
                "10.0.0.0/33",
                "\"10.0.0.0/33\": prefix length must be at most 32",
            ),
            (
                "fd00::/129",
                "\"fd00::/129\": prefix length must be at most 128",
            ),
            (
                "10.0.0.0/999",
                "\"10.0.0.0/999\": prefix length must be at most 32",
            ),
            ("", "\"\" is not an IP address or CIDR block"),
            (
                "10.0.0.0/8/8",
                "\"10.0.0.0/8/8\" is not an IP address or CIDR block",
            ),
        ];
        for (text, message) in cases {
            let error = text.parse::<Cidr>().expect_err(text);
            assert_eq!(error.to_string(), message);
        }
    }

    #[test]
    fn serializes_as_text() {
        assert_eq!(
            serde_json::to_string(&cidr("10.0.0.0/8")).expect("serializes"),
            "\"10.0.0.0/8\""
        );
    }
}
