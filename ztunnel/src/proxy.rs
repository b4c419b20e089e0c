//! The L4 data path: inbound (HBONE on 15008, plaintext on 15006: authorize, then connect to the
//! app) and outbound (15001 or SOCKS5: resolve the original destination, then HBONE, plain TCP or
//! passthrough). Plain structs and async functions; [`connection`] does the bookkeeping.

pub mod connection;
pub mod copy;
pub mod inbound;
pub mod metrics;
pub mod outbound;

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use mesh_core::net::{Connector, SocketFactory};
use mesh_core::proto::workload::Workload;

use mesh_core::certificates::CertificateManager;
use mesh_core::state::{NetworkAddress, State};

/// What both directions share.
#[derive(Debug)]
pub struct Context<S> {
    pub state: Arc<RwLock<State>>,
    pub certificates: Arc<CertificateManager<S>>,
    /// This ztunnel's node: inbound serves only workloads scheduled here.
    pub node: String,
    pub network: String,
    pub metrics: metrics::TcpMetrics,
    /// Inbound connections open now, re-checked when policy changes.
    pub connections: Arc<connection::OpenConnections>,
    /// Creates the sockets of connections to apps and peers (in the right pod's namespace,
    /// marked so capture rules skip them).
    pub sockets: Arc<dyn SocketFactory>,
    /// Every open connection holds a token of it, so a graceful stop waits for them (up to its
    /// deadline): see [`Context::track_in_flight`].
    pub in_flight: tokio_util::task::TaskTracker,
    /// The bounds every HBONE listener of this ztunnel shares (connections and streams per peer
    /// identity and in total, handshakes): one pod's listener flooded never starves the others.
    pub admission: Arc<mesh_core::hbone::Admission>,
}

impl<S> Context<S> {
    pub fn new(state: Arc<RwLock<State>>, certificates: Arc<CertificateManager<S>>, node: &str, network: &str) -> Self {
        Self {
            state,
            certificates,
            node: node.to_owned(),
            network: network.to_owned(),
            metrics: metrics::TcpMetrics::default(),
            connections: Arc::default(),
            sockets: Connector::default().shared(),
            in_flight: tokio_util::task::TaskTracker::new(),
            admission: Arc::default(),
        }
    }

    /// Holds `drain` until every open connection has ended once draining started.
    pub async fn track_in_flight(&self, drain: drain::Watch) {
        let release = drain.signaled().await;
        self.in_flight.close();
        let open = self.in_flight.len();
        if open > 0 {
            tracing::info!(open, "waiting for open connections to end");
        }
        self.in_flight.wait().await;
        drop(release);
    }

    /// The workload at `ip` on this ztunnel's network.
    pub fn workload_at(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let state = self.state.read().expect("not poisoned");
        state
            .workload_by_ip(&NetworkAddress {
                network: self.network.clone(),
                ip,
            })
            .cloned()
    }

    /// The workload at `ip` if it is scheduled on this node.
    pub fn local_workload_at(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.workload_at(ip).filter(|w| w.node == self.node)
    }

    /// Closes the inbound connections that the current policies deny; how many it closed.
    pub fn recheck_connections(&self) -> usize {
        let state = self.state.read().expect("not poisoned");
        self.connections.recheck(&state)
    }
}

pub use mesh_core::state::identity_of;
