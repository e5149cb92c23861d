//! The test API server's objects: kinds it serves, one global resourceVersion, the history of
//! changes a watch replays, and list snapshots for `continue` paging.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// A resource type the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// A custom resource (Istio's, the Gateway API's): served only while "installed".
    pub custom: bool,
    /// Field selectors beyond `metadata.name` / `metadata.namespace`.
    pub fields: &'static [&'static str],
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// One storage for every version of a group's resource.
    fn storage(&self) -> (&'static str, &'static str) {
        (self.group, self.plural)
    }
}

const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

const fn kind(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    fields: &'static [&'static str],
) -> Kind {
    let custom = matches!(
        group.as_bytes(),
        b"security.istio.io" | b"gateway.networking.k8s.io"
    );
    Kind {
        group,
        version,
        plural,
        kind,
        namespaced,
        custom,
        fields,
    }
}

pub const KINDS: &[Kind] = &[
    kind(
        "",
        "v1",
        "namespaces",
        "Namespace",
        false,
        &["status.phase"],
    ),
    kind("", "v1", "pods", "Pod", true, POD_FIELDS),
    kind(
        "",
        "v1",
        "services",
        "Service",
        true,
        &["spec.clusterIP", "spec.type"],
    ),
    kind(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
        &[],
    ),
    // The agent asks for its own DaemonSet when it stops (removal or rollout?).
    kind("apps", "v1", "daemonsets", "DaemonSet", true, &[]),
    kind(
        "security.istio.io",
        "v1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        true,
        &[],
    ),
    kind(
        "security.istio.io",
        "v1",
        "peerauthentications",
        "PeerAuthentication",
        true,
        &[],
    ),
    kind(
        "security.istio.io",
        "v1beta1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        true,
        &[],
    ),
    kind(
        "security.istio.io",
        "v1beta1",
        "peerauthentications",
        "PeerAuthentication",
        true,
        &[],
    ),
    kind(
        "security.istio.io",
        "v1",
        "requestauthentications",
        "RequestAuthentication",
        true,
        &[],
    ),
    kind(
        "security.istio.io",
        "v1beta1",
        "requestauthentications",
        "RequestAuthentication",
        true,
        &[],
    ),
    kind(
        "gateway.networking.k8s.io",
        "v1",
        "gateways",
        "Gateway",
        true,
        &[],
    ),
    kind(
        "gateway.networking.k8s.io",
        "v1beta1",
        "gateways",
        "Gateway",
        true,
        &[],
    ),
    kind(
        "gateway.networking.k8s.io",
        "v1",
        "httproutes",
        "HTTPRoute",
        true,
        &[],
    ),
    kind(
        "gateway.networking.k8s.io",
        "v1beta1",
        "httproutes",
        "HTTPRoute",
        true,
        &[],
    ),
    kind(
        "gateway.networking.k8s.io",
        "v1",
        "grpcroutes",
        "GRPCRoute",
        true,
        &[],
    ),
];

pub fn kind_by_path(group: &str, version: &str, plural: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
}

/// The kind named by an object's `apiVersion` and `kind`, or by a kind name alone.
pub fn kind_of(api_version: Option<&str>, kind: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| {
        (k.kind == kind || k.plural == kind) && api_version.is_none_or(|v| v == k.api_version())
    })
}

/// Why an object was not stored or removed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown kind {api_version}/{kind}")]
    UnknownKind { api_version: String, kind: String },
    #[error("object has no metadata.name")]
    NoName,
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        kind: String,
        namespace: String,
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    storage: (&'static str, &'static str),
    namespace: String,
    name: String,
}

/// One change: `old` is the object before it (for a deletion: its last state with the deletion's
/// resourceVersion), `new` the object after it (`None` for a deletion).
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    storage: (&'static str, &'static str),
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// Why a watch or a continued list cannot be served from the kept history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// The kept history covers every change after this resourceVersion.
    floor: u64,
    window: usize,
    snapshots: HashMap<String, Vec<Value>>,
    next_token: u64,
    next_uid: u64,
    pub istio_installed: bool,
}

const MAX_SNAPSHOTS: usize = 256;

impl Store {
    pub fn new(window: usize, istio_installed: bool) -> Self {
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor: 1,
            window: window.max(1),
            snapshots: HashMap::new(),
            next_token: 0,
            next_uid: 0,
            istio_installed,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Creates or replaces an object; returns it as stored.
    pub fn apply(&mut self, mut object: Value) -> Result<Value, StoreError> {
        let api_version = object.get("apiVersion").and_then(Value::as_str);
        let kind_name = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = kind_of(api_version, kind_name).ok_or_else(|| StoreError::UnknownKind {
            api_version: api_version.unwrap_or_default().to_string(),
            kind: kind_name.to_string(),
        })?;
        if !object.get("metadata").is_some_and(Value::is_object) {
            object["metadata"] = json!({});
        }
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or(StoreError::NoName)?
            .to_string();
        let namespace = if kind.namespaced {
            let ns = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_string();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            if let Some(meta) = object["metadata"].as_object_mut() {
                meta.remove("namespace");
            }
            String::new()
        };
        let key = Key {
            storage: kind.storage(),
            namespace,
            name,
        };
        let old = self.objects.get(&key).cloned();
        for field in ["uid", "creationTimestamp"] {
            let kept = old.as_ref().and_then(|o| o["metadata"].get(field)).cloned();
            if let Some(value) = kept {
                object["metadata"][field] = value;
            } else if object["metadata"].get(field).is_none_or(Value::is_null) {
                object["metadata"][field] = json!(match field {
                    "uid" => self.uid(),
                    _ => now_rfc3339(),
                });
            }
        }
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(key.clone(), object.clone());
        self.record(Change {
            rv: self.rv,
            storage: key.storage,
            old,
            new: Some(object.clone()),
        });
        Ok(object)
    }

    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> Result<Value, StoreError> {
        let not_found = || StoreError::NotFound {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let k = kind_of(None, kind).ok_or_else(not_found)?;
        let namespace = if k.namespaced { namespace } else { "" };
        let key = Key {
            storage: k.storage(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let mut last = self.objects.remove(&key).ok_or_else(not_found)?;
        self.rv += 1;
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(Change {
            rv: self.rv,
            storage: key.storage,
            old: Some(last.clone()),
            new: None,
        });
        Ok(last)
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > self.window {
            if let Some(gone) = self.history.pop_front() {
                self.floor = gone.rv;
            }
        }
    }

    /// Forgets every change and list snapshot: older resourceVersions and continue tokens expire.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
        self.snapshots.clear();
    }

    /// The current objects of `kind` (in `namespace` if given), in key order.
    pub fn objects(&self, kind: &Kind, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(key, _)| key.storage == kind.storage())
            .filter(|(key, _)| namespace.is_none_or(|ns| key.namespace == ns))
            .map(|(_, object)| object.clone())
            .collect()
    }

    pub fn get(&self, kind: &Kind, namespace: &str, name: &str) -> Option<Value> {
        let namespace = if kind.namespaced { namespace } else { "" };
        let key = Key {
            storage: kind.storage(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.objects.get(&key).cloned()
    }

    /// The changes to `kind` after `since`, or why they are no longer known.
    pub fn changes_since(&self, kind: &Kind, since: u64) -> Result<Vec<Change>, Expired> {
        if since < self.floor {
            return Err(Expired {
                requested: since,
                oldest: self.floor,
            });
        }
        Ok(self
            .history
            .iter()
            .filter(|c| c.rv > since && c.storage == kind.storage())
            .cloned()
            .collect())
    }

    /// Keeps the rest of a paged list; returns its continue token.
    pub fn save_snapshot(&mut self, rest: Vec<Value>, list_rv: u64) -> String {
        if self.snapshots.len() >= MAX_SNAPSHOTS {
            self.snapshots.clear();
        }
        self.next_token += 1;
        let token = format!("{list_rv}.{}", self.next_token);
        self.snapshots.insert(token.clone(), rest);
        token
    }

    /// The rest of a paged list and its resourceVersion, removed from the kept snapshots.
    pub fn take_snapshot(&mut self, token: &str) -> Option<(Vec<Value>, u64)> {
        let rv = token.split_once('.')?.0.parse().ok()?;
        self.snapshots.remove(token).map(|rest| (rest, rv))
    }

    fn uid(&mut self) -> String {
        self.next_uid += 1;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (nanos >> 32) as u32,
            (nanos >> 16) as u16,
            nanos as u16 & 0xfff,
            self.next_uid as u16 & 0xfff,
            self.next_uid & 0xffff_ffff_ffff
        )
    }
}

/// `2026-07-22T10:11:12Z`, as metadata timestamps are written.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"}})
    }

    #[test]
    fn every_change_bumps_one_resource_version_and_history_expires() {
        let mut store = Store::new(2, false);
        let a = store.apply(pod("a")).expect("apply");
        assert_eq!(a["metadata"]["resourceVersion"], "2");
        let uid = a["metadata"]["uid"].clone();
        let a2 = store.apply(pod("a")).expect("apply");
        assert_eq!(a2["metadata"]["resourceVersion"], "3");
        assert_eq!(a2["metadata"]["uid"], uid);
        let pods = kind_of(Some("v1"), "Pod").expect("kind");
        assert_eq!(store.changes_since(pods, 1).map(|c| c.len()), Ok(2));
        store.delete("Pod", "shop", "a").expect("delete");
        assert_eq!(
            store.changes_since(pods, 1).map(|c| c.len()),
            Err(Expired {
                requested: 1,
                oldest: 2
            })
        );
        assert_eq!(store.changes_since(pods, 2).map(|c| c.len()), Ok(2));
        store.compact();
        assert!(store.changes_since(pods, 3).is_err());
        assert!(store.changes_since(pods, 4).is_ok());
        assert!(now_rfc3339().ends_with('Z'));
    }
}
