//! Fuzzes L4 authorization and the mTLS mode: fuzzer-chosen AuthorizationPolicy and
//! PeerAuthentication YAML over a small fixed cluster, and a fuzzer-chosen connection, decided
//! for every workload, never a panic and never an answer that contradicts the policies applied.
//!
//! Input: a 9-byte header (see [`Connection::read`]), then text whose first line is the peer's
//! identity and whose other lines are YAML documents added to the fixed state.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mesh_agent::policy::{self, DEFAULT_ROOT_NAMESPACE, MtlsMode};
use mesh_agent::source::local::document::{self, Format};
use mesh_agent::state::{Action, Object, Snapshot, Sourced};

/// The cluster every input starts from: the root namespace, two application namespaces (one
/// enrolled by label), `default` for objects that name no namespace, and a pod in each.
const STATE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: batch}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, labels: {app: cart, tier: web}}
spec:
  nodeName: node-a
  serviceAccountName: cart
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.1.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: job, namespace: batch, labels: {app: cart, mesh-agent.dev/mode: ambient}}
spec: {nodeName: node-a, serviceAccountName: runner}
status: {podIP: 10.0.2.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {nodeName: node-b}
status: {podIP: 10.0.3.1, phase: Running}
";

/// Source addresses worth more than a random one: the fixed pods' and one outside the mesh.
const SOURCES: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 0, 1, 1),
    Ipv4Addr::new(10, 0, 2, 1),
    Ipv4Addr::new(10, 0, 3, 1),
    Ipv4Addr::new(192, 168, 0, 7),
];

/// Root namespaces to try; the last slot takes the identity line's namespace instead.
const ROOTS: [&str; 3] = [DEFAULT_ROOT_NAMESPACE, "shop", ""];

static FIXED: LazyLock<Vec<Sourced<Object>>> = LazyLock::new(|| {
    let parsed = document::parse(Path::new("fixed.yaml"), STATE, Format::Yaml);
    assert!(parsed.errors.is_empty(), "fixed state: {:?}", parsed.errors);
    let (snapshot, errors) = Snapshot::assemble(parsed.objects.clone(), Vec::new());
    assert!(errors.is_empty(), "fixed state: {errors:?}");
    assert_eq!(snapshot.workloads.len(), 3, "fixed state");
    parsed.objects
});

/// What the header says about the connection.
struct Connection {
    source: Ipv4Addr,
    /// Whether the peer presents the identity on the first text line (mTLS) or none.
    mtls: bool,
    root: Option<&'static str>,
    port: u16,
}

impl Connection {
    const HEADER: usize = 9;

    /// `[source, a, b, c, d, peer, root, port_hi, port_lo]`: `source` picks one of [`SOURCES`]
    /// or, past them, the address `a.b.c.d`; an odd `peer` means mTLS; `root` picks one of
    /// [`ROOTS`] or, past them, the identity's namespace.
    fn read(data: &[u8]) -> Option<(Connection, &[u8])> {
        let (header, rest) = data.split_at_checked(Self::HEADER)?;
        let [source, a, b, c, d, peer, root, hi, lo] = header.try_into().ok()?;
        let source = SOURCES
            .get(usize::from(source) % (SOURCES.len() + 1))
            .copied()
            .unwrap_or(Ipv4Addr::new(a, b, c, d));
        let root = ROOTS.get(usize::from(root) % (ROOTS.len() + 1)).copied();
        let connection = Connection {
            source,
            mtls: peer % 2 == 1,
            root,
            port: u16::from_be_bytes([hi, lo]),
        };
        Some((connection, rest))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((connection, rest)) = Connection::read(data) else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let (identity, documents) = text.split_once('\n').unwrap_or((&text, ""));
    let parsed = document::parse(Path::new("fuzz.yaml"), documents, Format::Yaml);
    let mut objects = FIXED.clone();
    objects.extend(parsed.objects);
    // Each bad object rejected alone, as the Kubernetes source takes them: a policy that cannot
    // be understood stays, as a DENY of everything it selects.
    let (snapshot, _errors) = Snapshot::assemble(objects, vec![PathBuf::from("fuzz.yaml")]);
    let identity = connection.mtls.then_some(identity);
    let root = connection.root.unwrap_or_else(|| {
        let principal = identity.unwrap_or_default();
        let principal = principal.strip_prefix("spiffe://").unwrap_or(principal);
        policy::namespace_of_principal(principal).unwrap_or_default()
    });
    for destination in &snapshot.workloads {
        let address = SocketAddr::new(IpAddr::V4(destination.ip), connection.port);
        let attributes =
            mesh_agent::proxy::connection_attributes(connection.source.into(), identity, address);
        let decision = policy::authorize(&snapshot, root, destination, &attributes);
        let mode = policy::mtls_mode(&snapshot, root, destination, connection.port);
        assert_ne!(mode, MtlsMode::Unset, "mtls_mode resolved to UNSET");

        let applied = policy::policies_for(&snapshot, root, destination);
        let enforced = applied
            .iter()
            .filter(|p| p.action != Action::Audit && !p.dry_run)
            .count();
        if enforced == 0 {
            assert!(
                decision.allowed,
                "denied with no enforced policy: {decision:?}"
            );
        }
        assert_eq!(
            decision.rule.is_some(),
            decision.policy.is_some(),
            "{decision:?}"
        );
        if let Some(key) = &decision.policy {
            let found = applied
                .iter()
                .any(|p| !p.dry_run && &format!("{}/{}", p.namespace, p.name) == key);
            assert!(found, "decided by {key}, which does not apply: {applied:?}");
        }
        let dry_runs = applied
            .iter()
            .filter(|p| p.action != Action::Audit && p.dry_run)
            .count();
        // One note per dry-run policy, then the decision with them enforced.
        let notes = if dry_runs == 0 { 0 } else { dry_runs + 1 };
        assert_eq!(decision.dry_run.len(), notes, "{decision:?}");
        // The admin API serves decisions as JSON.
        let _ = serde_json::to_string(&decision).expect("a decision serializes");
    }
});
