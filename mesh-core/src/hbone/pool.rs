//! Client side of HBONE: a pool of mTLS HTTP/2 connections keyed by
//! {source identity, destination identity, destination address}, many CONNECT streams each.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use super::{H2Settings, H2Stream, HANDSHAKE_TIMEOUT, HboneError, Transport};
use crate::identity::{SpiffeId, WorkloadCertificate, tls};
use crate::net::{self, Connector, SocketFactory};

/// Which connections may carry a stream: same client identity, same expected server identity,
/// same address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub destination: SpiffeId,
    pub address: SocketAddr,
    /// The address connections are made from (the source workload's), when it matters to the peer.
    pub source_address: Option<IpAddr>,
}

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Streams one connection carries before the pool opens another.
    pub max_streams_per_connection: usize,
    /// A connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    pub settings: H2Settings,
    /// Creates the TCP sockets (in the right namespace, marked when capture rules need it).
    pub sockets: Arc<dyn SocketFactory>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(30),
            settings: H2Settings::default(),
            sockets: Connector::default().shared(),
        }
    }
}

/// A cheaply cloned handle on the pool.
#[derive(Clone, Debug)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: PoolConfig,
    connections: Mutex<HashMap<PoolKey, Vec<Connection>>>,
    /// One dial at a time per key, so a burst of streams shares one new connection.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    next_id: AtomicU64,
}

#[derive(Clone, Debug)]
struct Connection {
    id: u64,
    sender: h2::client::SendRequest<Bytes>,
    state: Arc<ConnectionState>,
}

/// Stream count of a connection; `CLOSED` once it must never be handed out again.
#[derive(Debug)]
struct ConnectionState {
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
    stream_ended: Notify,
}

const CLOSED: usize = usize::MAX;

impl ConnectionState {
    fn try_reserve(self: &Arc<Self>, max: usize) -> Option<StreamGuard> {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != CLOSED && n < max).then(|| n + 1)
            })
            .ok()
            .map(|_| StreamGuard(self.clone()))
    }

    fn is_closed(&self) -> bool {
        self.streams.load(Ordering::Acquire) == CLOSED
    }

    fn close(&self) {
        self.streams.store(CLOSED, Ordering::Release);
    }

    /// Closes the connection if it still carries no stream.
    fn close_if_idle(&self) -> bool {
        self.streams
            .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Counts one stream on a connection for as long as it lives.
struct StreamGuard(Arc<ConnectionState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let previous = self
            .0
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n != CLOSED).then(|| n - 1));
        if previous == Ok(1) {
            *self.0.idle_since.lock().expect("not poisoned") = Instant::now();
        }
        self.0.stream_ended.notify_one();
    }
}

impl Pool {
    pub fn new(config: PoolConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                connections: Mutex::default(),
                dialing: Mutex::default(),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Opens a CONNECT stream to `authority` through the connection for `key`, reusing one with
    /// room or dialing a new one with `certificate` (whose identity is `key.source`).
    pub async fn connect(
        &self,
        key: &PoolKey,
        certificate: &WorkloadCertificate,
        authority: SocketAddr,
        headers: HeaderMap,
    ) -> Result<H2Stream, HboneError> {
        debug_assert_eq!(certificate.identity(), &key.source, "pool key and certificate disagree");
        if let Some((connection, guard)) = self.checkout(key) {
            match send_connect(&connection, guard, key.address, authority, headers.clone()).await {
                // A pooled connection may have died since it was last used: try a fresh one.
                Err(HboneError::H2 { .. }) => connection.state.close(),
                result => return result,
            }
        }
        let (connection, guard) = self.checkout_or_dial(key, certificate).await?;
        send_connect(&connection, guard, key.address, authority, headers).await
    }

    /// How many open connections the pool holds (for tests and metrics).
    pub fn connection_count(&self) -> usize {
        let connections = self.inner.connections.lock().expect("not poisoned");
        connections.values().flatten().filter(|c| !c.state.is_closed()).count()
    }

    fn checkout(&self, key: &PoolKey) -> Option<(Connection, StreamGuard)> {
        let mut connections = self.inner.connections.lock().expect("not poisoned");
        let list = connections.get_mut(key)?;
        list.retain(|c| !c.state.is_closed());
        let max = self.inner.config.max_streams_per_connection;
        list.iter().find_map(|c| Some((c.clone(), c.state.try_reserve(max)?)))
    }

    async fn checkout_or_dial(
        &self,
        key: &PoolKey,
        certificate: &WorkloadCertificate,
    ) -> Result<(Connection, StreamGuard), HboneError> {
        let dial_lock = {
            let mut dialing = self.inner.dialing.lock().expect("not poisoned");
            dialing.entry(key.clone()).or_default().clone()
        };
        let _dialing = dial_lock.lock().await;
        if let Some(found) = self.checkout(key) {
            return Ok(found);
        }
        let result = self.dial(key, certificate).await;
        {
            let mut dialing = self.inner.dialing.lock().expect("not poisoned");
            // Only the map and this call hold it: nobody else waits, forget the key.
            if Arc::strong_count(&dial_lock) <= 2 {
                dialing.remove(key);
            }
        }
        let connection = result?;
        // A server may close a connection right after its handshake (GOAWAY: too many
        // connections of this peer, say); the stream sent on it then fails with the reason.
        let guard = connection
            .state
            .try_reserve(usize::MAX - 1)
            .unwrap_or_else(|| StreamGuard(connection.state.clone()));
        self.inner
            .connections
            .lock()
            .expect("not poisoned")
            .entry(key.clone())
            .or_default()
            .push(connection.clone());
        Ok((connection, guard))
    }

    async fn dial(&self, key: &PoolKey, certificate: &WorkloadCertificate) -> Result<Connection, HboneError> {
        let address = key.address;
        let (settings, sockets) = (self.inner.config.settings, self.inner.config.sockets.clone());
        let tls_config = Arc::new(tls::client_config(certificate, vec![key.destination.clone()])?);
        let handshake = async {
            let tcp = net::connect(&*sockets, address, key.source_address)
                .await
                .map_err(|source| HboneError::Connect { address, source })?;
            let mut tls = tokio_rustls::TlsConnector::from(tls_config)
                .connect(ServerName::IpAddress(address.ip().into()), Transport::new(tcp))
                .await
                .map_err(|source| handshake_error(key, source))?;
            tls.get_mut().0.buffer();
            h2::client::Builder::new()
                .initial_window_size(settings.stream_window)
                .initial_connection_window_size(settings.connection_window)
                .max_frame_size(settings.max_frame_size)
                .max_concurrent_streams(settings.max_concurrent_streams)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| HboneError::H2 { address, source })
        };
        let (sender, connection) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| HboneError::Timeout { address })??;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnectionState {
            streams: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            stream_ended: Notify::new(),
        });
        debug!(%address, source = %key.source, destination = %key.destination, id, "HBONE connection established");
        tokio::spawn(drive(
            connection,
            state.clone(),
            Arc::downgrade(&self.inner),
            key.clone(),
            id,
        ));
        Ok(Connection { id, sender, state })
    }
}

impl Inner {
    fn remove(&self, key: &PoolKey, id: u64) {
        let mut connections = self.connections.lock().expect("not poisoned");
        if let Some(list) = connections.get_mut(key) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                connections.remove(key);
            }
        }
    }
}

/// Runs the HTTP/2 connection until it fails or stays idle too long; either way it leaves the pool.
async fn drive(
    connection: h2::client::Connection<tokio_rustls::client::TlsStream<Transport>, Bytes>,
    state: Arc<ConnectionState>,
    pool: Weak<Inner>,
    key: PoolKey,
    id: u64,
) {
    let idle_timeout = pool.upgrade().map(|p| p.config.idle_timeout).unwrap_or_default();
    tokio::pin!(connection);
    tokio::select! {
        result = &mut connection => {
            if let Err(error) = result {
                debug!(address = %key.address, id, %error, "HBONE connection failed");
            }
        }
        () = idle_expired(&state, idle_timeout) => {
            debug!(address = %key.address, id, "closing idle HBONE connection");
            // Dropping the pool's handle lets h2 send GOAWAY and finish.
            if let Some(pool) = pool.upgrade() {
                pool.remove(&key, id);
            }
            let _ = connection.await;
        }
    }
    state.close();
    if let Some(pool) = pool.upgrade() {
        pool.remove(&key, id);
    }
}

/// Resolves once the connection has carried no stream for `timeout` and has been marked closed.
async fn idle_expired(state: &ConnectionState, timeout: Duration) {
    loop {
        let streams = state.streams.load(Ordering::Acquire);
        if streams == CLOSED {
            // Closed because it broke: the connection future ends on its own.
            return std::future::pending().await;
        }
        if streams > 0 {
            state.stream_ended.notified().await;
            continue;
        }
        let deadline = *state.idle_since.lock().expect("not poisoned") + timeout;
        if Instant::now() >= deadline {
            if state.close_if_idle() {
                return;
            }
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            () = state.stream_ended.notified() => {}
        }
    }
}

async fn send_connect(
    connection: &Connection,
    guard: StreamGuard,
    address: SocketAddr,
    authority: SocketAddr,
    headers: HeaderMap,
) -> Result<H2Stream, HboneError> {
    let h2_error = |source| HboneError::H2 { address, source };
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .body(())
        .map_err(|source| HboneError::Request { authority, source })?;
    request.headers_mut().extend(headers);
    let mut sender = connection.sender.clone().ready().await.map_err(h2_error)?;
    let (response, send) = sender.send_request(request, false).map_err(h2_error)?;
    let response = response.await.map_err(h2_error)?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status {
            address,
            authority,
            status: response.status(),
        });
    }
    Ok(H2Stream::new(send, response.into_body(), Some(Box::new(guard))))
}

/// Turns a failed client handshake into the most precise error: a wrong server identity names
/// both identities.
fn handshake_error(key: &PoolKey, source: std::io::Error) -> HboneError {
    let mismatch = tls::identity_mismatch(&source);
    match mismatch {
        Some(mismatch) => HboneError::IdentityMismatch {
            address: key.address,
            mismatch,
        },
        None => HboneError::Handshake {
            address: key.address,
            expected: key.destination.clone(),
            source,
        },
    }
}
