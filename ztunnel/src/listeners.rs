//! A pod's listeners: inbound HBONE (15008), inbound plaintext (15006) and outbound (15001), the
//! last two fed by the capture rules that redirect the pod's connections. In `inpod` mode they
//! live in the pod's network namespace, handed over by the node agent ([`crate::inpod`]); in
//! `shared` mode they sit on the pod's address in ztunnel's own namespace, enrolled from xDS by
//! [`manage`]: workloads that leave have their listeners drained and their certificate forgotten.

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

use crate::proxy::outbound::Outbound;
use crate::proxy::{Context, identity_of, inbound};
use crate::redirect;
use mesh_core::certificates::CertificateSource;
use mesh_core::netns::NetNs;
use mesh_core::state::ip_from_bytes;

pub use mesh_core::capture::{INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

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

/// The three listeners of one pod.
#[derive(Debug)]
pub struct PodListeners {
    hbone: TcpListener,
    plaintext: TcpListener,
    outbound: TcpListener,
}

impl PodListeners {
    /// On the pod's address in ztunnel's own namespace (`shared` mode).
    pub async fn bind_shared(ip: IpAddr) -> std::io::Result<Self> {
        let bind = |port| TcpListener::bind(SocketAddr::new(ip, port));
        Ok(Self {
            hbone: bind(hbone::PORT).await?,
            plaintext: bind(INBOUND_PLAINTEXT_PORT).await?,
            outbound: bind(OUTBOUND_PORT).await?,
        })
    }

    /// Inside the pod's namespace, on every address. Blocking (briefly enters the namespace).
    /// Connections queued on a listener that closes move to another of its port
    /// (`tcp_migrate_req`), so a ztunnel handing over to its successor drops none.
    pub fn bind_in(netns: &NetNs) -> std::io::Result<Self> {
        // /proc/sys/net is the namespace of the thread that opens it.
        let migrate = netns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"))?;
        if let Err(error) = migrate {
            warn!(netns = %netns.path().display(), %error, "cannot enable tcp_migrate_req: a handover may reset queued connections");
        }
        let bind = |port| redirect::listen_in(netns, SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port));
        Ok(Self {
            hbone: bind(hbone::PORT)?,
            plaintext: bind(INBOUND_PLAINTEXT_PORT)?,
            outbound: bind(OUTBOUND_PORT)?,
        })
    }

    /// Serves the pod until `watch` drains; the connections it accepted may outlive that.
    pub fn serve<S: CertificateSource>(
        self,
        context: &Arc<Context<S>>,
        outbound: &Arc<Outbound<S>>,
        watch: drain::Watch,
    ) {
        let handler_context = context.clone();
        let handler = move |request| inbound::handle_hbone(handler_context.clone(), request);
        let server =
            Server::new(inbound::WorkloadCertificates(context.clone())).with_admission(context.admission.clone());
        tokio::spawn(server.serve(self.hbone, handler, watch.clone()));

        let inbound_context = context.clone();
        tokio::spawn(serve_redirected(
            self.plaintext,
            watch.clone(),
            move |stream, _, target| inbound::handle_plaintext(inbound_context.clone(), stream, target),
        ));

        let outbound = outbound.clone();
        tokio::spawn(serve_redirected(
            self.outbound,
            watch,
            move |stream, peer, destination| {
                let outbound = outbound.clone();
                async move {
                    match outbound.open(peer, destination).await {
                        // The copying gets a task of its own, sized for it alone.
                        Ok(opened) => drop(tokio::spawn(opened.carry(stream))),
                        // Refusals are logged where they happen; this only adds the final word.
                        Err(error) => debug!(%peer, %destination, %error, "outbound connection failed"),
                    }
                }
            },
        ));
    }
}

/// A workload being served (`shared` mode).
struct Enrolled {
    identity: SpiffeId,
    signal: drain::Signal,
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
            tokio::spawn(enrolled.signal.drain());
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
            match PodListeners::bind_shared(*ip).await {
                Ok(listeners) => {
                    let (signal, watch) = drain::channel();
                    listeners.serve(&context, &outbound, watch);
                    context.certificates.prefetch(identity);
                    info!(%ip, %identity, "enrolled a local workload");
                    let identity = identity.clone();
                    running.insert(*ip, Enrolled { identity, signal });
                }
                Err(error) => warn!(%ip, %identity, %error, "cannot enrol this workload yet; retrying"),
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
    for enrolled in running.into_values() {
        enrolled.signal.drain().await;
    }
}

/// Closes the connections a policy change denies, whenever the state changes (`inpod` mode;
/// [`manage`] does it in `shared` mode).
pub async fn follow_policies<S>(context: Arc<Context<S>>, mut changes: watch::Receiver<u64>) {
    while changes.changed().await.is_ok() {
        let revoked = context.recheck_connections();
        if revoked > 0 {
            info!(revoked, "closed connections that policy now denies");
        }
    }
}

/// How often enrolment is retried for workloads that could not be enrolled.
const RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
