//! Local Kubernetes YAML as the state source: what `kubectl get -o yaml` prints, in one file or
//! the `.yaml`/`.yml`/`.json` files of a directory (not recursive), read from disk ([`load`]),
//! parsed into the objects the model is built from ([`document`]), and polled ([`Watcher`]).

pub mod bounds;
pub mod document;
mod watch;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use self::document::Format;
use crate::state::{Snapshot, StateError, StateErrors};

pub use self::watch::{POLL_INTERVAL, Watcher, watch};

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// The text of one state file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

/// The path or a file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read the state path: {0}")]
    Path(io::Error),
    #[error("cannot list the state directory: {0}")]
    List(io::Error),
    #[error("cannot read: {0}")]
    Read(io::Error),
    #[error(transparent)]
    Bounds(#[from] bounds::BoundsError),
}

impl SourceError {
    fn at(self, file: &Path) -> StateError {
        let object = match self {
            SourceError::Path(_) | SourceError::List(_) => "state path",
            SourceError::Read(_) | SourceError::Bounds(_) => "file",
        };
        StateError::new(file, object, None, self)
    }
}

/// Reads and checks the state at `path`; fails with every problem found.
pub fn load(path: &Path) -> Result<Snapshot, StateErrors> {
    let (files, errors) = read(path);
    StateErrors::check(errors)?;
    parse(files)
}

/// The state files at `path`: the path itself when it is a file (whatever its name), else the
/// directory's state files, sorted. Hidden files (editor swap and lock files) are left out.
pub fn list_files(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let metadata = fs::metadata(path).map_err(SourceError::Path)?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(SourceError::List)? {
        let entry = entry.map_err(SourceError::List)?;
        let file = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_state = !name.starts_with('.')
            && file
                .extension()
                .and_then(|ext| ext.to_str())
                .is_some_and(|ext| {
                    EXTENSIONS
                        .iter()
                        .any(|known| ext.eq_ignore_ascii_case(known))
                });
        // `metadata` follows symlinks, as in ConfigMap volumes; dangling links are skipped.
        if is_state && fs::metadata(&file).is_ok_and(|meta| meta.is_file()) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every state file at `path`, with a problem for each one that cannot be read.
pub fn read(path: &Path) -> (Vec<SourceFile>, Vec<StateError>) {
    let paths = match list_files(path) {
        Ok(paths) => paths,
        Err(error) => return (Vec::new(), vec![error.at(path)]),
    };
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match read_bounded(&path) {
            Ok(text) => files.push(SourceFile { path, text }),
            Err(error) => errors.push(error.at(&path)),
        }
    }
    (files, errors)
}

/// The text of one state file, refused unread when it is over [`bounds::MAX_FILE_BYTES`]
/// (and unread beyond that if it grows while being read).
fn read_bounded(path: &Path) -> Result<String, SourceError> {
    use std::io::Read as _;
    let file = fs::File::open(path).map_err(SourceError::Read)?;
    let size = file.metadata().map_err(SourceError::Read)?.len();
    if size > bounds::MAX_FILE_BYTES {
        return Err(bounds::BoundsError::TooLarge { size }.into());
    }
    let mut text = String::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(bounds::MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(SourceError::Read)?;
    if text.len() as u64 > bounds::MAX_FILE_BYTES {
        let size = text.len() as u64;
        return Err(bounds::BoundsError::TooLarge { size }.into());
    }
    Ok(text)
}

/// Parses and checks files already read.
pub fn parse(files: Vec<SourceFile>) -> Result<Snapshot, StateErrors> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    let mut paths = Vec::new();
    for file in files {
        let parsed = document::parse(&file.path, &file.text, Format::of(&file.path));
        objects.extend(parsed.objects);
        errors.extend(parsed.errors);
        paths.push(file.path);
    }
    // Object problems first: later checks would only repeat them.
    StateErrors::check(errors)?;
    Snapshot::build(objects, paths)
}

/// For tests anywhere in the crate.
#[cfg(test)]
pub(crate) mod testing {
    use crate::state::{Snapshot, StateErrors};

    /// The snapshot of one state file with this text, loaded the way the agent loads its state.
    pub fn load_text(text: &str) -> Result<Snapshot, StateErrors> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = dir.path().join("test.yaml");
        std::fs::write(&file, text).expect("writable");
        super::load(&file)
    }

    /// The snapshot of this state text with each bad object rejected alone
    /// ([`Snapshot::assemble`]), and the problems; the text must parse.
    pub fn assemble_text(text: &str) -> (Snapshot, Vec<crate::state::StateError>) {
        let file = std::path::Path::new("test.yaml");
        let parsed = super::document::parse(file, text, super::Format::Yaml);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        Snapshot::assemble(parsed.objects, vec![file.into()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    mesh-agent.dev/mode: ambient\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: demo\n  uid: 4c1f\nspec:\n  nodeName: node-a\n  serviceAccountName: client\nstatus:\n  phase: Running\n  podIP: 10.0.0.5\n";

    /// What `kubectl get ns,pods,svc -n demo -o yaml` prints, trimmed a little.
    const KUBECTL: &str = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    creationTimestamp: "2025-05-01T10:00:00Z"
    labels:
      istio.io/dataplane-mode: ambient
      kubernetes.io/metadata.name: demo
    name: demo
    resourceVersion: "512"
    uid: 0d5e9a77-3d55-4a55-9a7e-000000000001
  spec:
    finalizers:
    - kubernetes
  status:
    phase: Active
- apiVersion: v1
  kind: Pod
  metadata:
    annotations:
      kubectl.kubernetes.io/restartedAt: "2025-05-01T10:01:00Z"
    creationTimestamp: "2025-05-01T10:01:02Z"
    generateName: client-5d8f7c9b4-
    labels:
      app: client
      pod-template-hash: 5d8f7c9b4
    name: client-5d8f7c9b4-x2x7q
    namespace: demo
    ownerReferences:
    - apiVersion: apps/v1
      blockOwnerDeletion: true
      controller: true
      kind: ReplicaSet
      name: client-5d8f7c9b4
      uid: 7f1e2b3c-0000-4000-8000-000000000002
    resourceVersion: "733"
    uid: 3b2a1c0d-0000-4000-8000-000000000003
  spec:
    containers:
    - image: curlimages/curl:8.7.1
      imagePullPolicy: IfNotPresent
      name: curl
      ports:
      - containerPort: 8080
        name: http
        protocol: TCP
      resources:
        limits:
          memory: 64Mi
        requests:
          cpu: 10m
      terminationMessagePath: /dev/termination-log
      terminationMessagePolicy: File
      volumeMounts:
      - mountPath: /var/run/secrets/kubernetes.io/serviceaccount
        name: kube-api-access-abcde
        readOnly: true
    dnsPolicy: ClusterFirst
    enableServiceLinks: true
    nodeName: worker-1
    preemptionPolicy: PreemptLowerPriority
    priority: 0
    restartPolicy: Always
    schedulerName: default-scheduler
    securityContext: {}
    serviceAccount: client
    serviceAccountName: client
    terminationGracePeriodSeconds: 30
    tolerations:
    - effect: NoExecute
      key: node.kubernetes.io/not-ready
      operator: Exists
      tolerationSeconds: 300
    volumes:
    - name: kube-api-access-abcde
      projected:
        defaultMode: 420
        sources:
        - serviceAccountToken:
            expirationSeconds: 3607
            path: token
  status:
    conditions:
    - lastProbeTime: null
      lastTransitionTime: "2025-05-01T10:01:04Z"
      status: "True"
      type: Ready
    containerStatuses:
    - containerID: containerd://4f5e
      image: docker.io/curlimages/curl:8.7.1
      imageID: docker.io/curlimages/curl@sha256:0000
      lastState: {}
      name: curl
      ready: true
      restartCount: 0
      started: true
      state:
        running:
          startedAt: "2025-05-01T10:01:03Z"
    hostIP: 172.18.0.3
    hostIPs:
    - ip: 172.18.0.3
    phase: Running
    podIP: 10.244.1.7
    podIPs:
    - ip: 10.244.1.7
    qosClass: Burstable
    startTime: "2025-05-01T10:01:02Z"
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2025-05-01T10:01:00Z"
    name: client
    namespace: demo
    resourceVersion: "700"
    uid: 9a8b7c6d-0000-4000-8000-000000000004
  spec:
    clusterIP: 10.96.12.34
    clusterIPs:
    - 10.96.12.34
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      port: 80
      protocol: TCP
      targetPort: http
    selector:
      app: client
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
kind: List
metadata:
  resourceVersion: ""
"#;

    #[test]
    fn loads_what_kubectl_prints() {
        let dir = tempfile::tempdir().expect("must succeed");
        let file = dir.path().join("demo.yaml");
        fs::write(&file, KUBECTL).expect("must succeed");
        let snapshot = load(&file).expect("must succeed");
        let client = snapshot
            .workload("demo", "client-5d8f7c9b4-x2x7q")
            .expect("must succeed");
        assert_eq!(client.uid, "3b2a1c0d-0000-4000-8000-000000000003");
        assert_eq!(client.node, "worker-1");
        assert_eq!(client.service_account, "client");
        assert_eq!(client.ip, std::net::Ipv4Addr::new(10, 244, 1, 7));
        assert_eq!(
            client.enrollment.reason(),
            "namespace label istio.io/dataplane-mode=ambient"
        );
        let service = snapshot.service("demo", "client").expect("must succeed");
        assert_eq!(snapshot.endpoints(service).count(), 1);
    }

    #[test]
    fn loads_a_directory_of_yaml_and_json() {
        let dir = tempfile::tempdir().expect("must succeed");
        fs::write(dir.path().join("namespaces.yaml"), NAMESPACE).expect("must succeed");
        fs::write(dir.path().join("pods.yml"), POD).expect("must succeed");
        let service = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"demo"},"spec":{"clusterIP":"10.96.0.1","ports":[{"port":80}]}}"#;
        fs::write(dir.path().join("services.json"), service).expect("must succeed");
        fs::write(dir.path().join("notes.txt"), "not: [state").expect("must succeed");
        fs::write(dir.path().join(".pods.yaml.swp"), "garbage: [").expect("must succeed");
        fs::create_dir(dir.path().join("sub.yaml")).expect("must succeed");

        let snapshot = load(dir.path()).expect("must succeed");
        assert_eq!(snapshot.files.len(), 3);
        assert_eq!(snapshot.namespaces.len(), 1);
        assert_eq!(snapshot.services.len(), 1);
        let client = snapshot.workload("demo", "client").expect("must succeed");
        assert_eq!(client.uid, "4c1f");
        assert_eq!(client.service_account, "client");
        assert!(client.is_enrolled());
        assert_eq!(
            client.enrollment.reason(),
            "namespace label mesh-agent.dev/mode=ambient"
        );
    }

    #[test]
    fn loads_a_single_file_with_a_list() {
        let dir = tempfile::tempdir().expect("must succeed");
        let indent = |text: &str| text.replace('\n', "\n    ");
        let list = format!(
            "apiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: \"\"\nitems:\n  - {}\n  - {}\n",
            indent(NAMESPACE),
            indent(POD)
        );
        let file = dir.path().join("state");
        fs::write(&file, list).expect("must succeed");
        let snapshot = load(&file).expect("must succeed");
        assert_eq!(snapshot.files, [file]);
        assert_eq!(snapshot.workloads.len(), 1);
    }

    #[test]
    fn reports_errors_of_every_file() {
        let dir = tempfile::tempdir().expect("must succeed");
        fs::write(dir.path().join("a.yaml"), "apiVersion: v1\nkind: [\n").expect("must succeed");
        fs::write(dir.path().join("b.yaml"), "apiVersion: v1\nmetadata: {}\n")
            .expect("must succeed");
        let errors = load(dir.path()).expect_err("must fail");
        assert_eq!(errors.len(), 2, "{errors}");
        assert!(errors.0[0].file.ends_with("a.yaml"));
        assert!(errors.0[0].reason.contains("line 3"), "{errors}");
        assert_eq!(errors.0[1].field.as_deref(), Some("kind"));
    }

    #[test]
    fn reports_a_missing_path() {
        let dir = tempfile::tempdir().expect("must succeed");
        let missing = dir.path().join("nope");
        let errors = load(&missing).expect_err("must fail");
        assert_eq!(errors.len(), 1);
        assert!(
            errors.to_string().contains("cannot read the state path"),
            "{errors}"
        );
    }

    #[test]
    fn an_empty_directory_is_an_empty_state() {
        let dir = tempfile::tempdir().expect("must succeed");
        assert_eq!(load(dir.path()).expect("must succeed"), Snapshot::default());
    }

    #[test]
    fn never_panics_on_truncated_or_garbled_input() {
        let text = format!("{NAMESPACE}---\n{POD}");
        let bytes = text.as_bytes();
        for end in 0..=bytes.len() {
            let Ok(prefix) = std::str::from_utf8(&bytes[..end]) else {
                continue;
            };
            for format in [Format::Yaml, Format::Json] {
                let parsed = document::parse(Path::new("t"), prefix, format);
                let _ = Snapshot::build(parsed.objects, Vec::new());
            }
            let garbled = prefix.replace(':', "- ").replace("10.0", "[1");
            let parsed = document::parse(Path::new("t"), &garbled, Format::Yaml);
            let _ = Snapshot::build(parsed.objects, Vec::new());
        }
        for nasty in [
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            "a: &a [*a, *a]",
            "!!binary x",
            "\u{0}",
            "---\n...\n---",
        ] {
            let _ = document::parse(Path::new("t"), nasty, Format::Yaml);
            let _ = document::parse(Path::new("t"), nasty, Format::Json);
        }
    }
}
