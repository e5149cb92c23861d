//! Where a state problem is (file, object, field) and what it is: every problem is kept, not only the first.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// Where an object came from: the file and the document in it (`document 3`, `document 1 item 2`).
///
/// A future Kubernetes API source fills `file` with a pseudo path naming the API.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Origin {
    pub file: PathBuf,
    pub document: String,
}

impl Origin {
    pub fn new(file: impl Into<PathBuf>, document: impl Into<String>) -> Self {
        Origin {
            file: file.into(),
            document: document.into(),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.document.as_str() {
            // An API object: its label says which.
            "" => write!(f, "{}", self.file.display()),
            document => write!(f, "{} ({document})", self.file.display()),
        }
    }
}

/// One problem in the state, e.g. `pods.yaml: Pod demo/client: status.podIP: "10.0.0.x" is not an IPv4 address`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}: {object}: {}{reason}", .file.display(), FieldPrefix(.field.as_deref()))]
pub struct StateError {
    pub file: PathBuf,
    /// `Pod demo/client`, `Namespace demo`, or the document (`document 3`) when the object has no name.
    pub object: String,
    /// The field path, e.g. `status.podIP` or `spec.ports[0].port`; `None` for whole-object problems.
    pub field: Option<String>,
    pub reason: String,
}

impl StateError {
    pub fn new(
        file: impl Into<PathBuf>,
        object: impl Into<String>,
        field: Option<String>,
        reason: impl fmt::Display,
    ) -> Self {
        StateError {
            file: file.into(),
            object: object.into(),
            field,
            reason: reason.to_string(),
        }
    }
}

/// Writes `field: ` when there is a field, nothing otherwise.
struct FieldPrefix<'a>(Option<&'a str>);

impl fmt::Display for FieldPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(field) => write!(f, "{field}: "),
            None => Ok(()),
        }
    }
}

/// All problems of one load; displayed one per line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StateErrors(pub Vec<StateError>);

impl StateErrors {
    /// `Ok` when nothing was found, for callers that collect problems first.
    pub fn check(errors: Vec<StateError>) -> Result<(), StateErrors> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(StateErrors(errors))
        }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, StateError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for StateErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StateErrors {}

impl From<Vec<StateError>> for StateErrors {
    fn from(errors: Vec<StateError>) -> Self {
        StateErrors(errors)
    }
}

impl IntoIterator for StateErrors {
    type Item = StateError;
    type IntoIter = std::vec::IntoIter<StateError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a StateErrors {
    type Item = &'a StateError;
    type IntoIter = std::slice::Iter<'a, StateError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_file_object_field_and_reason() {
        let error = StateError::new(
            "pods.yaml",
            "Pod demo/client",
            Some("status.podIP".into()),
            "\"10.0.0.x\" is not an IPv4 address",
        );
        assert_eq!(
            error.to_string(),
            "pods.yaml: Pod demo/client: status.podIP: \"10.0.0.x\" is not an IPv4 address"
        );
    }

    #[test]
    fn displays_without_field() {
        let error = StateError::new("a.yaml", "document 2", None, "bad");
        assert_eq!(error.to_string(), "a.yaml: document 2: bad");
    }

    #[test]
    fn errors_display_one_per_line() {
        let errors = StateErrors(vec![
            StateError::new("a.yaml", "document 1", None, "one"),
            StateError::new("b.yaml", "document 2", None, "two"),
        ]);
        assert_eq!(
            errors.to_string(),
            "a.yaml: document 1: one\nb.yaml: document 2: two"
        );
        assert_eq!(errors.len(), 2);
    }
}
