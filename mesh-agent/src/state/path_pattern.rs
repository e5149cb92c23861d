//! Istio's `paths` patterns in AuthorizationPolicy: exact, `prefix*`, `*suffix`, `*`, or a URI
//! template where `{*}` is exactly one path segment and `{**}` one or more (the last operator).

use std::fmt;

use serde::{Serialize, Serializer};

use super::string_match::StringMatch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Match(StringMatch),
    /// The template's segments (after the leading `/`).
    Template(Vec<Segment>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{*}`
    One,
    /// `{**}`
    Many,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathPatternError {
    #[error("{0:?}: a template must start with /")]
    Relative(String),
    #[error("{0:?}: {{*}} and {{**}} must each be a whole path segment")]
    PartialSegment(String),
    #[error("{0:?}: {{**}} must be the last operator")]
    AfterMany(String),
}

impl PathPattern {
    pub fn parse(pattern: &str) -> Result<PathPattern, PathPatternError> {
        if !pattern.contains("{*}") && !pattern.contains("{**}") {
            return Ok(PathPattern::Match(StringMatch::parse(pattern)));
        }
        let rest = pattern
            .strip_prefix('/')
            .ok_or_else(|| PathPatternError::Relative(pattern.to_string()))?;
        let mut segments = Vec::new();
        let mut seen_many = false;
        for text in rest.split('/') {
            let segment = match text {
                "{*}" => Segment::One,
                "{**}" => Segment::Many,
                literal if literal.contains(['{', '}', '*']) => {
                    return Err(PathPatternError::PartialSegment(pattern.to_string()));
                }
                literal => Segment::Literal(literal.to_string()),
            };
            if seen_many && segment != Segment::Literal(text.to_string()) {
                return Err(PathPatternError::AfterMany(pattern.to_string()));
            }
            seen_many |= segment == Segment::Many;
            segments.push(segment);
        }
        Ok(PathPattern::Template(segments))
    }

    /// Whether `path` (without its query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Match(pattern) => pattern.matches(path),
            PathPattern::Template(segments) => match path.strip_prefix('/') {
                Some(rest) => {
                    let actual: Vec<&str> = rest.split('/').collect();
                    template_matches(segments, &actual)
                }
                None => false,
            },
        }
    }
}

fn template_matches(template: &[Segment], path: &[&str]) -> bool {
    match template.split_first() {
        None => path.is_empty(),
        Some((Segment::Many, tail)) => {
            // One or more non-empty segments, then the literal tail.
            let Some(taken) = path.len().checked_sub(tail.len()) else {
                return false;
            };
            taken >= 1
                && path[..taken].iter().all(|s| !s.is_empty())
                && template_matches(tail, &path[taken..])
        }
        Some((first, tail)) => match path.split_first() {
            Some((segment, rest)) => {
                let here = match first {
                    Segment::Literal(literal) => literal == segment,
                    Segment::One => !segment.is_empty(),
                    Segment::Many => false,
                };
                here && template_matches(tail, rest)
            }
            None => false,
        },
    }
}

impl fmt::Display for PathPattern {
    /// Writes the pattern back as it was written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Match(pattern) => pattern.fmt(f),
            PathPattern::Template(segments) => {
                for segment in segments {
                    f.write_str("/")?;
                    match segment {
                        Segment::Literal(text) => f.write_str(text)?,
                        Segment::One => f.write_str("{*}")?,
                        Segment::Many => f.write_str("{**}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

impl Serialize for PathPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, path: &str) -> bool {
        PathPattern::parse(pattern)
            .unwrap_or_else(|e| panic!("{e}"))
            .matches(path)
    }

    #[test]
    fn plain_patterns() {
        assert!(matches("/info", "/info"));
        assert!(!matches("/info", "/info/"));
        assert!(matches("/info*", "/info/x"));
        assert!(matches("*/x", "/a/x"));
        assert!(matches("*", "/anything"));
    }

    #[test]
    fn one_segment() {
        assert!(matches("/users/{*}/orders", "/users/7/orders"));
        assert!(!matches("/users/{*}/orders", "/users/7/8/orders"));
        assert!(!matches("/users/{*}/orders", "/users//orders"));
        assert!(matches("/users/{*}", "/users/7"));
        assert!(!matches("/users/{*}", "/users/7/"));
        assert!(!matches("/users/{*}", "/users"));
    }

    #[test]
    fn many_segments() {
        assert!(matches("/static/{**}", "/static/a"));
        assert!(matches("/static/{**}", "/static/a/b/c"));
        assert!(!matches("/static/{**}", "/static/"));
        assert!(!matches("/static/{**}", "/static"));
        assert!(matches("/{*}/files/{**}/raw", "/u/files/a/b/raw"));
        assert!(!matches("/{*}/files/{**}/raw", "/u/files/raw"));
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert_eq!(
            PathPattern::parse("/a{*}"),
            Err(PathPatternError::PartialSegment("/a{*}".into()))
        );
        assert_eq!(
            PathPattern::parse("/{**}/{*}"),
            Err(PathPatternError::AfterMany("/{**}/{*}".into()))
        );
        assert_eq!(
            PathPattern::parse("{*}/a"),
            Err(PathPatternError::Relative("{*}/a".into()))
        );
        for written in ["/a/{*}/b/{**}", "/x*", "*"] {
            let pattern = PathPattern::parse(written).expect("valid");
            assert_eq!(pattern.to_string(), written);
        }
    }
}
