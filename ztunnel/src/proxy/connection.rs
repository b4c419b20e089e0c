//! One proxied connection's bookkeeping: Istio's TCP metrics and one access-log line when it ends,
//! and (inbound) a place in [`OpenConnections`] so a policy change can close it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

use mesh_core::identity::SpiffeId;
use mesh_core::proto::workload::{Service, Workload};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;
use tracing::info;

use super::copy::Transferred;
use super::metrics::{Peer, Reporter, ResponseFlags, SecurityPolicy, ServiceLabel, TcpLabels, TcpMetrics};
use mesh_core::state::State;
use mesh_core::state::authorization::{self, Connection};

/// One end of a connection, as far as it is known.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub workload: Option<Arc<Workload>>,
    pub identity: Option<SpiffeId>,
}

/// What a connection is: who to whom, through which service, how secured.
#[derive(Clone, Debug)]
pub struct Description {
    pub reporter: Reporter,
    pub source: Endpoint,
    pub destination: Endpoint,
    pub service: Option<Arc<Service>>,
    pub security: SecurityPolicy,
}

impl Description {
    fn labels(&self, flags: ResponseFlags) -> TcpLabels {
        let principal = |e: &Endpoint| e.identity.as_ref().map(SpiffeId::to_string);
        let (source_principal, destination_principal) = (principal(&self.source), principal(&self.destination));
        let mut labels = TcpLabels::new(
            self.reporter,
            Peer {
                workload: self.source.workload.as_deref(),
                principal: source_principal.as_deref(),
            },
            Peer {
                workload: self.destination.workload.as_deref(),
                principal: destination_principal.as_deref(),
            },
            self.service.as_deref().map(|s| ServiceLabel {
                hostname: &s.hostname,
                namespace: &s.namespace,
                name: &s.name,
            }),
            self.security,
        );
        labels.response_flags = flags;
        labels
    }

    fn log(&self, bytes: Transferred, duration_ms: u128, result: &str) {
        let name = |e: &Endpoint| e.workload.as_ref().map(|w| format!("{}/{}", w.namespace, w.name));
        let identity = |e: &Endpoint| e.identity.as_ref().map(SpiffeId::to_string);
        info!(
            target: "access",
            direction = match self.reporter { Reporter::source => "outbound", Reporter::destination => "inbound" },
            src.addr = %self.source.address,
            src.workload = name(&self.source).as_deref().unwrap_or("-"),
            src.identity = identity(&self.source).as_deref().unwrap_or("-"),
            dst.addr = %self.destination.address,
            dst.service = self.service.as_ref().map(|s| s.hostname.as_str()).unwrap_or("-"),
            dst.workload = name(&self.destination).as_deref().unwrap_or("-"),
            dst.identity = identity(&self.destination).as_deref().unwrap_or("-"),
            security = match self.security { SecurityPolicy::MutualTls => "mTLS", SecurityPolicy::Unknown => "plaintext" },
            bytes_sent = bytes.a_to_b,
            bytes_recv = bytes.b_to_a,
            duration_ms,
            result,
            "connection complete"
        );
    }

    /// Counts and logs a connection refused before any byte moved.
    pub fn refused(self, metrics: &TcpMetrics, flags: ResponseFlags, reason: &str) {
        let labels = self.labels(flags);
        metrics.opened.get_or_create(&labels).inc();
        metrics.closed.get_or_create(&labels).inc();
        self.log(Transferred::default(), 0, reason);
    }

    /// Counts the connection as opened; its counters then follow the bytes.
    /// Counts the connection open; `in_flight`, held until it closes, makes a drain wait for it.
    pub fn open(self, metrics: &TcpMetrics, in_flight: TaskTrackerToken) -> Accounting {
        let labels = self.labels(ResponseFlags::None);
        metrics.opened.get_or_create(&labels).inc();
        Accounting {
            _in_flight: in_flight,
            received: metrics.received.get_or_create(&labels).clone(),
            sent: metrics.sent.get_or_create(&labels).clone(),
            closed: metrics.closed.get_or_create(&labels).clone(),
            description: self,
            started: Instant::now(),
        }
    }
}

/// An open connection's counters, to be closed with its outcome.
#[derive(Debug)]
pub struct Accounting {
    pub description: Description,
    /// Client → server bytes.
    pub received: Counter,
    /// Server → client bytes.
    pub sent: Counter,
    closed: Counter,
    started: Instant,
    _in_flight: TaskTrackerToken,
}

impl Accounting {
    pub fn close(self, outcome: Result<Transferred, String>) {
        self.closed.inc();
        let duration_ms = self.started.elapsed().as_millis();
        match outcome {
            Ok(bytes) => self.description.log(bytes, duration_ms, "ok"),
            Err(error) => {
                // The counters saw every byte read, even when the copy failed half way.
                let bytes = Transferred {
                    a_to_b: self.received.get(),
                    b_to_a: self.sent.get(),
                };
                self.description.log(bytes, duration_ms, &error)
            }
        }
    }
}

/// What an inbound connection was authorized on, kept to decide it again when policy changes.
#[derive(Debug)]
struct Authorized {
    destination_workload: String,
    source_ip: IpAddr,
    source_identity: Option<SpiffeId>,
    destination: SocketAddr,
    close: Arc<Notify>,
}

/// The inbound connections open now.
#[derive(Debug, Default)]
pub struct OpenConnections {
    connections: Mutex<HashMap<u64, Authorized>>,
    next_id: AtomicU64,
}

/// A connection's place in [`OpenConnections`]; leaving it (drop) removes the entry.
#[derive(Debug)]
pub struct Registration {
    table: Arc<OpenConnections>,
    id: u64,
    close: Arc<Notify>,
}

impl Registration {
    /// Resolves when a policy change denies this connection.
    pub async fn revoked(&self) {
        self.close.notified().await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.connections.lock().expect("not poisoned").remove(&self.id);
    }
}

impl OpenConnections {
    pub fn register(self: &Arc<Self>, destination_workload: &Workload, connection: &Connection<'_>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.connections.lock().expect("not poisoned").insert(
            id,
            Authorized {
                destination_workload: destination_workload.uid.clone(),
                source_ip: connection.source_ip,
                source_identity: connection.source_identity.cloned(),
                destination: SocketAddr::new(connection.destination_ip, connection.destination_port),
                close: close.clone(),
            },
        );
        Registration {
            table: self.clone(),
            id,
            close,
        }
    }

    pub fn len(&self) -> usize {
        self.connections.lock().expect("not poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides every open connection again against `state`; closes and counts the denied ones.
    pub fn recheck(&self, state: &State) -> usize {
        let connections = self.connections.lock().expect("not poisoned");
        let mut closed = 0;
        for entry in connections.values() {
            let Some(workload) = state.workload(&entry.destination_workload) else {
                continue;
            };
            let connection = Connection {
                source_ip: entry.source_ip,
                source_identity: entry.source_identity.as_ref(),
                destination_ip: entry.destination.ip(),
                destination_port: entry.destination.port(),
            };
            if let Err(denied) = authorization::check(state.policies_for(workload).map(|p| p.as_ref()), &connection) {
                info!(
                    src.addr = %entry.source_ip,
                    src.identity = entry.source_identity.as_ref().map(SpiffeId::to_string).as_deref().unwrap_or("-"),
                    dst.addr = %entry.destination,
                    reason = %denied,
                    "closing an open connection that policy now denies"
                );
                entry.close.notify_one();
                closed += 1;
            }
        }
        closed
    }
}
