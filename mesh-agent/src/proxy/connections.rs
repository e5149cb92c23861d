//! The table of connections the proxy carries: open ones, recently closed ones, and totals.
//! It backs `mesh-agent connections` and the drain on shutdown.

use std::{
    borrow::Cow,
    collections::{BTreeMap, VecDeque},
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::sync::watch;

use super::forward::ByteCounts;
use crate::metrics::{DenialLabels, Metrics, TcpCounters, TcpLabels};

/// How many closed connections are kept for inspection.
const RECENT: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Whether a connection was protected by mutual TLS between the two proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Inside an HBONE tunnel, or between two enrolled pods of this node (never on the wire).
    MutualTls,
    /// Plaintext: one end is not in the mesh.
    None,
}

impl Security {
    /// Istio's `connection_security_policy` label value.
    pub fn label(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::None => "none",
        }
    }
}

/// A pod taking part in a connection, as named in logs, views and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadRef {
    pub namespace: String,
    pub name: String,
    /// The pod's `app` label (Istio's `*_app` metric labels).
    pub app: Option<String>,
}

impl std::fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Serialize for WorkloadRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What the proxy learned about a connection when it accepted it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    pub direction: Direction,
    /// The client's address (a pod IP, or a remote address for inbound).
    pub source: SocketAddr,
    /// The client when it is a known pod.
    pub source_workload: Option<WorkloadRef>,
    /// The client's SPIFFE identity, when known (enrolled client, or authenticated by mTLS).
    pub source_identity: Option<String>,
    /// Serial of the certificate the client presented (tunnel inbound only).
    pub source_certificate_serial: Option<String>,
    /// Where the client was connecting to, before capture.
    pub original_destination: SocketAddr,
    /// `namespace/name` of the Service when the client dialed a service address.
    pub destination_service: Option<String>,
    /// The pod that serves the connection (a service's chosen endpoint).
    pub destination_workload: Option<WorkloadRef>,
    /// The address actually connected to (differs from the original for services).
    pub destination: SocketAddr,
    pub destination_identity: Option<String>,
    /// How the proxy reaches the destination: `direct`, `tunnel` (HBONE), `local` (same node).
    pub route: &'static str,
    pub security: Security,
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
    /// `allow`, or why the connection was denied.
    pub verdict: Cow<'static, str>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub outbound_opened: u64,
    pub inbound_opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub denied: u64,
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
    /// Istio's TCP counters this connection reports to (two for a same-node connection).
    counters: Vec<TcpCounters>,
    /// Bytes both ways when the idle sweep last looked, and when they last changed.
    bytes_seen: u64,
    active_at: Instant,
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
    metrics: Arc<Metrics>,
}

impl Connections {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::default(),
            metrics,
        }
    }

    /// Registers an allowed connection; it stays open until the guard is dropped.
    pub fn open(&self, info: ConnectionInfo) -> ConnectionGuard {
        let counts = Arc::new(ByteCounts::default());
        let counters: Vec<TcpCounters> = tcp_labels(&info)
            .iter()
            .map(|labels| self.metrics.tcp(labels))
            .collect();
        for c in &counters {
            c.opened.inc();
        }
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        match info.direction {
            Direction::Outbound => inner.totals.outbound_opened += 1,
            Direction::Inbound => inner.totals.inbound_opened += 1,
        }
        inner.open.insert(
            id,
            Open {
                info,
                started: SystemTime::now(),
                since: Instant::now(),
                counts: counts.clone(),
                counters,
                bytes_seen: 0,
                active_at: Instant::now(),
            },
        );
        ConnectionGuard {
            table: self.clone(),
            id,
            counts,
            error: None,
        }
    }

    /// Records a connection refused by policy: counted, logged, kept in the recent list.
    pub fn deny(&self, info: ConnectionInfo, policy: Option<&str>, reason: &str) {
        let labels = DenialLabels {
            reporter: reporter(info.direction),
            destination_workload: name_of(&info.destination_workload),
            destination_workload_namespace: namespace_of(&info.destination_workload),
            source_principal: principal_of(&info.source_identity),
            policy: policy.unwrap_or("default").to_string(),
            reason: "authorization",
        };
        self.metrics.denied.get_or_create(&labels).inc();
        let record = ConnectionRecord {
            id: 0,
            info,
            started: SystemTime::now(),
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: Some(0),
            verdict: Cow::Owned(format!("deny: {reason}")),
            error: None,
        };
        access_log(&record);
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.totals.denied += 1;
        push_recent(&mut inner, ConnectionRecord { id, ..record });
    }

    /// Cuts every open connection that carried no byte either way for `idle` (it ends as a
    /// failure, both legs reset); returns how many. Run periodically: a connection is looked at
    /// once per run, never on its own data path.
    pub fn cut_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut cut = 0;
        for open in self.lock().open.values_mut() {
            let bytes = open.counts.sent.load(Ordering::Relaxed)
                + open.counts.received.load(Ordering::Relaxed);
            if bytes != open.bytes_seen {
                open.bytes_seen = bytes;
                open.active_at = now;
            } else if now.duration_since(open.active_at) >= idle {
                open.counts.idle.cut();
                cut += 1;
            }
        }
        cut
    }

    /// Cuts idle connections until shutdown, looking every quarter of `idle` (at most a minute).
    pub async fn run_idle_sweep(self, idle: Duration, mut shutdown: watch::Receiver<bool>) {
        if idle.is_zero() {
            return;
        }
        let period = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => return,
                _ = tick.tick() => {
                    let cut = self.cut_idle(idle);
                    if cut > 0 {
                        tracing::info!(cut, idle_timeout = ?idle, "idle connections closed");
                    }
                }
            }
        }
    }

    pub fn open_count(&self) -> usize {
        self.lock().open.len()
    }

    pub fn totals(&self) -> Totals {
        self.lock().totals.clone()
    }

    pub fn view(&self) -> ConnectionsView {
        let inner = self.lock();
        ConnectionsView {
            open: inner
                .open
                .iter()
                .map(|(id, o)| record(*id, o.info.clone(), o.started, &o.counts, None, None))
                .collect(),
            recent: inner.recent.iter().cloned().collect(),
            totals: inner.totals.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the table inconsistent in a way that
        // matters for reporting, so keep going with the data.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Moves a connection from the open table to the recent list, counts it and writes its
    /// access-log line. The record is moved, not copied: this runs once per connection.
    fn close(&self, id: u64, error: Option<String>) {
        let Some(open) = self.lock().open.remove(&id) else {
            return;
        };
        let Open {
            info,
            started,
            since,
            counts,
            counters,
            ..
        } = open;
        let duration_ms = since.elapsed().as_millis() as u64;
        let record = record(id, info, started, &counts, Some(duration_ms), error);
        for c in &counters {
            c.closed.inc();
            c.sent_bytes.inc_by(record.bytes_sent);
            c.received_bytes.inc_by(record.bytes_received);
        }
        access_log(&record);
        let mut inner = self.lock();
        inner.totals.closed += 1;
        if record.error.is_some() {
            inner.totals.failed += 1;
        }
        inner.totals.bytes_sent += record.bytes_sent;
        inner.totals.bytes_received += record.bytes_received;
        push_recent(&mut inner, record);
    }
}

fn push_recent(inner: &mut Inner, record: ConnectionRecord) {
    if inner.recent.len() == RECENT {
        inner.recent.pop_front();
    }
    inner.recent.push_back(record);
}

fn reporter(direction: Direction) -> &'static str {
    match direction {
        Direction::Outbound => "source",
        Direction::Inbound => "destination",
    }
}

fn name_of(w: &Option<WorkloadRef>) -> String {
    w.as_ref()
        .map_or_else(|| "unknown".into(), |w| w.name.clone())
}

fn namespace_of(w: &Option<WorkloadRef>) -> String {
    w.as_ref()
        .map_or_else(|| "unknown".into(), |w| w.namespace.clone())
}

fn principal_of(identity: &Option<String>) -> String {
    identity.clone().unwrap_or_else(|| "unknown".into())
}

fn app_of(w: &Option<WorkloadRef>) -> String {
    w.as_ref()
        .and_then(|w| w.app.clone())
        .unwrap_or_else(|| "unknown".into())
}

/// Istio's labels for a connection; a same-node connection is reported by both ends.
fn tcp_labels(info: &ConnectionInfo) -> Vec<TcpLabels> {
    let base = TcpLabels {
        reporter: reporter(info.direction),
        source_workload: name_of(&info.source_workload),
        source_workload_namespace: namespace_of(&info.source_workload),
        source_principal: principal_of(&info.source_identity),
        source_app: app_of(&info.source_workload),
        destination_workload: name_of(&info.destination_workload),
        destination_workload_namespace: namespace_of(&info.destination_workload),
        destination_principal: principal_of(&info.destination_identity),
        destination_app: app_of(&info.destination_workload),
        destination_service: info
            .destination_service
            .clone()
            .unwrap_or_else(|| "unknown".into()),
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: info.security.label(),
    };
    if info.route == super::upstream::LOCAL {
        let destination = TcpLabels {
            reporter: "destination",
            ..base.clone()
        };
        vec![base, destination]
    } else {
        vec![base]
    }
}

/// The record of an allowed connection, open (no duration yet) or closed.
fn record(
    id: u64,
    info: ConnectionInfo,
    started: SystemTime,
    counts: &ByteCounts,
    duration_ms: Option<u64>,
    error: Option<String>,
) -> ConnectionRecord {
    ConnectionRecord {
        id,
        info,
        started,
        bytes_sent: counts.sent.load(Ordering::Relaxed),
        bytes_received: counts.received.load(Ordering::Relaxed),
        duration_ms,
        verdict: Cow::Borrowed("allow"),
        error,
    }
}

/// One structured line per finished connection. Values are written with `Display` (no quoting
/// or escaping, nothing allocated): pod names, SPIFFE ids and addresses contain no spaces.
fn access_log(r: &ConnectionRecord) {
    let i = &r.info;
    tracing::info!(
        target: "access",
        direction = %i.direction.label(),
        src.addr = %i.source,
        src.workload = %OrDash(i.source_workload.as_ref()),
        src.identity = %OrDash(i.source_identity.as_ref()),
        dst.addr = %i.destination,
        dst.original = %i.original_destination,
        dst.service = %OrDash(i.destination_service.as_ref()),
        dst.workload = %OrDash(i.destination_workload.as_ref()),
        dst.identity = %OrDash(i.destination_identity.as_ref()),
        route = %i.route,
        security = %i.security.label(),
        verdict = %r.verdict,
        bytes_sent = r.bytes_sent,
        bytes_recv = r.bytes_received,
        duration_ms = r.duration_ms.unwrap_or(0),
        error = %OrDash(r.error.as_ref()),
        "connection complete"
    );
}

/// A value, or `-` when there is none.
struct OrDash<'a, T>(Option<&'a T>);

impl<T: fmt::Display> fmt::Display for OrDash<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
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
        self.table.close(self.id, self.error.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ConnectionInfo {
        ConnectionInfo {
            direction: Direction::Outbound,
            source: "10.0.1.10:40000".parse().unwrap(),
            source_workload: Some(WorkloadRef {
                namespace: "shop".into(),
                name: "web".into(),
                app: None,
            }),
            source_identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            source_certificate_serial: None,
            original_destination: "10.0.2.10:8080".parse().unwrap(),
            destination_service: None,
            destination_workload: None,
            destination: "10.0.2.10:8080".parse().unwrap(),
            destination_identity: None,
            route: "direct",
            security: Security::None,
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
        assert_eq!(view.recent[0].verdict, "allow");
        assert_eq!(view.totals.outbound_opened, 1);
        assert_eq!(view.totals.closed, 1);
        assert_eq!(view.totals.failed, 0);
        let json = serde_json::to_value(&view.recent[0]).unwrap();
        assert_eq!(json["source_workload"], "shop/web");
    }

    #[test]
    fn denial_is_recorded_and_counted() {
        let metrics = Arc::new(Metrics::new());
        let table = Connections::new(metrics.clone());
        table.deny(
            info(),
            Some("shop/deny-all"),
            "denied by DENY policy shop/deny-all rule 0",
        );
        let view = table.view();
        assert_eq!(view.totals.denied, 1);
        assert!(view.recent[0].verdict.starts_with("deny: "));
        assert!(
            metrics
                .encode()
                .unwrap()
                .contains("policy=\"shop/deny-all\"")
        );
    }

    /// What a subscriber writes, for reading back in a test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn closing_writes_one_access_log_line_and_counts_istio_metrics() {
        let metrics = Arc::new(Metrics::new());
        let table = Connections::new(metrics.clone());
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(crate::logging::fields())
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let mut guard = table.open(info());
            guard.counts().sent.fetch_add(7, Ordering::Relaxed);
            guard.counts().received.fetch_add(3, Ordering::Relaxed);
            guard.fail("connection reset");
        });
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 1, "one line per connection:\n{log}");
        for field in [
            "access: connection complete",
            "direction=outbound",
            "src.addr=10.0.1.10:40000",
            "src.workload=shop/web",
            "src.identity=spiffe://cluster.local/ns/shop/sa/web",
            "dst.addr=10.0.2.10:8080",
            "dst.workload=-",
            "route=direct",
            "security=none",
            "verdict=allow",
            "bytes_sent=7",
            "bytes_recv=3",
            "error=connection reset",
        ] {
            assert!(lines[0].contains(field), "{field:?} missing from {log}");
        }
        let text = metrics.encode().unwrap();
        for (name, value) in [
            ("istio_tcp_connections_opened_total", " 1"),
            ("istio_tcp_connections_closed_total", " 1"),
            ("istio_tcp_sent_bytes_total", " 7"),
            ("istio_tcp_received_bytes_total", " 3"),
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)
                    && l.contains("reporter=\"source\"")
                    && l.ends_with(value)),
                "{name}{value} missing from\n{text}"
            );
        }
        assert_eq!(table.view().totals.failed, 1);
    }

    #[test]
    fn recent_is_bounded() {
        let table = Connections::default();
        for _ in 0..RECENT + 10 {
            drop(table.open(info()));
        }
        assert_eq!(table.view().recent.len(), RECENT);
    }
}
