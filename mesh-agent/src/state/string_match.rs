//! Istio's string patterns for principals and namespaces: exact, `prefix*`, `*suffix`, or `*`.

use std::fmt;

use serde::{Serialize, Serializer};

/// A pattern as Istio reads it: `*` alone matches any value that is present (a principal exists,
/// so the peer used mTLS); a leading `*` matches a suffix, a trailing one a prefix; a `*`
/// anywhere else is a literal character.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StringMatch {
    pub fn parse(pattern: &str) -> StringMatch {
        if pattern == "*" {
            StringMatch::Any
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else {
            StringMatch::Exact(pattern.to_string())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(exact) => value == exact,
            StringMatch::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatch::Suffix(suffix) => value.ends_with(suffix.as_str()),
            StringMatch::Any => true,
        }
    }
}

impl fmt::Display for StringMatch {
    /// Writes the pattern back as it was written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(exact) => f.write_str(exact),
            StringMatch::Prefix(prefix) => write!(f, "{prefix}*"),
            StringMatch::Suffix(suffix) => write!(f, "*{suffix}"),
            StringMatch::Any => f.write_str("*"),
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_like_istio() {
        let principal = "cluster.local/ns/shop/sa/cart";
        let cases = [
            ("*", true),
            ("cluster.local/ns/shop/sa/cart", true),
            ("cluster.local/ns/shop/sa/car", false),
            ("cluster.local/ns/shop/*", true),
            ("cluster.local/ns/other/*", false),
            ("*/sa/cart", true),
            ("*/sa/web", false),
            ("cluster.local/ns/*/sa/cart", false),
            // A leading `*` makes the rest a literal suffix, trailing `*` included.
            ("*/ns/shop/*", false),
        ];
        for (pattern, expected) in cases {
            assert_eq!(
                StringMatch::parse(pattern).matches(principal),
                expected,
                "{pattern}"
            );
        }
    }

    #[test]
    fn round_trips_the_pattern() {
        for pattern in ["*", "a*", "*a", "a*b", "a", "**"] {
            assert_eq!(StringMatch::parse(pattern).to_string(), pattern);
        }
    }
}
