//! Bounds on what peers and pods can make the proxy hold: TLS handshakes in progress (in all and
//! per source address), tunnels per peer identity, proxied connections in all, per source and
//! per destination pod. Past a bound new work is refused at once and counted; nothing queues.
//!
//! The defaults are shares of the open-files limit, so the proxy runs out of its own budget
//! long before the process runs out of descriptors; per-source shares are a fraction of the
//! totals, so one source at its limit leaves room for every other.

use std::{
    collections::{HashMap, hash_map::Entry},
    hash::Hash,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tracing::warn;

use crate::{identity::Identity, metrics::Metrics};

/// Descriptors kept out of the proxy's budget: maps, state files, the admin and API sockets.
const RESERVED_FILES: u64 = 1024;
/// Most connections whatever the open-files limit: each costs buffers as well as descriptors.
const MAX_CONNECTIONS: usize = 100_000;
const MAX_HANDSHAKES: usize = 1024;
const MAX_TUNNELS: usize = 10_000;
/// Streams a tunnel may carry at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
pub const STREAMS_PER_TUNNEL: u32 = 1000;
/// At most one warning per limit in this long; the count says how many were refused since.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The bounds in force; `mesh-agent status` and `/config_dump` show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LimitSettings {
    /// Proxied connections at once (a tunnelled stream counts as one).
    pub connections: usize,
    /// Connections one source (pod or remote address) holds at once.
    pub connections_per_source: usize,
    /// Connections to one destination pod (or outside address) at once.
    pub connections_per_destination: usize,
    /// Unauthenticated TLS handshakes on the tunnel port at once.
    pub handshakes: usize,
    pub handshakes_per_source: usize,
    /// Tunnels accepted from other nodes at once.
    pub tunnels: usize,
    /// Tunnels accepted from one peer identity at once.
    pub tunnels_per_identity: usize,
    /// Streams one tunnel carries at once; the HTTP/2 layer refuses more (REFUSED_STREAM).
    pub streams_per_tunnel: u32,
}

impl LimitSettings {
    /// The defaults for a process that may hold `open_files` descriptors: a reserve for the
    /// agent itself, a sixteenth for handshakes, an eighth for tunnels, and what is left, two
    /// descriptors each, for connections.
    pub fn for_open_files(open_files: u64) -> Self {
        let reserve = RESERVED_FILES.min(open_files / 4);
        let budget = usize::try_from(open_files.saturating_sub(reserve)).unwrap_or(usize::MAX);
        let handshakes = (budget / 16).clamp(1, MAX_HANDSHAKES);
        let tunnels = (budget / 8).clamp(1, MAX_TUNNELS);
        let connections =
            (budget.saturating_sub(handshakes + tunnels) / 2).clamp(1, MAX_CONNECTIONS);
        Self::with_totals(connections, handshakes, tunnels)
    }

    /// The totals given, each with its default shares: a quarter of the connections per
    /// source and half per destination, a sixteenth of the handshakes per source, a quarter of
    /// the tunnels per identity.
    fn with_totals(connections: usize, handshakes: usize, tunnels: usize) -> Self {
        Self {
            connections,
            connections_per_source: (connections / 4).max(1),
            connections_per_destination: (connections / 2).max(1),
            handshakes,
            handshakes_per_source: (handshakes / 16).max(1),
            tunnels,
            tunnels_per_identity: (tunnels / 4).max(1),
            streams_per_tunnel: STREAMS_PER_TUNNEL,
        }
    }
}

/// Limits given on the command line; the rest take their defaults from the open-files limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::Args)]
pub struct LimitOverrides {
    /// Proxied connections at once [default: from the open-files limit].
    #[arg(long = "max-connections")]
    pub connections: Option<usize>,
    /// Connections one source holds at once [default: a quarter of --max-connections].
    #[arg(long = "max-connections-per-source")]
    pub connections_per_source: Option<usize>,
    /// Connections to one destination at once [default: half of --max-connections].
    #[arg(long = "max-connections-per-destination")]
    pub connections_per_destination: Option<usize>,
    /// TLS handshakes in progress on the tunnel port [default: from the open-files limit].
    #[arg(long = "max-handshakes")]
    pub handshakes: Option<usize>,
    /// Handshakes in progress from one address [default: a sixteenth of --max-handshakes].
    #[arg(long = "max-handshakes-per-source")]
    pub handshakes_per_source: Option<usize>,
    /// Tunnels accepted at once [default: from the open-files limit].
    #[arg(long = "max-tunnels")]
    pub tunnels: Option<usize>,
    /// Tunnels accepted from one peer identity [default: a quarter of --max-tunnels].
    #[arg(long = "max-tunnels-per-identity")]
    pub tunnels_per_identity: Option<usize>,
    /// Streams one tunnel carries at once [default: 1000].
    #[arg(long = "max-streams-per-tunnel")]
    pub streams_per_tunnel: Option<u32>,
}

impl LimitOverrides {
    /// The limits in force: these overrides over the defaults for `open_files`; a share left
    /// to default follows its total when the total is given.
    pub fn resolve(&self, open_files: u64) -> LimitSettings {
        let base = LimitSettings::for_open_files(open_files);
        let shares = LimitSettings::with_totals(
            self.connections.unwrap_or(base.connections),
            self.handshakes.unwrap_or(base.handshakes),
            self.tunnels.unwrap_or(base.tunnels),
        );
        LimitSettings {
            connections_per_source: self
                .connections_per_source
                .unwrap_or(shares.connections_per_source),
            connections_per_destination: self
                .connections_per_destination
                .unwrap_or(shares.connections_per_destination),
            handshakes_per_source: self
                .handshakes_per_source
                .unwrap_or(shares.handshakes_per_source),
            tunnels_per_identity: self
                .tunnels_per_identity
                .unwrap_or(shares.tunnels_per_identity),
            streams_per_tunnel: self.streams_per_tunnel.unwrap_or(shares.streams_per_tunnel),
            ..shares
        }
    }
}

/// Which bound refused something: the `limit` label of `mesh_agent_limit_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    ConnectionsPerSource,
    ConnectionsPerDestination,
    Handshakes,
    HandshakesPerSource,
    Tunnels,
    TunnelsPerIdentity,
}

impl Limit {
    const ALL: [Limit; 7] = [
        Limit::Connections,
        Limit::ConnectionsPerSource,
        Limit::ConnectionsPerDestination,
        Limit::Handshakes,
        Limit::HandshakesPerSource,
        Limit::Tunnels,
        Limit::TunnelsPerIdentity,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::ConnectionsPerSource => "connections_per_source",
            Limit::ConnectionsPerDestination => "connections_per_destination",
            Limit::Handshakes => "handshakes",
            Limit::HandshakesPerSource => "handshakes_per_source",
            Limit::Tunnels => "tunnels",
            Limit::TunnelsPerIdentity => "tunnels_per_identity",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// What is held now and how much was refused, per bound: `mesh-agent status`.
#[derive(Debug, Clone, Serialize)]
pub struct LimitsStatus {
    pub settings: LimitSettings,
    pub connections: usize,
    pub handshakes: usize,
    pub tunnels: usize,
    /// Sources, destinations and identities holding anything now.
    pub sources: usize,
    pub destinations: usize,
    pub identities: usize,
    /// Refusals since start, by bound (only those that refused anything).
    pub refused: HashMap<&'static str, u64>,
}

/// The proxy's bounds and what is held against them.
pub struct Limits {
    settings: LimitSettings,
    connections: AtomicUsize,
    by_source: Keyed<IpAddr>,
    by_destination: Keyed<IpAddr>,
    handshakes: AtomicUsize,
    handshakes_by_source: Keyed<IpAddr>,
    tunnels: AtomicUsize,
    tunnels_by_identity: Keyed<Identity>,
    refused: [AtomicU64; Limit::ALL.len()],
    /// Refusals not yet logged, and when each limit last logged.
    unlogged: [AtomicU64; Limit::ALL.len()],
    logged: Mutex<[Option<Instant>; Limit::ALL.len()]>,
    metrics: Arc<Metrics>,
}

impl Limits {
    pub fn new(settings: LimitSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            connections: AtomicUsize::new(0),
            by_source: Keyed::default(),
            by_destination: Keyed::default(),
            handshakes: AtomicUsize::new(0),
            handshakes_by_source: Keyed::default(),
            tunnels: AtomicUsize::new(0),
            tunnels_by_identity: Keyed::default(),
            refused: Default::default(),
            unlogged: Default::default(),
            logged: Mutex::new([None; Limit::ALL.len()]),
            metrics,
        })
    }

    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    /// A connection from `source`: counted in all and against its source until the permit
    /// is dropped. Name its destination with [`ConnectionPermit::to`].
    pub fn connection(self: &Arc<Self>, source: IpAddr) -> Result<ConnectionPermit, Limit> {
        let s = &self.settings;
        self.take(
            (&self.connections, s.connections, Limit::Connections),
            (&self.by_source, source, s.connections_per_source),
            Limit::ConnectionsPerSource,
        )?;
        Ok(ConnectionPermit {
            limits: self.clone(),
            source,
            destination: None,
        })
    }

    /// A connection from `source` to `destination`, counted against both.
    pub fn connection_to(
        self: &Arc<Self>,
        source: IpAddr,
        destination: IpAddr,
    ) -> Result<ConnectionPermit, Limit> {
        let mut permit = self.connection(source)?;
        permit.to(destination)?;
        Ok(permit)
    }

    /// An unauthenticated TLS handshake from `source`, until the permit is dropped.
    pub fn handshake(self: &Arc<Self>, source: IpAddr) -> Result<HandshakePermit, Limit> {
        let s = &self.settings;
        self.take(
            (&self.handshakes, s.handshakes, Limit::Handshakes),
            (&self.handshakes_by_source, source, s.handshakes_per_source),
            Limit::HandshakesPerSource,
        )?;
        Ok(HandshakePermit {
            limits: self.clone(),
            source,
        })
    }

    /// A tunnel accepted from `peer`, until the permit is dropped.
    pub fn tunnel(self: &Arc<Self>, peer: &Identity) -> Result<TunnelPermit, Limit> {
        let s = &self.settings;
        self.take(
            (&self.tunnels, s.tunnels, Limit::Tunnels),
            (
                &self.tunnels_by_identity,
                peer.clone(),
                s.tunnels_per_identity,
            ),
            Limit::TunnelsPerIdentity,
        )?;
        Ok(TunnelPermit {
            limits: self.clone(),
            peer: peer.clone(),
        })
    }

    pub fn status(&self) -> LimitsStatus {
        LimitsStatus {
            settings: self.settings,
            connections: self.connections.load(Ordering::Relaxed),
            handshakes: self.handshakes.load(Ordering::Relaxed),
            tunnels: self.tunnels.load(Ordering::Relaxed),
            sources: self.by_source.len(),
            destinations: self.by_destination.len(),
            identities: self.tunnels_by_identity.len(),
            refused: Limit::ALL
                .iter()
                .map(|l| (l.label(), self.refused[l.index()].load(Ordering::Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }

    /// Counts one more against a total and against one key's share, or neither: refused by
    /// whichever is full.
    fn take<K: Hash + Eq>(
        &self,
        (count, max, total_limit): (&AtomicUsize, usize, Limit),
        (keyed, key, key_max): (&Keyed<K>, K, usize),
        key_limit: Limit,
    ) -> Result<(), Limit> {
        if count.fetch_add(1, Ordering::AcqRel) >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(self.refuse(total_limit));
        }
        if !keyed.take(key, key_max) {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(self.refuse(key_limit));
        }
        Ok(())
    }

    /// Counts a refusal, and warns at most once per [`LOG_EVERY`] per limit with the number
    /// refused since the last warning: a flood must not become a flood of log lines.
    fn refuse(&self, limit: Limit) -> Limit {
        let i = limit.index();
        self.refused[i].fetch_add(1, Ordering::Relaxed);
        self.metrics.limit_refused(limit.label());
        self.unlogged[i].fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged[i].is_none_or(|at| now.duration_since(at) >= LOG_EVERY) {
            logged[i] = Some(now);
            drop(logged);
            let refused = self.unlogged[i].swap(0, Ordering::Relaxed);
            warn!(%limit, max = self.max(limit), refused, "limit reached: new work refused");
        }
        limit
    }

    fn max(&self, limit: Limit) -> usize {
        let s = &self.settings;
        match limit {
            Limit::Connections => s.connections,
            Limit::ConnectionsPerSource => s.connections_per_source,
            Limit::ConnectionsPerDestination => s.connections_per_destination,
            Limit::Handshakes => s.handshakes,
            Limit::HandshakesPerSource => s.handshakes_per_source,
            Limit::Tunnels => s.tunnels,
            Limit::TunnelsPerIdentity => s.tunnels_per_identity,
        }
    }
}

/// A connection counted in all, against its source, and (once named) its destination.
pub struct ConnectionPermit {
    limits: Arc<Limits>,
    source: IpAddr,
    destination: Option<IpAddr>,
}

impl ConnectionPermit {
    /// Counts the connection against `destination` (instead of the one named before, when an
    /// attempt moves on to another endpoint).
    pub fn to(&mut self, destination: IpAddr) -> Result<(), Limit> {
        if self.destination == Some(destination) {
            return Ok(());
        }
        self.release_destination();
        let max = self.limits.settings.connections_per_destination;
        if !self.limits.by_destination.take(destination, max) {
            return Err(self.limits.refuse(Limit::ConnectionsPerDestination));
        }
        self.destination = Some(destination);
        Ok(())
    }

    fn release_destination(&mut self) {
        if let Some(destination) = self.destination.take() {
            self.limits.by_destination.give(&destination);
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.release_destination();
        self.limits.by_source.give(&self.source);
        self.limits.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct HandshakePermit {
    limits: Arc<Limits>,
    source: IpAddr,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        self.limits.handshakes_by_source.give(&self.source);
        self.limits.handshakes.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct TunnelPermit {
    limits: Arc<Limits>,
    peer: Identity,
}

impl Drop for TunnelPermit {
    fn drop(&mut self) {
        self.limits.tunnels_by_identity.give(&self.peer);
        self.limits.tunnels.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts per key; a key at zero is removed, so the table holds only what is held now.
struct Keyed<K>(Mutex<HashMap<K, usize>>);

impl<K> Default for Keyed<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq> Keyed<K> {
    fn take(&self, key: K, max: usize) -> bool {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match counts.entry(key) {
            Entry::Occupied(mut held) if *held.get() < max => *held.get_mut() += 1,
            Entry::Vacant(none) if max > 0 => {
                none.insert(1);
            }
            _ => return false,
        }
        true
    }

    fn give(&self, key: &K) {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(key);
            }
        }
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn limits(settings: LimitSettings) -> Arc<Limits> {
        Limits::new(settings, Arc::new(Metrics::new()))
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn small() -> LimitSettings {
        LimitSettings {
            connections: 4,
            connections_per_source: 2,
            connections_per_destination: 3,
            handshakes: 3,
            handshakes_per_source: 2,
            tunnels: 2,
            tunnels_per_identity: 1,
            streams_per_tunnel: 10,
        }
    }

    #[test]
    fn a_source_at_its_limit_leaves_room_for_others() {
        let limits = limits(small());
        let a1 = limits.connection(ip(1)).unwrap();
        let _a2 = limits.connection(ip(1)).unwrap();
        assert_eq!(
            limits.connection(ip(1)).err(),
            Some(Limit::ConnectionsPerSource)
        );
        let _b1 = limits.connection(ip(2)).unwrap();
        let _b2 = limits.connection(ip(2)).unwrap();
        assert_eq!(limits.connection(ip(3)).err(), Some(Limit::Connections));
        drop(a1);
        let _a3 = limits.connection(ip(1)).unwrap();
        let status = limits.status();
        assert_eq!(status.connections, 4);
        assert_eq!(status.refused["connections_per_source"], 1);
        assert_eq!(status.refused["connections"], 1);
    }

    #[test]
    fn destinations_are_counted_and_moved() {
        let limits = limits(LimitSettings {
            connections_per_source: 10,
            connections: 10,
            ..small()
        });
        let mut held: Vec<_> = (0..3)
            .map(|_| {
                let mut p = limits.connection(ip(1)).unwrap();
                p.to(ip(9)).unwrap();
                p
            })
            .collect();
        let mut next = limits.connection(ip(1)).unwrap();
        assert_eq!(next.to(ip(9)), Err(Limit::ConnectionsPerDestination));
        next.to(ip(8)).unwrap();
        // Moving one of the three to another endpoint frees its place at the first.
        held[0].to(ip(7)).unwrap();
        next.to(ip(9)).unwrap();
        drop(held);
        drop(next);
        let status = limits.status();
        assert_eq!(
            (status.connections, status.sources, status.destinations),
            (0, 0, 0)
        );
    }

    #[test]
    fn handshakes_and_tunnels_are_bounded_per_source_and_identity() {
        let limits = limits(small());
        let h1 = limits.handshake(ip(1)).unwrap();
        let _h2 = limits.handshake(ip(1)).unwrap();
        assert_eq!(
            limits.handshake(ip(1)).err(),
            Some(Limit::HandshakesPerSource)
        );
        let _h3 = limits.handshake(ip(2)).unwrap();
        assert_eq!(limits.handshake(ip(3)).err(), Some(Limit::Handshakes));
        drop(h1);
        assert!(limits.handshake(ip(3)).is_ok());

        let peer = Identity::new("cluster.local", "shop", "web").unwrap();
        let other = Identity::new("cluster.local", "shop", "api").unwrap();
        let t = limits.tunnel(&peer).unwrap();
        assert_eq!(limits.tunnel(&peer).err(), Some(Limit::TunnelsPerIdentity));
        let _u = limits.tunnel(&other).unwrap();
        drop(t);
        assert!(limits.tunnel(&peer).is_ok());
    }

    #[test]
    fn overrides_replace_defaults_and_shares_follow_their_total() {
        let given = LimitOverrides {
            connections: Some(400),
            handshakes_per_source: Some(3),
            ..LimitOverrides::default()
        };
        let s = given.resolve(20_000);
        assert_eq!(
            (
                s.connections,
                s.connections_per_source,
                s.connections_per_destination
            ),
            (400, 100, 200)
        );
        assert_eq!((s.handshakes, s.handshakes_per_source), (1024, 3));
        assert_eq!(
            LimitOverrides::default().resolve(20_000),
            LimitSettings::for_open_files(20_000)
        );
    }

    #[test]
    fn defaults_fit_the_open_files_limit() {
        for files in [128u64, 1024, 20_000, 1 << 20] {
            let s = LimitSettings::for_open_files(files);
            let descriptors = 2 * s.connections + s.handshakes + s.tunnels;
            assert!(
                descriptors as u64 <= files,
                "{files} files: {s:?} needs {descriptors}"
            );
            assert!(s.connections_per_source < s.connections);
            assert!(s.handshakes_per_source < s.handshakes || s.handshakes == 1);
        }
        let s = LimitSettings::for_open_files(20_000);
        assert_eq!(
            (s.connections, s.connections_per_source, s.handshakes),
            (7790, 1947, 1024)
        );
        assert_eq!(
            LimitSettings::for_open_files(1 << 20).connections,
            MAX_CONNECTIONS
        );
    }
}
