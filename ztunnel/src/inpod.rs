//! In-pod mode, driven by the node agent over ZDS (Istio's contract, so an Istio CNI agent can
//! drive this ztunnel and our agent an Istio ztunnel): ztunnel connects to the agent's socket and
//! says hello; the agent sends each pod's network namespace (capture rules already installed
//! there), then `SnapshotSent`, then pods as they come and go. For each pod ztunnel opens its
//! listeners inside the namespace before it acks, so the agent (and the CNI plugin waiting on
//! it) lets the pod start only once its traffic is caught. ztunnel never touches the rules: when
//! it stops, captured connections are refused until a ztunnel listens again, never let through.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::admin::ReadyGuard;
use mesh_core::certificates::CertificateSource;
use mesh_core::identity::SpiffeId;
use mesh_core::netns::NetNs;
use mesh_core::zds::{self, Connection, Version, WorkloadRequest, ZdsError, ZdsHello, workload_request::Payload};
use tracing::{info, warn};

use crate::listeners::PodListeners;
use crate::proxy::Context;
use crate::proxy::outbound::Outbound;
use crate::redirect::PodSockets;

/// How long to wait between attempts to reach the agent.
const RECONNECT: Duration = Duration::from_millis(200);

/// A pod ztunnel serves.
struct Pod {
    name: String,
    netns: Arc<NetNs>,
    ips: Vec<IpAddr>,
    identity: Option<SpiffeId>,
    signal: drain::Signal,
}

/// The ZDS client and the pods it was given.
#[derive(Debug)]
pub struct Inpod<S> {
    pub context: Arc<Context<S>>,
    pub outbound: Arc<Outbound<S>>,
    pub sockets: Arc<PodSockets>,
    pub socket: PathBuf,
    pub trust_domain: String,
}

impl<S: CertificateSource> Inpod<S> {
    /// Talks to the agent until `drain` fires, reconnecting whenever the connection ends; pods
    /// stay served meanwhile. `ready` is released after the first snapshot.
    pub async fn run(self, drain: drain::Watch, mut ready: Option<ReadyGuard>) {
        let mut pods: HashMap<String, Pod> = HashMap::new();
        let drained = drain.signaled();
        tokio::pin!(drained);
        let mut failing = false;
        loop {
            let session = self.session(&mut pods, &mut ready, &mut failing);
            tokio::select! {
                ended = session => {
                    if !failing {
                        warn!(socket = %self.socket.display(), error = %ended, "node agent connection ended; pods stay served, reconnecting");
                    }
                    failing = true;
                }
                _ = &mut drained => break,
            }
            tokio::time::sleep(RECONNECT).await;
        }
        // Stop accepting everywhere at once; open connections finish under the process's drain.
        let stopping: Vec<_> = pods.into_values().map(|pod| pod.signal.drain()).collect();
        futures_util::future::join_all(stopping).await;
    }

    /// One connection to the agent; returns why it ended.
    async fn session(
        &self,
        pods: &mut HashMap<String, Pod>,
        ready: &mut Option<ReadyGuard>,
        failing: &mut bool,
    ) -> ZdsError {
        let connection = match Connection::connect(&self.socket).await {
            Ok(connection) => connection,
            Err(error) => return error,
        };
        if let Err(error) = connection
            .send(
                &ZdsHello {
                    version: Version::V1 as i32,
                },
                None,
            )
            .await
        {
            return error;
        }
        info!(socket = %self.socket.display(), "connected to the node agent");
        *failing = false;
        // Until the snapshot ends, what the agent names; pods not named are gone.
        let mut named: Option<HashSet<String>> = Some(HashSet::new());
        loop {
            let (request, fd) = match connection.receive::<WorkloadRequest>("workload request").await {
                Ok(received) => received,
                Err(error) => return error,
            };
            let outcome = match request.payload {
                Some(Payload::Add(add)) => {
                    if let Some(named) = &mut named {
                        named.insert(add.uid.clone());
                    }
                    match fd {
                        Some(fd) => self.add(pods, add, fd).await,
                        None => Err(format!("AddWorkload {} came without its network namespace", add.uid)),
                    }
                }
                Some(Payload::Keep(keep)) => match &mut named {
                    Some(named) if pods.contains_key(&keep.uid) => {
                        named.insert(keep.uid);
                        Ok(())
                    }
                    Some(_) => Err(format!("KeepWorkload {}: this ztunnel does not hold it", keep.uid)),
                    None => Err("KeepWorkload after SnapshotSent".to_owned()),
                },
                Some(Payload::Del(del)) => {
                    self.remove(pods, &del.uid);
                    Ok(())
                }
                Some(Payload::SnapshotSent(_)) => {
                    let named = named.take().unwrap_or_default();
                    let gone: Vec<String> = pods.keys().filter(|uid| !named.contains(*uid)).cloned().collect();
                    for uid in gone {
                        self.remove(pods, &uid);
                    }
                    info!(pods = pods.len(), "snapshot from the node agent applied");
                    ready.take();
                    Ok(())
                }
                None => Err("a workload request without a payload".to_owned()),
            };
            if let Err(error) = &outcome {
                warn!(%error, "refused a request of the node agent");
            }
            if let Err(error) = connection.send(&zds::ack(outcome.err()), None).await {
                return error;
            }
        }
    }

    /// Opens the pod's listeners inside its namespace; the pod is served once this returns. A pod
    /// already held in the same namespace (a snapshot after a reconnect) stays as it is; one held
    /// in another namespace (its sandbox was recreated) is replaced.
    async fn add(
        &self,
        pods: &mut HashMap<String, Pod>,
        add: zds::AddWorkload,
        fd: std::os::fd::OwnedFd,
    ) -> Result<(), String> {
        let info = add.workload_info.unwrap_or_default();
        let name = format!("{}/{}", info.namespace, info.name);
        let label = format!("pod {name} ({})", add.uid);
        let netns = tokio::task::spawn_blocking(move || NetNs::from_fd(fd, label))
            .await
            .map_err(|e| format!("pod {name}: {e}"))?
            .map_err(|e| format!("pod {name}: not a network namespace: {e}"))?;
        if let Some(held) = pods.get(&add.uid) {
            if *held.netns == netns {
                return Ok(());
            }
            self.remove(pods, &add.uid);
        }
        let netns = Arc::new(netns);
        let opening = netns.clone();
        let (ips, listeners) = tokio::task::spawn_blocking(move || {
            Ok::<_, std::io::Error>((opening.addresses()?, PodListeners::bind_in(&opening)?))
        })
        .await
        .map_err(|e| format!("pod {name}: {e}"))?
        .map_err(|e| format!("pod {name}: cannot listen in its network namespace: {e}"))?;
        for ip in &ips {
            self.sockets.insert(*ip, netns.clone());
        }
        let (signal, watch) = drain::channel();
        listeners.serve(&self.context, &self.outbound, watch);
        let identity = SpiffeId::new(&self.trust_domain, &info.namespace, &info.service_account).ok();
        if let Some(identity) = &identity {
            self.context.certificates.prefetch(identity);
        }
        info!(pod = %name, uid = %add.uid, ?ips, "serving a pod the node agent handed over");
        pods.insert(
            add.uid,
            Pod {
                name,
                netns,
                ips,
                identity,
                signal,
            },
        );
        Ok(())
    }

    /// Stops serving the pod: no new connections; open ones finish.
    fn remove(&self, pods: &mut HashMap<String, Pod>, uid: &str) {
        let Some(pod) = pods.remove(uid) else { return };
        info!(pod = %pod.name, %uid, "the pod left: its listeners close");
        // Signalled now; waiting for its open connections is the process's drain, not this one's.
        drop(tokio::spawn(pod.signal.drain()));
        for ip in &pod.ips {
            self.sockets.remove(*ip);
        }
        if let Some(identity) = &pod.identity
            && !pods.values().any(|p| p.identity.as_ref() == Some(identity))
        {
            self.context.certificates.forget(identity);
        }
    }
}
