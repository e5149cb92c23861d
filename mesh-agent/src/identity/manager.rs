//! Certificates of the workloads on this node: issued on first use or ahead of it, rotated at
//! half their lifetime, forgotten when their workloads leave the node.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use rustls::RootCertStore;
use tokio::{
    sync::{Notify, OnceCell, watch},
    time::Instant,
};

use super::{
    ca::{CaError, CertificateAuthority},
    certificate::{CertificateView, WorkloadCertificate},
    spiffe::Identity,
};

/// How soon a failed issue is retried by the rotation task.
const RETRY: Duration = Duration::from_secs(1);
/// Rotation never runs more often than this per identity, however short the certificates.
const MIN_REFRESH: Duration = Duration::from_millis(100);

/// Why no certificate could be had for an identity.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("no certificate for {identity}: {source}")]
    Issue {
        identity: Identity,
        /// Boxed: this error travels through every connection's future.
        source: Box<CaError>,
    },
}

/// The certificates this agent holds, one per identity of a workload on its node.
///
/// Cheap to clone. Connections take the `Arc<WorkloadCertificate>` current when they start and
/// build their TLS configuration from it, so a rotation only changes what new connections get.
#[derive(Clone)]
pub struct CertificateManager {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<CertificateAuthority>,
    ttl: Duration,
    /// An empty cell is a certificate wanted but not issued yet. Rotation swaps in a new cell,
    /// so fetches never wait behind it.
    certs: Mutex<BTreeMap<Identity, Slot>>,
    /// Wakes the rotation task when there is something new to issue or to schedule.
    changed: Notify,
}

type Slot = Arc<OnceCell<Issued>>;

#[derive(Clone)]
struct Issued {
    cert: Arc<WorkloadCertificate>,
    refresh_at: Instant,
}

impl CertificateManager {
    pub fn new(ca: Arc<CertificateAuthority>, ttl: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                ca,
                ttl,
                certs: Mutex::new(BTreeMap::new()),
                changed: Notify::new(),
            }),
        }
    }

    /// The current certificate for `id`, issued now if there is none yet. Concurrent fetches of
    /// one identity share a single issue. An identity fetched but not wanted is kept (and
    /// rotated) until the next [`set_wanted`](Self::set_wanted).
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCertificate>, ManagerError> {
        let slot = self.slot(id);
        let was_empty = !slot.initialized();
        let issued = slot.get_or_try_init(|| async { self.issue(id) }).await?;
        if was_empty {
            // The rotation task has to schedule this certificate's refresh.
            self.inner.changed.notify_one();
        }
        if !issued.cert.is_expired_at(SystemTime::now()) {
            return Ok(Arc::clone(&issued.cert));
        }
        // Rotation fell behind (or is not running): never hand out an expired certificate.
        let fresh = self.issue(id)?;
        self.replace(id, &slot, fresh.clone());
        Ok(fresh.cert)
    }

    /// The identities of the workloads now on this node: new ones get a certificate ahead of
    /// their first connection (by [`run`](Self::run)), certificates of the others are dropped.
    pub fn set_wanted(&self, ids: BTreeSet<Identity>) {
        let (added, removed) = {
            let mut certs = self.certs();
            let before = certs.len();
            certs.retain(|id, _| ids.contains(id));
            let removed = before - certs.len();
            let kept = certs.len();
            for id in ids {
                certs.entry(id).or_default();
            }
            (certs.len() - kept, removed)
        };
        if added > 0 || removed > 0 {
            tracing::debug!(
                added,
                removed,
                component = "identity",
                "wanted identities changed"
            );
            self.inner.changed.notify_one();
        }
    }

    /// Views of the certificates held, sorted by identity (`mesh-agent certs`).
    pub fn certificates(&self) -> Vec<CertificateView> {
        self.certs()
            .values()
            .filter_map(|slot| slot.get().map(|issued| issued.cert.view()))
            .collect()
    }

    /// The trust roots peers' certificates must chain to.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.inner.ca.roots()
    }

    pub fn trust_domain(&self) -> &str {
        self.inner.ca.trust_domain()
    }

    /// Issues wanted certificates and replaces each one once it has lived half of its lifetime,
    /// until shutdown is requested.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let next = self.refresh().await;
            let sleep = async {
                match next {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = crate::shutdown::requested(&mut shutdown) => return,
                () = self.inner.changed.notified() => {}
                () = sleep => {}
            }
        }
    }

    /// One pass of the rotation task: issues what is missing or due, and returns when the next
    /// certificate falls due.
    async fn refresh(&self) -> Option<Instant> {
        let now = Instant::now();
        let slots: Vec<(Identity, Slot)> = self
            .certs()
            .iter()
            .map(|(id, slot)| (id.clone(), Arc::clone(slot)))
            .collect();
        let mut next: Option<Instant> = None;
        let mut schedule = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
        for (id, slot) in slots {
            let result = match slot.get() {
                Some(issued) if issued.refresh_at > now => {
                    schedule(issued.refresh_at);
                    continue;
                }
                Some(old) => self.issue(&id).inspect(|fresh| {
                    tracing::info!(identity=%id, old_serial=old.cert.serial(), serial=fresh.cert.serial(), component="identity", "certificate rotated");
                    self.replace(&id, &slot, fresh.clone());
                }),
                None => slot
                    .get_or_try_init(|| async { self.issue(&id) })
                    .await
                    .cloned(),
            };
            match result {
                Ok(issued) => schedule(issued.refresh_at),
                Err(error) => {
                    tracing::warn!(identity=%id, %error, component="identity", "certificate not issued, will retry");
                    schedule(now + RETRY);
                }
            }
        }
        next
    }

    fn issue(&self, id: &Identity) -> Result<Issued, ManagerError> {
        let cert =
            self.inner
                .ca
                .issue(id, self.inner.ttl)
                .map_err(|source| ManagerError::Issue {
                    identity: id.clone(),
                    source: Box::new(source),
                })?;
        // Half of what is left of the lifetime, measured from now (the certificate starts a
        // minute early for clock skew, which does not count).
        let remaining = cert
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tracing::debug!(identity=%id, serial=cert.serial(), component="identity", "certificate issued");
        Ok(Issued {
            refresh_at: Instant::now() + (remaining / 2).max(MIN_REFRESH),
            cert: Arc::new(cert),
        })
    }

    fn slot(&self, id: &Identity) -> Slot {
        let mut certs = self.certs();
        if let Some(slot) = certs.get(id) {
            return Arc::clone(slot);
        }
        Arc::clone(certs.entry(id.clone()).or_default())
    }

    /// Swaps in `fresh`, unless the identity was dropped or replaced since `old` was read.
    fn replace(&self, id: &Identity, old: &Slot, fresh: Issued) {
        let mut certs = self.certs();
        if let Some(slot) = certs.get_mut(id)
            && Arc::ptr_eq(slot, old)
        {
            *slot = Arc::new(OnceCell::new_with(Some(fresh)));
        }
    }

    fn certs(&self) -> MutexGuard<'_, BTreeMap<Identity, Slot>> {
        // Every critical section leaves the map consistent, so a panic elsewhere cannot spoil it.
        self.inner
            .certs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::identity::tls;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "ns", sa).unwrap()
    }

    fn manager(ttl: Duration) -> CertificateManager {
        let ca = CertificateAuthority::self_signed("cluster.local").unwrap();
        CertificateManager::new(Arc::new(ca), ttl)
    }

    fn start(manager: &CertificateManager) -> watch::Sender<bool> {
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(manager.clone().run(shutdown));
        stop
    }

    /// Polls `check` every 20 ms for up to `limit`.
    async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn fetch_issues_once_and_then_reuses() {
        let manager = manager(Duration::from_secs(3600));
        let first = manager.fetch(&id("a")).await.unwrap();
        let second = manager.fetch(&id("a")).await.unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.identity(), &id("a"));
        assert!(
            manager
                .fetch(&Identity::new("other.td", "ns", "a").unwrap())
                .await
                .is_err()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_fetches_of_one_identity_issue_once() {
        let manager = manager(Duration::from_secs(3600));
        let fetches: Vec<_> = (0..32)
            .map(|_| {
                let manager = manager.clone();
                tokio::spawn(async move { manager.fetch(&id("a")).await.unwrap() })
            })
            .collect();
        let mut serials = BTreeSet::new();
        for fetch in fetches {
            serials.insert(fetch.await.unwrap().serial().to_owned());
        }
        assert_eq!(serials.len(), 1, "{serials:?}");
    }

    #[tokio::test]
    async fn wanted_identities_are_prefetched_and_others_forgotten() {
        let manager = manager(Duration::from_secs(3600));
        let _stop = start(&manager);
        let before = manager.fetch(&id("c")).await.unwrap();
        manager.set_wanted([id("b"), id("a"), id("c")].into());
        assert!(
            eventually(Duration::from_secs(2), async || manager
                .certificates()
                .len()
                == 3)
            .await
        );
        let listed: Vec<_> = manager
            .certificates()
            .into_iter()
            .map(|v| v.identity)
            .collect();
        assert_eq!(listed, vec![id("a"), id("b"), id("c")]);
        // Already held certificates are kept, prefetched ones are what fetch returns.
        assert_eq!(
            manager.fetch(&id("c")).await.unwrap().serial(),
            before.serial()
        );
        let prefetched = manager.certificates()[0].serial.clone();
        assert_eq!(manager.fetch(&id("a")).await.unwrap().serial(), prefetched);

        manager.set_wanted([id("b")].into());
        let listed: Vec<_> = manager
            .certificates()
            .into_iter()
            .map(|v| v.identity)
            .collect();
        assert_eq!(listed, vec![id("b")]);
    }

    #[tokio::test]
    async fn certificates_rotate_at_half_their_lifetime() {
        let manager = manager(Duration::from_secs(2));
        let _stop = start(&manager);
        let started = Instant::now();
        let first = manager.fetch(&id("a")).await.unwrap();
        let rotated = eventually(Duration::from_secs(3), async || {
            manager.fetch(&id("a")).await.unwrap().serial() != first.serial()
        })
        .await;
        assert!(rotated, "no rotation within 3 s");
        let after = started.elapsed();
        // 2 s certificates (not_after rounded up to a second) are replaced after 1 to 1.5 s.
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_millis(2000),
            "{after:?}"
        );
        let second = manager.fetch(&id("a")).await.unwrap();
        assert!(second.not_after() > first.not_after());
        assert_eq!(manager.certificates().len(), 1);
    }

    #[tokio::test]
    async fn an_expired_certificate_is_replaced_on_fetch_without_the_rotation_task() {
        let manager = manager(Duration::from_secs(1));
        let first = manager.fetch(&id("a")).await.unwrap();
        let wait = first
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait + Duration::from_millis(50)).await;
        let second = manager.fetch(&id("a")).await.unwrap();
        assert_ne!(second.serial(), first.serial());
        assert!(!second.is_expired_at(SystemTime::now()));
    }

    #[tokio::test]
    async fn the_rotation_task_stops_on_shutdown() {
        let manager = manager(Duration::from_secs(3600));
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(manager.clone().run(shutdown));
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn rotation_leaves_open_connections_alone() {
        let manager = manager(Duration::from_secs(2));
        let _stop = start(&manager);
        let connect = async |manager: &CertificateManager| {
            let client_cert = manager.fetch(&id("client")).await.unwrap();
            let server_cert = manager.fetch(&id("server")).await.unwrap();
            let client =
                tls::client_config(&client_cert, manager.roots(), vec![id("server")]).unwrap();
            let server = tls::server_config(&server_cert, manager.roots()).unwrap();
            let (a, b) = tokio::io::duplex(4096);
            let (client, server) = tokio::join!(
                TlsConnector::from(client).connect(tls::server_name(), a),
                TlsAcceptor::from(server).accept(b),
            );
            (client.unwrap(), server.unwrap(), server_cert)
        };
        let (mut client, mut server, old_cert) = connect(&manager).await;

        let rotated = eventually(Duration::from_secs(3), async || {
            manager.fetch(&id("server")).await.unwrap().serial() != old_cert.serial()
        })
        .await;
        assert!(rotated);

        // The open connection still works, and still shows the certificate it started with.
        client.write_all(b"still here").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = [0u8; 10];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still here");
        let seen = |conn: &rustls::CommonState| conn.peer_certificates().unwrap()[0].clone();
        assert_eq!(&seen(client.get_ref().1), old_cert.leaf());

        // A new connection gets the new certificate.
        let (client, _server, new_cert) = connect(&manager).await;
        assert_ne!(new_cert.serial(), old_cert.serial());
        assert_eq!(&seen(client.get_ref().1), new_cert.leaf());
    }
}
