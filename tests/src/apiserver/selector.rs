//! Field and label selectors as the API server parses and applies them (`fieldSelector`,
//! `labelSelector` query parameters).

use serde_json::Value;

/// A selector the server refuses (answered with 400 BadRequest).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("field label not supported: {0}")]
    UnsupportedField(String),
    #[error("invalid field selector: {0:?}")]
    BadField(String),
    #[error("unable to parse requirement: {0:?}")]
    BadLabel(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldOp {
    Equals,
    NotEquals,
}

/// `a=b,c!=d`: every term must hold.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    terms: Vec<(String, FieldOp, String)>,
}

impl FieldSelector {
    /// Parses `text`, accepting only the fields in `supported` (plus `metadata.name` and
    /// `metadata.namespace`, which every kind has).
    pub fn parse(text: &str, supported: &[&str]) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (key, op, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, FieldOp::NotEquals, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, FieldOp::Equals, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, FieldOp::Equals, v)
            } else {
                return Err(SelectorError::BadField(term.to_string()));
            };
            let key = key.trim();
            if !(key == "metadata.name" || key == "metadata.namespace" || supported.contains(&key))
            {
                return Err(SelectorError::UnsupportedField(key.to_string()));
            }
            terms.push((key.to_string(), op, value.trim().to_string()));
        }
        Ok(Self { terms })
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|(key, op, want)| {
            let have = field_value(object, key);
            (have == *want) == (*op == FieldOp::Equals)
        })
    }
}

/// A field as the API server's `ToSelectableFields` renders it: strings as they are, booleans
/// as `true`/`false`, a missing field as the empty string (`spec.hostNetwork` as `false`).
fn field_value(object: &Value, key: &str) -> String {
    let mut at = object;
    for part in key.split('.') {
        match at.get(part) {
            Some(next) => at = next,
            None if key == "spec.hostNetwork" => return "false".to_string(),
            None => return String::new(),
        }
    }
    match at {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Equality (`a=b`, `a==b`, `a!=b`) and set-based (`a in (x,y)`, `a notin (x)`, `a`, `!a`)
/// requirements, all of which must hold.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector {
    reqs: Vec<LabelReq>,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let bad = || SelectorError::BadLabel(text.to_string());
        let mut reqs = Vec::new();
        for term in split_top_level(text).map_err(|()| bad())? {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let req = if let Some(key) = term.strip_prefix('!') {
                LabelReq::NotExists(label_key(key).ok_or_else(bad)?)
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::NotEquals(
                    label_key(k).ok_or_else(bad)?,
                    label_value(v).ok_or_else(bad)?,
                )
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelReq::Equals(
                    label_key(k).ok_or_else(bad)?,
                    label_value(v).ok_or_else(bad)?,
                )
            } else if let Some((k, set)) = split_set(term, " notin ") {
                LabelReq::NotIn(
                    label_key(k).ok_or_else(bad)?,
                    parse_set(set).ok_or_else(bad)?,
                )
            } else if let Some((k, set)) = split_set(term, " in ") {
                LabelReq::In(
                    label_key(k).ok_or_else(bad)?,
                    parse_set(set).ok_or_else(bad)?,
                )
            } else {
                LabelReq::Exists(label_key(term).ok_or_else(bad)?)
            };
            reqs.push(req);
        }
        Ok(Self { reqs })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|req| match req {
            LabelReq::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, set) => get(k).is_some_and(|have| set.iter().any(|s| s == have)),
            LabelReq::NotIn(k, set) => !get(k).is_some_and(|have| set.iter().any(|s| s == have)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Splits on the commas that are not inside `( … )`.
fn split_top_level(text: &str) -> Result<Vec<&str>, ()> {
    let (mut depth, mut start, mut parts) = (0usize, 0usize, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or(())?,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn split_set<'a>(term: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let (key, rest) = term.split_once(op)?;
    Some((key, rest.trim()))
}

fn parse_set(set: &str) -> Option<Vec<String>> {
    let inner = set.strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(|v| label_value(v).filter(|v| !v.is_empty()))
        .collect()
}

fn label_key(key: &str) -> Option<String> {
    let key = key.trim();
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    ok.then(|| key.to_string())
}

fn label_value(value: &str) -> Option<String> {
    let value = value.trim();
    let ok = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then(|| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({"metadata": {"name": "web-1", "namespace": "shop",
                "labels": {"app": "web", "tier": "front"}},
               "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}})
    }

    #[test]
    fn field_selectors_and_their_errors() {
        let pods = &["spec.nodeName", "status.phase", "spec.hostNetwork"];
        let sel = |s: &str| FieldSelector::parse(s, pods).map(|f| f.matches(&pod()));
        assert_eq!(sel("spec.nodeName=n1"), Ok(true));
        assert_eq!(sel("spec.nodeName==n2"), Ok(false));
        assert_eq!(sel("spec.nodeName!=n2,metadata.namespace=shop"), Ok(true));
        assert_eq!(sel("spec.nodeName=n1,metadata.name!=web-1"), Ok(false));
        assert_eq!(sel("spec.hostNetwork=false"), Ok(true));
        assert_eq!(sel(""), Ok(true));
        assert!(matches!(
            sel("spec.foo=x"),
            Err(SelectorError::UnsupportedField(_))
        ));
        assert!(matches!(
            sel("spec.nodeName"),
            Err(SelectorError::BadField(_))
        ));
    }

    #[test]
    fn label_selectors_equality_and_sets() {
        let sel = |s: &str| LabelSelector::parse(s).map(|l| l.matches(&pod()));
        assert_eq!(sel("app=web"), Ok(true));
        assert_eq!(sel("app==web,tier!=back"), Ok(true));
        assert_eq!(sel("app!=web"), Ok(false));
        assert_eq!(sel("missing!=x"), Ok(true));
        assert_eq!(sel("app in (db, web),tier notin (back)"), Ok(true));
        assert_eq!(sel("app notin (web)"), Ok(false));
        assert_eq!(sel("missing notin (web)"), Ok(true));
        assert_eq!(sel("app,!missing"), Ok(true));
        assert_eq!(sel("!app"), Ok(false));
        assert!(sel("app in (web").is_err());
        assert!(sel("a b=c").is_err());
    }
}
