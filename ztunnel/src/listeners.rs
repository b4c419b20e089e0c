//! Listeners for this node's workloads: each HBONE workload scheduled here gets an inbound HBONE
//! listener on its own address (port 15008), and its certificate is prefetched. Workloads that
//! leave have their listener drained and their certificate forgotten.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::admin::ReadyGuard;
use mesh_core::hbone::{self, Server};
use mesh_core::identity::SpiffeId;
use mesh_core::proto::workload::TunnelProtocol;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::certificates::CertificateSource;
use crate::proxy::{Context, identity_of, inbound};
use crate::state::ip_from_bytes;

/// The HBONE workloads of this node: address → identity.
fn local_workloads<S>(context: &Context<S>) -> BTreeMap<IpAddr, SpiffeId> {
    let state = context.state.read().expect("not poisoned");
    state
        .workloads()
        .filter(|w| w.node == context.node && w.tunnel_protocol == TunnelProtocol::Hbone as i32)
        .flat_map(|w| {
            let identity = identity_of(w).ok();
            w.addresses
                .iter()
                .filter_map(move |a| Some((ip_from_bytes(a)?, identity.clone()?)))
        })
        .collect()
}

/// Keeps listeners in step with the state until `drain` fires. `certificates_ready` is released
/// once the first state from xDS has arrived and every local workload has its certificate.
pub async fn manage<S: CertificateSource>(
    context: Arc<Context<S>>,
    mut changes: watch::Receiver<u64>,
    drain: drain::Watch,
    mut certificates_ready: Option<ReadyGuard>,
) {
    let mut running: BTreeMap<IpAddr, (SpiffeId, drain::Signal)> = BTreeMap::new();
    let drained = drain.clone().signaled();
    tokio::pin!(drained);
    loop {
        let synced = *changes.borrow_and_update() > 0;
        let wanted = local_workloads(&context);
        for (ip, (identity, signal)) in running
            .extract_if(.., |ip, _| !wanted.contains_key(ip))
            .collect::<Vec<_>>()
        {
            info!(%ip, %identity, "workload left this node; draining its listener");
            tokio::spawn(signal.drain());
        }
        let kept: BTreeSet<&SpiffeId> = running.values().map(|(id, _)| id).chain(wanted.values()).collect();
        for identity in context.certificates.held().into_iter().map(|(id, _)| id) {
            if !kept.contains(&identity) {
                context.certificates.forget(&identity);
            }
        }
        for (ip, identity) in &wanted {
            if running.contains_key(ip) {
                continue;
            }
            match TcpListener::bind(SocketAddr::new(*ip, hbone::PORT)).await {
                Ok(listener) => {
                    let (signal, watch) = drain::channel();
                    let handler_context = context.clone();
                    let handler = move |request| inbound::handle(handler_context.clone(), request);
                    let server = Server::new(inbound::WorkloadCertificates(context.clone()));
                    tokio::spawn(server.serve(listener, handler, watch));
                    context.certificates.prefetch(identity);
                    info!(%ip, %identity, "serving HBONE for a local workload");
                    running.insert(*ip, (identity.clone(), signal));
                }
                Err(error) => {
                    warn!(%ip, %identity, %error, "cannot listen for this workload; retrying on the next change")
                }
            }
        }
        if synced && certificates_ready.is_some() {
            let mut all = true;
            for identity in wanted.values().collect::<BTreeSet<_>>() {
                if let Err(error) = context.certificates.get(identity).await {
                    warn!(%identity, %error, "certificate not ready");
                    all = false;
                }
            }
            if all {
                certificates_ready.take();
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = &mut drained => break,
        }
    }
    for (_, (_, signal)) in running {
        signal.drain().await;
    }
}
