//! The table of connections the proxy carries: open ones, recently closed ones, and totals.
//! It backs `mesh-agent connections` and the drain on shutdown.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Instant, SystemTime},
};

use serde::Serialize;
use tokio::sync::Notify;

use super::forward::ByteCounts;

/// How many closed connections are kept for inspection.
const RECENT: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// What the proxy learned about a connection when it accepted it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    pub direction: Direction,
    /// The client's address (a pod IP, or a remote address for inbound).
    pub source: SocketAddr,
    /// `namespace/name` of the client when it is a known pod.
    pub source_workload: Option<String>,
    /// Where the client was connecting to, before capture.
    pub original_destination: SocketAddr,
    pub destination_workload: Option<String>,
    /// How the proxy reaches the destination: `direct` (plaintext) for now.
    pub route: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord {
    pub id: u64,
    #[serde(flatten)]
    pub info: ConnectionInfo,
    pub started: SystemTime,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub outbound_opened: u64,
    pub inbound_opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsView {
    pub open: Vec<ConnectionRecord>,
    pub recent: Vec<ConnectionRecord>,
    pub totals: Totals,
}

struct Open {
    info: ConnectionInfo,
    started: SystemTime,
    since: Instant,
    counts: Arc<ByteCounts>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    open: BTreeMap<u64, Open>,
    recent: VecDeque<ConnectionRecord>,
    totals: Totals,
}

#[derive(Clone, Default)]
pub struct Connections {
    inner: Arc<Mutex<Inner>>,
    closed: Arc<Notify>,
}

impl Connections {
    /// Registers a connection; it stays open until the guard is finished or dropped.
    pub fn open(&self, info: ConnectionInfo) -> ConnectionGuard {
        let counts = Arc::new(ByteCounts::default());
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        match info.direction {
            Direction::Outbound => inner.totals.outbound_opened += 1,
            Direction::Inbound => inner.totals.inbound_opened += 1,
        }
        inner.open.insert(
            id,
            Open { info, started: SystemTime::now(), since: Instant::now(), counts: counts.clone() },
        );
        ConnectionGuard { table: self.clone(), id, counts, error: None }
    }

    pub fn open_count(&self) -> usize {
        self.lock().open.len()
    }

    /// Resolves when no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.closed.notified();
            if self.open_count() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn view(&self) -> ConnectionsView {
        let inner = self.lock();
        ConnectionsView {
            open: inner.open.iter().map(|(id, o)| record(*id, o, None, None)).collect(),
            recent: inner.recent.iter().cloned().collect(),
            totals: inner.totals.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the table inconsistent in a way that
        // matters for reporting, so keep going with the data.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn close(&self, id: u64, error: Option<String>) -> Option<ConnectionRecord> {
        let record = {
            let mut inner = self.lock();
            let open = inner.open.remove(&id)?;
            let record = record(id, &open, Some(open.since.elapsed().as_millis() as u64), error);
            inner.totals.closed += 1;
            if record.error.is_some() {
                inner.totals.failed += 1;
            }
            inner.totals.bytes_sent += record.bytes_sent;
            inner.totals.bytes_received += record.bytes_received;
            if inner.recent.len() == RECENT {
                inner.recent.pop_front();
            }
            inner.recent.push_back(record.clone());
            record
        };
        self.closed.notify_waiters();
        Some(record)
    }
}

fn record(id: u64, open: &Open, duration_ms: Option<u64>, error: Option<String>) -> ConnectionRecord {
    ConnectionRecord {
        id,
        info: open.info.clone(),
        started: open.started,
        bytes_sent: open.counts.sent.load(Ordering::Relaxed),
        bytes_received: open.counts.received.load(Ordering::Relaxed),
        duration_ms,
        error,
    }
}

/// Keeps a connection in the open table; on drop it moves to the recent list and an access-log
/// line is written.
pub struct ConnectionGuard {
    table: Connections,
    id: u64,
    counts: Arc<ByteCounts>,
    error: Option<String>,
}

impl ConnectionGuard {
    pub fn counts(&self) -> Arc<ByteCounts> {
        self.counts.clone()
    }

    pub fn fail(&mut self, error: impl ToString) {
        self.error = Some(error.to_string());
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(r) = self.table.close(self.id, self.error.take()) {
            tracing::info!(
                target: "access",
                direction = ?r.info.direction,
                src.addr = %r.info.source,
                src.workload = r.info.source_workload.as_deref().unwrap_or("-"),
                dst.addr = %r.info.original_destination,
                dst.workload = r.info.destination_workload.as_deref().unwrap_or("-"),
                route = r.info.route,
                bytes_sent = r.bytes_sent,
                bytes_recv = r.bytes_received,
                duration_ms = r.duration_ms.unwrap_or(0),
                error = r.error.as_deref().unwrap_or("-"),
                "connection complete"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ConnectionInfo {
        ConnectionInfo {
            direction: Direction::Outbound,
            source: "10.0.1.10:40000".parse().unwrap(),
            source_workload: Some("shop/web".into()),
            original_destination: "10.0.2.10:8080".parse().unwrap(),
            destination_workload: None,
            route: "direct",
        }
    }

    #[test]
    fn guard_moves_connection_to_recent_with_counts() {
        let table = Connections::default();
        let guard = table.open(info());
        guard.counts().sent.fetch_add(5, Ordering::Relaxed);
        assert_eq!(table.view().open.len(), 1);
        drop(guard);
        let view = table.view();
        assert!(view.open.is_empty());
        assert_eq!(view.recent[0].bytes_sent, 5);
        assert_eq!(view.totals.outbound_opened, 1);
        assert_eq!(view.totals.closed, 1);
        assert_eq!(view.totals.failed, 0);
    }

    #[test]
    fn recent_is_bounded() {
        let table = Connections::default();
        for _ in 0..RECENT + 10 {
            drop(table.open(info()));
        }
        assert_eq!(table.view().recent.len(), RECENT);
    }

    #[tokio::test]
    async fn wait_idle_returns_when_last_closes() {
        let table = Connections::default();
        let guard = table.open(info());
        let t = table.clone();
        let waiter = tokio::spawn(async move { t.wait_idle().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(guard);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter).await.unwrap().unwrap();
    }
}
