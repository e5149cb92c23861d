//! A kind's records as its watch reports them: what kube-rs's reflector store does for
//! objects, done for the records read from them, so that no Kubernetes object outlives the
//! event that brought it (a node's agent holds every pod of the cluster).

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use kube::runtime::watcher::Event;

use crate::state::Record;

/// A record, ordered and found by its label (`Pod shop/web-1`): one per object of a kind, and
/// no second copy of the name as a key.
struct ByLabel<M>(Arc<Record<M>>);

impl<M> Borrow<str> for ByLabel<M> {
    fn borrow(&self) -> &str {
        &self.0.label
    }
}

impl<M> PartialEq for ByLabel<M> {
    fn eq(&self, other: &Self) -> bool {
        self.0.label == other.0.label
    }
}

impl<M> Eq for ByLabel<M> {}

impl<M> PartialOrd for ByLabel<M> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<M> Ord for ByLabel<M> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.label.cmp(&other.0.label)
    }
}

/// The records of one kind, by object.
pub struct Store<M> {
    inner: Mutex<Inner<M>>,
}

struct Inner<M> {
    records: BTreeSet<ByLabel<M>>,
    /// While a list (or relist after 410 Gone) is under way: what it has brought so far. It
    /// replaces `records` in one step when the list is done, so that an object present before
    /// and after is never seen missing.
    listing: Option<BTreeSet<ByLabel<M>>>,
}

impl<M> Default for Store<M> {
    fn default() -> Self {
        Store {
            inner: Mutex::new(Inner {
                records: BTreeSet::new(),
                listing: None,
            }),
        }
    }
}

impl<M> Store<M> {
    fn lock(&self) -> MutexGuard<'_, Inner<M>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a watch event, reading each object it brings with `read` (a deleted one too:
    /// its record's label is what finds it).
    pub fn apply<K>(&self, event: Event<K>, read: impl Fn(K) -> Record<M>) {
        let read = |object| ByLabel(Arc::new(read(object)));
        let mut inner = self.lock();
        match event {
            Event::Init => inner.listing = Some(BTreeSet::new()),
            Event::InitApply(object) => {
                inner.listing.get_or_insert_default().replace(read(object));
            }
            Event::InitDone => {
                if let Some(listed) = inner.listing.take() {
                    inner.records = listed;
                }
            }
            Event::Apply(object) => {
                inner.records.replace(read(object));
            }
            Event::Delete(object) => {
                let gone = read(object);
                inner.records.remove::<str>(&gone.0.label);
            }
        }
    }

    /// How many objects it holds.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Every record, ordered by label.
    pub fn records(&self) -> Vec<Arc<Record<M>>> {
        self.lock().records.iter().map(|r| r.0.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn namespace(name: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    fn read(object: Namespace) -> Record<crate::state::Namespace> {
        crate::state::record::namespace(crate::state::Origin::new("kubernetes", ""), &object)
    }

    fn names(store: &Store<crate::state::Namespace>) -> Vec<String> {
        store.records().iter().map(|r| r.label.clone()).collect()
    }

    #[test]
    fn a_relist_replaces_the_contents_in_one_step() {
        let store = Store::default();
        store.apply(Event::Init, read);
        store.apply(Event::InitApply(namespace("a")), read);
        store.apply(Event::InitApply(namespace("b")), read);
        assert!(names(&store).is_empty(), "nothing until the list is done");
        store.apply(Event::InitDone, read);
        assert_eq!(names(&store), ["Namespace a", "Namespace b"]);

        // A relist: the old contents serve until it is done; then what it did not bring is gone.
        store.apply(Event::Init, read);
        store.apply(Event::InitApply(namespace("b")), read);
        assert_eq!(names(&store), ["Namespace a", "Namespace b"]);
        store.apply(Event::InitDone, read);
        assert_eq!(names(&store), ["Namespace b"]);

        store.apply(Event::Apply(namespace("c")), read);
        store.apply(Event::Delete(namespace("b")), read);
        assert_eq!(names(&store), ["Namespace c"]);
        assert_eq!(store.len(), 1);
    }
}
