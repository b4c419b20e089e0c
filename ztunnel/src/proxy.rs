//! The L4 data path: inbound HBONE (authorize, then connect to the app) and outbound (resolve the
//! original destination, then HBONE, plain TCP or passthrough). Plain structs and async functions.

pub mod inbound;
pub mod outbound;

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use mesh_core::identity::SpiffeId;
use mesh_core::proto::workload::Workload;

use crate::certificates::CertificateManager;
use crate::state::{NetworkAddress, State};

/// What both directions share.
#[derive(Debug)]
pub struct Context<S> {
    pub state: Arc<RwLock<State>>,
    pub certificates: Arc<CertificateManager<S>>,
    /// This ztunnel's node: inbound serves only workloads scheduled here.
    pub node: String,
    pub network: String,
}

impl<S> Context<S> {
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
}

/// A workload's SPIFFE identity (Istio leaves the default trust domain and account empty).
pub fn identity_of(workload: &Workload) -> Result<SpiffeId, mesh_core::identity::SpiffeIdError> {
    let trust_domain = if workload.trust_domain.is_empty() {
        "cluster.local"
    } else {
        &workload.trust_domain
    };
    let service_account = if workload.service_account.is_empty() {
        "default"
    } else {
        &workload.service_account
    };
    SpiffeId::new(trust_domain, workload.namespace.as_str(), service_account)
}
