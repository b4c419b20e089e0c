//! Enrolment of this node's workloads. Each HBONE workload scheduled here gets inbound HBONE
//! (15008), inbound plaintext (15006) and outbound (15001) listeners, the last two fed by capture
//! rules that redirect the workload's connections, and its certificate is prefetched. In `inpod`
//! mode the listeners and rules live in the pod's network namespace ([`crate::redirect`]); in
//! `shared` mode the listeners sit on the pod's address in ztunnel's own namespace. Workloads
//! that leave (or stop being ambient) have their listeners drained, their rules removed and their
//! certificate forgotten; a clean exit removes every rule.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use mesh_core::admin::ReadyGuard;
use mesh_core::hbone::{self, Server};
use mesh_core::identity::SpiffeId;
use mesh_core::net::original_destination;
use mesh_core::proto::workload::TunnelProtocol;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::proxy::outbound::Outbound;
use crate::proxy::{Context, identity_of, inbound};
use crate::redirect::netns::NetNs;
use crate::redirect::{self, PodSockets, rules};
use mesh_core::certificates::CertificateSource;
use mesh_core::state::ip_from_bytes;

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
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    let drained = drain.signaled();
    tokio::pin!(drained);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => { warn!(port, %error, "accept failed"); continue }
            },
            _ = &mut drained => return,
        };
        let _ = stream.set_nodelay(true);
        match original_destination(&stream) {
            // Made to the listener itself, not redirected: carrying it would loop.
            Ok(destination) if destination.port() == port && stream.local_addr().ok() == Some(destination) => {
                debug!(%peer, %destination, "connection was not redirected; closing it")
            }
            Ok(destination) => drop(tokio::spawn(handle(stream, peer, destination))),
            Err(error) => warn!(%peer, %error, "cannot read the original destination; closing"),
        }
    }
}

/// Where a workload's listeners go.
#[derive(Clone, Debug)]
pub enum Enrolment {
    Shared,
    Inpod {
        sockets: Arc<PodSockets>,
        netns_dir: PathBuf,
        mark: u32,
    },
}

/// A workload being served.
struct Enrolled {
    identity: SpiffeId,
    signal: drain::Signal,
    netns: Option<Arc<NetNs>>,
}

impl Enrolment {
    /// Opens the three listeners of the workload at `ip` (and in `inpod` mode finds its namespace
    /// and installs its rules first); the namespace it used, if any.
    async fn enrol<S: CertificateSource>(
        &self,
        context: &Arc<Context<S>>,
        outbound: &Arc<Outbound<S>>,
        ip: IpAddr,
        watch: drain::Watch,
    ) -> std::io::Result<Option<Arc<NetNs>>> {
        let (listeners, netns) = match self {
            Self::Shared => {
                let bind = |port| TcpListener::bind(SocketAddr::new(ip, port));
                (
                    (
                        bind(hbone::PORT).await?,
                        bind(INBOUND_PLAINTEXT_PORT).await?,
                        bind(OUTBOUND_PORT).await?,
                    ),
                    None,
                )
            }
            Self::Inpod {
                sockets,
                netns_dir,
                mark,
            } => {
                let (directory, mark) = (netns_dir.clone(), *mark);
                let netns = tokio::task::spawn_blocking(move || {
                    NetNs::find_by_ip(ip, &directory)
                        .map(Arc::new)
                        .ok_or_else(|| std::io::Error::other(format!("no network namespace holds {ip}")))
                })
                .await??;
                // Listeners first, rules second: the pod's traffic is never redirected to nothing.
                let any = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0);
                let bind = |port| redirect::listen_in(&netns, SocketAddr::new(any.ip(), port));
                let listeners = (bind(hbone::PORT)?, bind(INBOUND_PLAINTEXT_PORT)?, bind(OUTBOUND_PORT)?);
                sockets.insert(ip, netns.clone());
                let installed = netns.clone();
                if let Err(error) = tokio::task::spawn_blocking(move || rules::install(&installed, mark)).await? {
                    sockets.remove(ip);
                    return Err(error);
                }
                (listeners, Some(netns))
            }
        };
        let (hbone, plaintext, outgoing) = listeners;

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
        Ok(netns)
    }

    /// Rules first, listeners second: no new connection is redirected to a listener that is
    /// going away, and open ones finish while the listeners drain.
    async fn unenrol(&self, ip: IpAddr, enrolled: Enrolled) {
        if let (Self::Inpod { sockets, .. }, Some(netns)) = (self, enrolled.netns) {
            let removed = tokio::task::spawn_blocking(move || rules::remove(&netns)).await;
            if let Ok(Err(error)) = removed {
                warn!(%ip, %error, "could not remove capture rules");
            }
            enrolled.signal.drain().await;
            sockets.remove(ip);
        } else {
            enrolled.signal.drain().await;
        }
    }
}

/// Keeps listeners in step with the state until `drain` fires. `certificates_ready` is released
/// once the first state from xDS has arrived and every local workload has its certificate.
pub async fn manage<S: CertificateSource>(
    context: Arc<Context<S>>,
    outbound: Arc<Outbound<S>>,
    enrolment: Enrolment,
    mut changes: watch::Receiver<u64>,
    drain: drain::Watch,
    mut certificates_ready: Option<ReadyGuard>,
) {
    let mut running: BTreeMap<IpAddr, Enrolled> = BTreeMap::new();
    let drained = drain.clone().signaled();
    tokio::pin!(drained);
    loop {
        let synced = *changes.borrow_and_update() > 0;
        let wanted = local_workloads(&context);
        for (ip, enrolled) in running
            .extract_if(.., |ip, _| !wanted.contains_key(ip))
            .collect::<Vec<_>>()
        {
            info!(%ip, identity = %enrolled.identity, "workload left this node or the mesh; unenrolling it");
            let enrolment = enrolment.clone();
            tokio::spawn(async move { enrolment.unenrol(ip, enrolled).await });
        }
        let kept: BTreeSet<&SpiffeId> = running.values().map(|e| &e.identity).chain(wanted.values()).collect();
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
            match enrolment.enrol(&context, &outbound, *ip, watch).await {
                Ok(netns) => {
                    context.certificates.prefetch(identity);
                    let place = netns.as_ref().map(|n| n.path().display().to_string());
                    info!(%ip, %identity, netns = place.as_deref().unwrap_or("shared"), "enrolled a local workload");
                    running.insert(
                        *ip,
                        Enrolled {
                            identity: identity.clone(),
                            signal,
                            netns,
                        },
                    );
                }
                Err(error) => {
                    tokio::spawn(signal.drain());
                    warn!(%ip, %identity, %error, "cannot enrol this workload yet; retrying")
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
        // A pod whose namespace is not there yet is retried without waiting for a change.
        let pending = wanted.keys().any(|ip| !running.contains_key(ip));
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(RETRY_INTERVAL), if pending => {}
            _ = &mut drained => break,
        }
    }
    for (ip, enrolled) in running {
        enrolment.unenrol(ip, enrolled).await;
    }
}

/// How often enrolment is retried for workloads that could not be enrolled.
const RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
