//! Bounds on what HBONE peers may take of a server, so that a flood from one peer never denies
//! the others: connections in total and per peer identity, CONNECT streams per peer identity
//! (across its connections; each stream holds a socket to an app), TLS handshakes in progress (in
//! total and per source address, so that one flooding address cannot take every place; when all
//! are taken, the oldest handshake makes room if it has had [`EVICTION_AGE`], since legitimate ones
//! finish in milliseconds) and how long one may take, and the size of a request's header block. One [`Admission`] is shared
//! by every listener of a process (ztunnel serves each pod on a listener of its own); each refusal
//! is counted by bound in `hbone_server_limit_refusals_total`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::{debug, warn};

use crate::identity::SpiffeId;

/// The bounds of an HBONE server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once, all peers together, handshakes included.
    pub max_connections: usize,
    /// Established connections of one peer identity.
    pub max_connections_per_peer: usize,
    /// Open CONNECT streams of one peer identity, over all its connections.
    pub max_streams_per_peer: usize,
    /// Connections still in their TLS or HTTP/2 handshake.
    pub max_pending_handshakes: usize,
    /// Of those, from one source address.
    pub max_pending_handshakes_per_source: usize,
    /// How long the TLS and HTTP/2 handshakes may take together.
    pub handshake_timeout: Duration,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: a larger request header block is refused (431, or the
    /// connection closed with COMPRESSION_ERROR when it is far larger).
    pub max_header_list_size: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_peer: 256,
            max_streams_per_peer: 8_192,
            max_pending_handshakes: 1_024,
            max_pending_handshakes_per_source: 64,
            handshake_timeout: Duration::from_secs(5),
            max_header_list_size: 64 * 1024,
        }
    }
}

/// The bounds as flags (flattened into a binary's `Config`).
#[derive(Clone, Debug, clap::Args)]
pub struct LimitArgs {
    /// HBONE connections served at once, all peers together (handshakes included).
    #[arg(long = "hbone-max-connections", env = "HBONE_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// HBONE connections one peer identity may hold at once.
    #[arg(long = "hbone-max-connections-per-peer", env = "HBONE_MAX_CONNECTIONS_PER_PEER", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_peer: u32,
    /// Tunnelled connections (CONNECT streams) one peer identity may hold open at once.
    #[arg(long = "hbone-max-streams-per-peer", env = "HBONE_MAX_STREAMS_PER_PEER", default_value_t = 8_192, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_peer: u32,
    /// HBONE connections allowed in their TLS/HTTP/2 handshake at once; more are reset.
    #[arg(long = "hbone-max-pending-handshakes", env = "HBONE_MAX_PENDING_HANDSHAKES", default_value_t = 1_024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_handshakes: u32,
    /// Of those, from one source address.
    #[arg(long = "hbone-max-pending-handshakes-per-source", env = "HBONE_MAX_PENDING_HANDSHAKES_PER_SOURCE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_handshakes_per_source: u32,
    /// How long an HBONE handshake (TLS and HTTP/2) may take (e.g. 5s, 500ms).
    #[arg(long = "hbone-handshake-timeout", env = "HBONE_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub handshake_timeout: Duration,
    /// Largest request header block accepted, in bytes.
    #[arg(long = "hbone-max-header-list-size", env = "HBONE_MAX_HEADER_LIST_SIZE", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_header_list_size: u32,
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        Ok(_) => Err(format!("{text:?}: must be longer than zero")),
        Err(error) => Err(format!("{text:?}: {error}")),
    }
}

impl LimitArgs {
    pub fn limits(&self) -> ServerLimits {
        let count = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
        ServerLimits {
            max_connections: count(self.max_connections),
            max_connections_per_peer: count(self.max_connections_per_peer),
            max_streams_per_peer: count(self.max_streams_per_peer),
            max_pending_handshakes: count(self.max_pending_handshakes),
            max_pending_handshakes_per_source: count(self.max_pending_handshakes_per_source),
            handshake_timeout: self.handshake_timeout,
            max_header_list_size: self.max_header_list_size,
        }
    }
}

/// Which bound refused a connection or a stream.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Limit {
    connections,
    peer_connections,
    peer_streams,
    pending_handshakes,
    source_pending_handshakes,
    handshake_timeout,
}

const LIMITS: usize = 6;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: Limit,
}

/// How long a handshake has had before a new connection may close it to take its place, when
/// every place is taken (at most a quarter of the handshake timeout).
pub const EVICTION_AGE: Duration = Duration::from_millis(100);

/// The handshakes in progress.
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    /// Oldest first: when each started, and the signal that closes it to make room.
    started: BTreeMap<u64, (Instant, Arc<Notify>)>,
    by_source: HashMap<IpAddr, usize>,
}

#[derive(Debug, Default)]
struct PeerUse {
    connections: usize,
    streams: usize,
}

/// What every listener of a process has admitted; cheap to share (`Arc`).
#[derive(Debug)]
pub struct Admission {
    limits: ServerLimits,
    connections: AtomicUsize,
    pending: Mutex<Pending>,
    peers: Mutex<HashMap<SpiffeId, PeerUse>>,
    refusals: Family<LimitLabels, Counter>,
    /// When each bound was last reported in the log (ms since `started`), to say it once a second.
    warned: [AtomicU64; LIMITS],
    started: Instant,
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(ServerLimits::default())
    }
}

/// Takes one from `counter` unless it is at `max`.
fn try_increment(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
        .is_ok()
}

impl Admission {
    pub fn new(limits: ServerLimits) -> Self {
        Self {
            limits,
            connections: AtomicUsize::new(0),
            pending: Mutex::default(),
            peers: Mutex::default(),
            refusals: Family::default(),
            warned: Default::default(),
            started: Instant::now(),
        }
    }

    /// Registers the refusal counter in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "hbone_server_limit_refusals",
            "Connections and streams an HBONE server refused because a bound was reached",
            self.refusals.clone(),
        );
    }

    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    /// Connections in their handshake now.
    pub fn handshakes_in_progress(&self) -> usize {
        self.pending.lock().expect("not poisoned").started.len()
    }

    /// Connections served now (handshakes included).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// How often `limit` refused something.
    pub fn refusals(&self, limit: Limit) -> u64 {
        self.refusals.get_or_create(&LimitLabels { limit }).get()
    }

    /// Counts a refusal; logs it, at most once a second per bound.
    pub(super) fn refused(&self, limit: Limit, peer: SocketAddr, identity: Option<&SpiffeId>) {
        self.refusals.get_or_create(&LimitLabels { limit }).inc();
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = &self.warned[limit as usize];
        let previous = last.load(Ordering::Relaxed);
        let identity = identity.map(SpiffeId::to_string);
        let identity = identity.as_deref().unwrap_or("-");
        if (previous == 0 || now.saturating_sub(previous) >= 1000)
            && last
                .compare_exchange(previous, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(?limit, %peer, %identity, limits = ?self.limits, "HBONE bound reached: refusing (logged once a second; see hbone_server_limit_refusals_total)");
        } else {
            debug!(?limit, %peer, %identity, "HBONE bound reached: refusing");
        }
    }

    /// A connection just accepted from `source`: room for it in total and among the handshakes
    /// (its source's and all), or the bound that refuses it.
    pub(super) fn admit(self: &Arc<Self>, source: IpAddr) -> Result<(Admitted, Handshaking), Limit> {
        if !try_increment(&self.connections, self.limits.max_connections) {
            return Err(Limit::connections);
        }
        let admitted = Admitted(self.clone());
        let mut pending = self.pending.lock().expect("not poisoned");
        if pending.by_source.get(&source).copied().unwrap_or(0) >= self.limits.max_pending_handshakes_per_source {
            return Err(Limit::source_pending_handshakes);
        }
        if pending.started.len() >= self.limits.max_pending_handshakes {
            let age = EVICTION_AGE.min(self.limits.handshake_timeout / 4);
            match pending.started.first_key_value() {
                Some((_, (started, _))) if started.elapsed() >= age => {
                    let (_, (_, evict)) = pending.started.pop_first().expect("just seen");
                    evict.notify_one();
                }
                _ => return Err(Limit::pending_handshakes),
            }
        }
        let (seq, evicted) = (pending.next, Arc::new(Notify::new()));
        pending.next += 1;
        pending.started.insert(seq, (Instant::now(), evicted.clone()));
        *pending.by_source.entry(source).or_default() += 1;
        let handshaking = Handshaking {
            admission: self.clone(),
            source,
            seq,
            evicted,
        };
        Ok((admitted, handshaking))
    }

    /// A connection of `identity` past its handshake.
    pub(super) fn peer_connection(self: &Arc<Self>, identity: &SpiffeId) -> Result<PeerConnection, Limit> {
        let mut peers = self.peers.lock().expect("not poisoned");
        let peer = peers.entry(identity.clone()).or_default();
        if peer.connections >= self.limits.max_connections_per_peer {
            return Err(Limit::peer_connections);
        }
        peer.connections += 1;
        Ok(PeerConnection {
            admission: self.clone(),
            identity: identity.clone(),
        })
    }

    /// A CONNECT stream of `identity`.
    pub(super) fn stream(self: &Arc<Self>, identity: &SpiffeId) -> Result<StreamPermit, Limit> {
        let mut peers = self.peers.lock().expect("not poisoned");
        let peer = peers.entry(identity.clone()).or_default();
        if peer.streams >= self.limits.max_streams_per_peer {
            return Err(Limit::peer_streams);
        }
        peer.streams += 1;
        Ok(StreamPermit {
            admission: self.clone(),
            identity: identity.clone(),
        })
    }

    fn release(&self, identity: &SpiffeId, release: impl FnOnce(&mut PeerUse)) {
        let mut peers = self.peers.lock().expect("not poisoned");
        if let Some(peer) = peers.get_mut(identity) {
            release(peer);
            if peer.connections == 0 && peer.streams == 0 {
                peers.remove(identity);
            }
        }
    }
}

/// A connection's place in the total; released when it closes.
#[derive(Debug)]
pub(super) struct Admitted(Arc<Admission>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place among the handshakes in progress; released when the handshake ends, either way.
#[derive(Debug)]
pub(super) struct Handshaking {
    admission: Arc<Admission>,
    source: IpAddr,
    seq: u64,
    evicted: Arc<Notify>,
}

impl Handshaking {
    /// Resolves when a newer connection took this handshake's place.
    pub(super) async fn evicted(&self) {
        self.evicted.notified().await
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut pending = self.admission.pending.lock().expect("not poisoned");
        pending.started.remove(&self.seq);
        if let Some(count) = pending.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                pending.by_source.remove(&self.source);
            }
        }
    }
}

/// One of a peer's connections.
#[derive(Debug)]
pub(super) struct PeerConnection {
    admission: Arc<Admission>,
    identity: SpiffeId,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        self.admission.release(&self.identity, |peer| peer.connections -= 1);
    }
}

/// One of a peer's streams, held by the tunnel for as long as it lives.
#[derive(Debug)]
pub(super) struct StreamPermit {
    admission: Arc<Admission>,
    identity: SpiffeId,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.admission.release(&self.identity, |peer| peer.streams -= 1);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        limits: LimitArgs,
    }

    fn parse(args: &[&str]) -> Result<ServerLimits, String> {
        Flags::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .map(|flags| flags.limits.limits())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags_default_to_the_documented_bounds_and_refuse_zero() {
        assert_eq!(parse(&[]).unwrap(), ServerLimits::default());
        let limits = parse(&["--hbone-max-connections-per-peer=8", "--hbone-handshake-timeout=750ms"]).unwrap();
        assert_eq!(limits.max_connections_per_peer, 8);
        assert_eq!(limits.handshake_timeout, Duration::from_millis(750));
        let error = parse(&["--hbone-handshake-timeout=0s"]).unwrap_err();
        assert!(error.contains("\"0s\": must be longer than zero"), "{error}");
        let error = parse(&["--hbone-max-pending-handshakes=0"]).unwrap_err();
        assert!(error.contains("--hbone-max-pending-handshakes"), "{error}");
    }
}
