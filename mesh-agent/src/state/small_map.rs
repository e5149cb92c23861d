//! Small string-keyed maps as the model keeps them (labels, selectors, named ports): one
//! sorted boxed slice each. A cluster's objects hold a handful of entries apiece, and a node's
//! agent holds every object of the cluster; a `BTreeMap` allocates room for eleven entries.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Serialize, Serializer, ser::SerializeMap};

/// A map from strings to `V`, sorted by key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SmallMap<V> {
    entries: Box<[(Box<str>, V)]>,
}

/// Kubernetes labels (or a selector's `matchLabels`).
pub type Labels = SmallMap<Box<str>>;

impl<V> Default for SmallMap<V> {
    fn default() -> Self {
        SmallMap {
            entries: Box::default(),
        }
    }
}

impl<V> SmallMap<V> {
    pub fn get(&self, key: &str) -> Option<&V> {
        self.entries
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &V)> {
        self.entries.iter().map(|(k, v)| (&**k, v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Labels {
    /// The value of `key` as a `&str`.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(|value| &**value)
    }
}

impl<K: Into<Box<str>>, V, const N: usize> From<[(K, V); N]> for SmallMap<V> {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

/// Later entries of a key replace earlier ones, as they do in a `BTreeMap`.
impl<K: Into<Box<str>>, V> FromIterator<(K, V)> for SmallMap<V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        let mut entries: Vec<(Box<str>, V)> =
            entries.into_iter().map(|(k, v)| (k.into(), v)).collect();
        // Stable: equal keys stay in their order, and the last of each run is kept.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept: Vec<(Box<str>, V)> = Vec::with_capacity(entries.len());
        for entry in entries {
            match kept.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => kept.push(entry),
            }
        }
        SmallMap {
            entries: kept.into_boxed_slice(),
        }
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        map.into_iter()
            .map(|(k, v)| (k, v.into_boxed_str()))
            .collect()
    }
}

impl<V: fmt::Debug> fmt::Debug for SmallMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V: Serialize> Serialize for SmallMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (key, value) in self.iter() {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_sorted_entries_and_the_last_of_a_key_wins() {
        let map: SmallMap<u16> = [("b", 2), ("a", 1), ("c", 3), ("a", 9)]
            .into_iter()
            .collect();
        assert_eq!(map.get("a"), Some(&9));
        assert_eq!(map.get("c"), Some(&3));
        assert_eq!(map.get("d"), None);
        assert_eq!(
            map.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(
            serde_json::to_string(&map).expect("serializes"),
            r#"{"a":9,"b":2,"c":3}"#
        );
    }
}
