//! Listeners for this node's workloads. Each HBONE workload scheduled here gets, on its own
//! address: inbound HBONE (15008), inbound plaintext (15006) and outbound (15001), the last two
//! fed by capture rules that redirect the workload's connections; its certificate is prefetched.
//! Workloads that leave have their listeners drained and their certificate forgotten.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::admin::ReadyGuard;
use mesh_core::hbone::{self, Server};
use mesh_core::identity::SpiffeId;
use mesh_core::net::original_destination;
use mesh_core::proto::workload::TunnelProtocol;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::certificates::CertificateSource;
use crate::proxy::outbound::Outbound;
use crate::proxy::{Context, identity_of, inbound};
use crate::state::ip_from_bytes;

/// Outbound connections redirected from a workload (its netns' 15001).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext connections redirected to a workload (15006).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

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

/// Accepts redirected connections until drained; each goes to `handle` with its original
/// destination. A connection made straight to the listener (no redirect) would loop; it is closed.
async fn serve_redirected<H, F>(listener: TcpListener, drain: drain::Watch, handle: H)
where
    H: Fn(TcpStream, SocketAddr, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    let drained = drain.signaled();
    tokio::pin!(drained);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => { warn!(?local, %error, "accept failed"); continue }
            },
            _ = &mut drained => return,
        };
        let _ = stream.set_nodelay(true);
        match original_destination(&stream) {
            Ok(destination) if Some(destination) != local => {
                tokio::spawn(handle(stream, peer, destination));
            }
            Ok(_) => debug!(%peer, ?local, "connection was not redirected; closing it"),
            Err(error) => warn!(%peer, %error, "cannot read the original destination; closing"),
        }
    }
}

/// The three listeners of one workload; fails when any address cannot be bound.
async fn serve_workload<S: CertificateSource>(
    context: &Arc<Context<S>>,
    outbound: &Arc<Outbound<S>>,
    ip: IpAddr,
    watch: drain::Watch,
) -> std::io::Result<()> {
    let hbone = TcpListener::bind(SocketAddr::new(ip, hbone::PORT)).await?;
    let plaintext = TcpListener::bind(SocketAddr::new(ip, INBOUND_PLAINTEXT_PORT)).await?;
    let outgoing = TcpListener::bind(SocketAddr::new(ip, OUTBOUND_PORT)).await?;

    let handler_context = context.clone();
    let handler = move |request| inbound::handle_hbone(handler_context.clone(), request);
    let server = Server::new(inbound::WorkloadCertificates(context.clone()));
    tokio::spawn(server.serve(hbone, handler, watch.clone()));

    let inbound_context = context.clone();
    tokio::spawn(serve_redirected(plaintext, watch.clone(), move |stream, _, target| {
        inbound::handle_plaintext(inbound_context.clone(), stream, target)
    }));

    let outbound = outbound.clone();
    tokio::spawn(serve_redirected(outgoing, watch, move |stream, peer, destination| {
        let outbound = outbound.clone();
        async move {
            match outbound.open(peer, destination).await {
                // The copying gets a task of its own, sized for it alone.
                Ok(opened) => drop(tokio::spawn(opened.carry(stream))),
                // Refusals are logged where they happen; this only adds the final word.
                Err(error) => debug!(%peer, %destination, %error, "outbound connection failed"),
            }
        }
    }));
    Ok(())
}

/// Keeps listeners in step with the state until `drain` fires. `certificates_ready` is released
/// once the first state from xDS has arrived and every local workload has its certificate.
pub async fn manage<S: CertificateSource>(
    context: Arc<Context<S>>,
    outbound: Arc<Outbound<S>>,
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
            info!(%ip, %identity, "workload left this node; draining its listeners");
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
            let (signal, watch) = drain::channel();
            match serve_workload(&context, &outbound, *ip, watch).await {
                Ok(()) => {
                    context.certificates.prefetch(identity);
                    info!(%ip, %identity, "serving a local workload");
                    running.insert(*ip, (identity.clone(), signal));
                }
                Err(error) => {
                    tokio::spawn(signal.drain());
                    warn!(%ip, %identity, %error, "cannot listen for this workload; retrying on the next change")
                }
            }
        }
        // Policies may have changed: connections they now deny are closed.
        let revoked = context.recheck_connections();
        if revoked > 0 {
            info!(revoked, "closed connections that policy now denies");
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
