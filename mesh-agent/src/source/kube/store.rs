//! A kind's records as its watch reports them: what kube-rs's reflector store does for
//! objects, done for the records read from them, so that no Kubernetes object outlives the
//! event that brought it (a node's agent holds every pod of the cluster).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kube::runtime::watcher::Event;

use crate::state::Record;

/// `(namespace, name)` of an object.
type Key = (Option<String>, String);

/// The records of one kind, by object.
pub struct Store<M> {
    inner: Mutex<Inner<M>>,
}

struct Inner<M> {
    records: BTreeMap<Key, Arc<Record<M>>>,
    /// While a list (or relist after 410 Gone) is under way: what it has brought so far. It
    /// replaces `records` in one step when the list is done, so that an object present before
    /// and after is never seen missing.
    listing: Option<BTreeMap<Key, Arc<Record<M>>>>,
}

impl<M> Default for Store<M> {
    fn default() -> Self {
        Store {
            inner: Mutex::new(Inner {
                records: BTreeMap::new(),
                listing: None,
            }),
        }
    }
}

impl<M> Store<M> {
    fn lock(&self) -> MutexGuard<'_, Inner<M>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a watch event, reading each object it brings with `read`.
    pub fn apply<K: kube::Resource>(&self, event: Event<K>, read: impl Fn(K) -> Record<M>) {
        let key = |object: &K| {
            let meta = object.meta();
            (
                meta.namespace.clone(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        let mut inner = self.lock();
        match event {
            Event::Init => inner.listing = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                let key = key(&object);
                let record = Arc::new(read(object));
                inner.listing.get_or_insert_default().insert(key, record);
            }
            Event::InitDone => {
                if let Some(listed) = inner.listing.take() {
                    inner.records = listed;
                }
            }
            Event::Apply(object) => {
                let key = key(&object);
                let record = Arc::new(read(object));
                inner.records.insert(key, record);
            }
            Event::Delete(object) => {
                inner.records.remove(&key(&object));
            }
        }
    }

    /// How many objects it holds.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Every record, ordered by (namespace, name).
    pub fn records(&self) -> Vec<Arc<Record<M>>> {
        self.lock().records.values().cloned().collect()
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
