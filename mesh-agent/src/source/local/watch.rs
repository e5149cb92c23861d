//! Keeps the state current: polls the state path, publishes each good snapshot, keeps the last good one on errors.
//!
//! Polling (every 250 ms) instead of inotify: it sees edits, new and deleted files, rename-over
//! (editors, `kubectl`-like tools) and ConfigMap symlink swaps alike, with no extra crate.
//! A change is read once the files have looked the same for one more tick, so a file caught
//! half-written is not reported as broken.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::source::StateStatus;
use crate::source::local::{self, SourceFile};
use crate::state::{Snapshot, StateError, StateErrors};

/// How often the state path is looked at; a change is published within about two intervals.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Every this many polls the contents are compared even when no file looks changed, for
/// edits that keep size and modification time (coarse timestamps).
const RECHECK_POLLS: u32 = 20;

/// Loads the state at `path` once and returns a watcher for it; see [`Watcher`].
pub fn watch(path: PathBuf) -> Result<Watcher, StateErrors> {
    Watcher::new(path)
}

/// Watches the state path. Take the receivers, then `run` (or `spawn`) it:
///
/// ```no_run
/// # async fn example() -> Result<(), mesh_agent::state::StateErrors> {
/// let watcher = mesh_agent::source::local::watch("/etc/mesh-agent/state".into())?;
/// let snapshots = watcher.snapshot();
/// let status = watcher.status();
/// watcher.spawn();
/// # Ok(()) }
/// ```
pub struct Watcher {
    poller: Poller,
    interval: Duration,
    snapshot: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<StateStatus>,
}

impl Watcher {
    /// Loads the state; fails with every problem when the first load is bad.
    pub fn new(path: PathBuf) -> Result<Self, StateErrors> {
        let (poller, snapshot) = Poller::start(path.clone())?;
        let status = StateStatus {
            path,
            generation: 1,
            last_loaded: Some(SystemTime::now()),
            last_error: None,
            errors: Vec::new(),
            last_failed: None,
        };
        Ok(Watcher {
            poller,
            interval: POLL_INTERVAL,
            snapshot: watch::Sender::new(Arc::new(snapshot)),
            status: watch::Sender::new(status),
        })
    }

    /// Polls at another interval (tests, or very large states).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// The last good snapshot, updated on each good change.
    pub fn snapshot(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    pub fn status(&self) -> watch::Receiver<StateStatus> {
        self.status.subscribe()
    }

    /// Runs `run` on the current tokio runtime.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }

    /// Polls until every receiver is gone. File access runs on the blocking pool.
    pub async fn run(self) {
        let Watcher {
            mut poller,
            interval,
            snapshot,
            status,
        } = self;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // The first tick is immediate; the state was just loaded.
        loop {
            ticker.tick().await;
            if snapshot.is_closed() && status.is_closed() {
                tracing::debug!("nobody reads the state any more; stop watching");
                return;
            }
            let polled = tokio::task::spawn_blocking(move || {
                let outcome = poller.poll();
                (poller, outcome)
            })
            .await;
            let outcome;
            (poller, outcome) = match polled {
                Ok(polled) => polled,
                // Cancelled: the runtime is shutting down.
                Err(error) if error.is_cancelled() => return,
                Err(error) => {
                    tracing::error!(%error, "state poll panicked; the state is no longer watched");
                    return;
                }
            };
            publish(outcome, &snapshot, &status);
        }
    }
}

fn publish(
    outcome: Outcome,
    snapshot: &watch::Sender<Arc<Snapshot>>,
    status: &watch::Sender<StateStatus>,
) {
    let now = SystemTime::now();
    match outcome {
        Outcome::Unchanged => {}
        Outcome::Loaded(next) => {
            let (workloads, services, files) =
                (next.workloads.len(), next.services.len(), next.files.len());
            // Snapshot first: whoever sees the new generation finds the new snapshot.
            snapshot.send_replace(Arc::new(*next));
            status.send_modify(|status| {
                status.generation += 1;
                status.last_loaded = Some(now);
                status.last_error = None;
                status.errors.clear();
                status.last_failed = None;
            });
            let generation = status.borrow().generation;
            tracing::info!(generation, files, workloads, services, "state loaded");
        }
        Outcome::Failed(errors) => {
            for error in &errors {
                tracing::error!(
                    file = %error.file.display(),
                    object = %error.object,
                    field = error.field.as_deref().unwrap_or("-"),
                    reason = %error.reason,
                    "invalid state"
                );
            }
            status.send_modify(|status| {
                status.last_error = Some(errors.to_string());
                status.last_failed = Some(now);
                status.errors = errors.0;
            });
            let generation = status.borrow().generation;
            tracing::error!(
                generation,
                "state change rejected; keeping the last good snapshot"
            );
        }
    }
}

/// What one poll found.
#[derive(Debug)]
enum Outcome {
    Unchanged,
    /// Boxed: a snapshot is far larger than the other outcomes.
    Loaded(Box<Snapshot>),
    Failed(StateErrors),
}

/// How the state files look from outside: a change here means "read them again".
type Listing = Result<Vec<FileStat>, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStat {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    /// Inode and change time catch rename-over and in-place rewrites that keep size and mtime.
    inode: u64,
    changed: (i64, i64),
}

/// The synchronous part of watching: compares listings and contents, loads on change.
#[derive(Debug)]
struct Poller {
    path: PathBuf,
    /// The listing of the contents last read.
    applied: Listing,
    /// A new listing seen once, read when the next poll sees it unchanged.
    pending: Option<Listing>,
    /// Hash of the contents last read, good or bad: the same bad files are reported once.
    content: u64,
    polls_since_read: u32,
}

impl Poller {
    fn start(path: PathBuf) -> Result<(Self, Snapshot), StateErrors> {
        // Listing before reading: a change made in between shows up at the next poll.
        let applied = listing(&path);
        let (files, errors) = local::read(&path);
        let content = content_hash(&files, &errors);
        StateErrors::check(errors)?;
        let snapshot = local::parse(files)?;
        let poller = Poller {
            path,
            applied,
            pending: None,
            content,
            polls_since_read: 0,
        };
        Ok((poller, snapshot))
    }

    fn poll(&mut self) -> Outcome {
        let current = listing(&self.path);
        self.polls_since_read += 1;
        if current == self.applied {
            self.pending = None;
            if self.polls_since_read < RECHECK_POLLS {
                return Outcome::Unchanged;
            }
        } else if self.pending.as_ref() != Some(&current) {
            // Changed since the last poll: let the writer finish first.
            self.pending = Some(current);
            return Outcome::Unchanged;
        }
        self.pending = None;
        self.applied = current;
        self.polls_since_read = 0;

        let (files, errors) = local::read(&self.path);
        let content = content_hash(&files, &errors);
        if content == self.content {
            return Outcome::Unchanged;
        }
        self.content = content;
        if let Err(errors) = StateErrors::check(errors) {
            return Outcome::Failed(errors);
        }
        match local::parse(files) {
            Ok(snapshot) => Outcome::Loaded(Box::new(snapshot)),
            Err(errors) => Outcome::Failed(errors),
        }
    }
}

fn listing(path: &Path) -> Listing {
    let files = local::list_files(path).map_err(|error| error.to_string())?;
    files
        .into_iter()
        .map(|path| {
            let meta =
                std::fs::metadata(&path).map_err(|error| format!("{}: {error}", path.display()))?;
            Ok(FileStat {
                len: meta.len(),
                modified: meta.modified().ok(),
                inode: meta.ino(),
                changed: (meta.ctime(), meta.ctime_nsec()),
                path,
            })
        })
        .collect()
}

fn content_hash(files: &[SourceFile], errors: &[StateError]) -> u64 {
    let mut hasher = DefaultHasher::new();
    files.hash(&mut hasher);
    for error in errors {
        error.to_string().hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const WAIT: Duration = Duration::from_secs(1);

    fn namespace(mode: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    mesh-agent.dev/mode: {mode}\n"
        )
    }

    fn pod(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  nodeName: node-a\nstatus:\n  podIP: {ip}\n"
        )
    }

    /// Writes like editors and `kubectl`-like tools do: a temporary file renamed over the target.
    fn write_atomically(path: &Path, text: &str) {
        let temporary = path.with_file_name(".writing.tmp");
        fs::write(&temporary, text).expect("must succeed");
        fs::rename(&temporary, path).expect("must succeed");
    }

    async fn changed<T>(receiver: &mut watch::Receiver<T>, what: &str) {
        tokio::time::timeout(WAIT, receiver.changed())
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing published within {WAIT:?}"))
            .expect("watcher alive");
    }

    #[tokio::test]
    async fn applies_changes_keeps_the_last_good_snapshot_and_recovers() {
        let dir = tempfile::tempdir().expect("must succeed");
        let namespaces = dir.path().join("namespaces.yaml");
        let pods = dir.path().join("pods.yaml");
        fs::write(&namespaces, namespace("ambient")).expect("must succeed");
        fs::write(&pods, pod("client", "10.0.0.5")).expect("must succeed");

        let watcher = watch(dir.path().to_path_buf()).expect("must succeed");
        let mut snapshots = watcher.snapshot();
        let mut status = watcher.status();
        let task = watcher.spawn();
        assert_eq!(status.borrow().generation, 1);
        assert!(
            snapshots
                .borrow()
                .workload("demo", "client")
                .expect("must succeed")
                .is_enrolled()
        );

        // A label change (rename-over) is published.
        write_atomically(&namespaces, &namespace("none"));
        changed(&mut snapshots, "label change").await;
        assert!(
            !snapshots
                .borrow_and_update()
                .workload("demo", "client")
                .expect("must succeed")
                .is_enrolled()
        );
        assert_eq!(status.borrow_and_update().generation, 2);

        // A broken file (written in place) is reported; the good snapshot stays.
        fs::write(
            &pods,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [oops\n",
        )
        .expect("must succeed");
        changed(&mut status, "broken file").await;
        {
            let current = status.borrow_and_update();
            assert_eq!(current.generation, 2);
            let error = current.last_error.as_deref().expect("error reported");
            assert!(
                error.contains("pods.yaml: document 1: invalid YAML"),
                "{error}"
            );
            assert_eq!(current.errors.len(), 1);
        }
        assert!(!snapshots.has_changed().expect("must succeed"));
        assert!(snapshots.borrow().workload("demo", "client").is_some());

        // Fixing it publishes the new state and clears the error.
        fs::write(&pods, pod("server", "10.0.0.6")).expect("must succeed");
        changed(&mut snapshots, "fix").await;
        assert!(
            snapshots
                .borrow_and_update()
                .workload("demo", "server")
                .is_some()
        );
        {
            let current = status.borrow_and_update();
            assert_eq!(current.generation, 3);
            assert_eq!(current.last_error, None);
            assert!(current.errors.is_empty());
        }

        // Deleting a file and adding one are changes too.
        fs::remove_file(&pods).expect("must succeed");
        changed(&mut snapshots, "delete").await;
        assert!(snapshots.borrow_and_update().workloads.is_empty());
        fs::write(
            dir.path().join("more.json"),
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"demo"}}"#,
        )
        .expect("must succeed");
        changed(&mut snapshots, "add").await;
        assert_eq!(snapshots.borrow_and_update().services.len(), 1);
        assert_eq!(status.borrow().generation, 5);

        task.abort();
    }

    #[tokio::test]
    async fn publishes_nothing_when_nothing_changed() {
        let dir = tempfile::tempdir().expect("must succeed");
        let file = dir.path().join("state.yaml");
        fs::write(&file, namespace("ambient")).expect("must succeed");
        let watcher = watch(file.clone())
            .expect("must succeed")
            .with_interval(Duration::from_millis(20));
        let mut snapshots = watcher.snapshot();
        let status = watcher.status();
        let task = watcher.spawn();

        // Same content rewritten: listed as changed, read, found identical.
        write_atomically(&file, &namespace("ambient"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!snapshots.has_changed().expect("must succeed"));
        assert_eq!(status.borrow().generation, 1);

        // Bad files are reported once, not on every poll.
        fs::write(&file, "kind: [").expect("must succeed");
        let mut status_changes = status.clone();
        changed(&mut status_changes, "broken").await;
        status_changes.borrow_and_update();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!status_changes.has_changed().expect("must succeed"));
        assert!(!snapshots.has_changed().expect("must succeed"));
        task.abort();
        let _ = snapshots.borrow_and_update();
    }

    #[tokio::test]
    async fn a_bad_first_load_returns_every_error() {
        let dir = tempfile::tempdir().expect("must succeed");
        fs::write(dir.path().join("a.yaml"), pod("client", "10.0.0.x")).expect("must succeed");
        let Err(errors) = watch(dir.path().to_path_buf()) else {
            panic!("must fail");
        };
        let text = errors.to_string();
        assert!(
            text.contains("status.podIP: \"10.0.0.x\" is not an IPv4 address"),
            "{text}"
        );
        assert!(text.contains("metadata.namespace"), "{text}");
    }

    #[tokio::test]
    async fn stops_when_nobody_listens() {
        let dir = tempfile::tempdir().expect("must succeed");
        let watcher = watch(dir.path().to_path_buf())
            .expect("must succeed")
            .with_interval(Duration::from_millis(10));
        let task = watcher.spawn();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("stopped")
            .expect("no panic");
    }

    #[test]
    fn a_vanished_path_is_an_error_until_it_returns() {
        let dir = tempfile::tempdir().expect("must succeed");
        let state = dir.path().join("state");
        fs::create_dir(&state).expect("must succeed");
        fs::write(state.join("ns.yaml"), namespace("ambient")).expect("must succeed");
        let (mut poller, _) = Poller::start(state.clone()).expect("must succeed");
        let moved = dir.path().join("moved");
        fs::rename(&state, &moved).expect("must succeed");
        assert!(matches!(poller.poll(), Outcome::Unchanged)); // settling
        assert!(matches!(poller.poll(), Outcome::Failed(_)));
        assert!(matches!(poller.poll(), Outcome::Unchanged)); // reported once
        fs::rename(&moved, &state).expect("must succeed");
        assert!(matches!(poller.poll(), Outcome::Unchanged));
        assert!(matches!(poller.poll(), Outcome::Loaded(_)));
    }
}
