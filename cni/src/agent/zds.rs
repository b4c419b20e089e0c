//! The agent's side of ZDS (Istio's node agent ↔ ztunnel contract, framed by
//! [`mesh_core::zds`]). ztunnel connects and says hello (V1, else the connection is closed); the
//! agent sends it every pod it holds (`AddWorkload` with the pod's network namespace as an
//! SCM_RIGHTS descriptor), then `SnapshotSent`, each acknowledged before the next; from then on
//! one request at a time as pods come and go. The newest connection gets new pods; an older one
//! (a ztunnel being upgraded away) keeps what it has and still hears of deletions. A ztunnel that
//! leaves is logged; its pods stay captured (the rules stay: connections are refused until a
//! ztunnel takes them again).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::netns::NetNs;
use mesh_core::zds::{
    AddWorkload, Connection, Listener, SnapshotSent, Version, WorkloadRequest, WorkloadResponse, ZdsError, ZdsHello,
    workload_request::Payload, workload_response,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{Instrument, info, info_span, warn};

use super::{Agent, HeldPod};

/// Why a ZDS request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ZdsFailure {
    #[error("ztunnel refused {what}: {error}")]
    Refused { what: String, error: String },
    #[error("ztunnel did not acknowledge {what} within {}", humantime::format_duration(*timeout))]
    Timeout { what: String, timeout: Duration },
    #[error("ztunnel (ZDS connection {connection}) went away before acknowledging {what}")]
    Gone { what: String, connection: u64 },
    #[error("sending {what} to ztunnel: {source}")]
    Zds { what: String, source: ZdsError },
}

impl ZdsFailure {
    /// Whether the connection can carry no further request (no answer, or a broken socket).
    fn breaks_connection(&self) -> bool {
        !matches!(self, Self::Refused { .. })
    }
}

/// One request for a connection's task.
#[derive(Debug)]
struct Job {
    request: WorkloadRequest,
    netns: Option<Arc<NetNs>>,
    done: oneshot::Sender<Result<(), ZdsFailure>>,
}

/// A connected ztunnel.
#[derive(Clone, Debug)]
pub struct Ztunnel {
    pub id: u64,
    jobs: mpsc::Sender<Job>,
}

impl Ztunnel {
    /// Sends `request` (with `netns` as its descriptor) and waits for the acknowledgement.
    pub async fn request(&self, request: WorkloadRequest, netns: Option<Arc<NetNs>>) -> Result<(), ZdsFailure> {
        let what = describe(&request);
        let (done, answer) = oneshot::channel();
        let gone = || ZdsFailure::Gone {
            what: what.clone(),
            connection: self.id,
        };
        self.jobs.send(Job { request, netns, done }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The connected ztunnels, oldest first.
#[derive(Debug)]
pub struct Ztunnels {
    pub socket: PathBuf,
    pub ack_timeout: Duration,
    connected: Mutex<Vec<Ztunnel>>,
    next_id: AtomicU64,
}

impl Ztunnels {
    pub fn new(socket: PathBuf, ack_timeout: Duration) -> Self {
        Self {
            socket,
            ack_timeout,
            connected: Mutex::default(),
            next_id: AtomicU64::new(1),
        }
    }

    /// The ztunnel new pods go to.
    pub fn newest(&self) -> Option<Ztunnel> {
        let connected = self.connected.lock().expect("not poisoned");
        connected.iter().rev().find(|z| !z.jobs.is_closed()).cloned()
    }

    pub fn all(&self) -> Vec<Ztunnel> {
        self.connected.lock().expect("not poisoned").clone()
    }

    pub fn count(&self) -> usize {
        self.connected.lock().expect("not poisoned").len()
    }
}

/// Accepts ztunnel connections until `drain` fires.
pub async fn serve(mut listener: Listener, agent: Arc<Agent>, drain: drain::Watch) {
    let mut connections = JoinSet::new();
    let drained = drain.signaled();
    tokio::pin!(drained);
    loop {
        tokio::select! {
            _ = &mut drained => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok(connection) => {
                    let id = agent.ztunnels.next_id.fetch_add(1, Ordering::Relaxed);
                    let span = info_span!("zds", connection = id);
                    connections.spawn(serve_connection(connection, id, agent.clone()).instrument(span));
                }
                Err(error) => warn!(%error, socket = %agent.ztunnels.socket.display(), "ZDS accept failed"),
            },
        }
    }
}

/// One ztunnel, from hello to goodbye.
async fn serve_connection(connection: Connection, id: u64, agent: Arc<Agent>) {
    let timeout = agent.ztunnels.ack_timeout;
    match tokio::time::timeout(timeout, connection.receive::<ZdsHello>("hello")).await {
        Ok(Ok((hello, _))) if hello.version == Version::V1 as i32 => {}
        Ok(Ok((hello, _))) => {
            warn!(
                version = hello.version,
                "ztunnel's hello asks for a ZDS version other than V1; closing"
            );
            return;
        }
        Ok(Err(error)) => {
            warn!(%error, "no hello from ztunnel; closing");
            return;
        }
        Err(_) => {
            warn!(?timeout, "no hello from ztunnel in time; closing");
            return;
        }
    }
    // Held while the snapshot is sent, so no pod is enrolled meanwhile (it would miss both this
    // snapshot and, going to the previous ztunnel, this one for good).
    let pods = agent.pods.lock().await;
    info!(pods = pods.len(), "ztunnel connected; sending the snapshot");
    for pod in pods.values() {
        match exchange(&connection, &add(pod), Some(&pod.netns), timeout).await {
            Ok(()) => {}
            Err(failure) if !failure.breaks_connection() => warn!(uid = %pod.uid, %failure, "pod not taken by ztunnel"),
            Err(failure) => {
                warn!(%failure, "snapshot not acknowledged; closing");
                return;
            }
        }
    }
    let sent = WorkloadRequest {
        payload: Some(Payload::SnapshotSent(SnapshotSent {})),
    };
    if let Err(failure) = exchange(&connection, &sent, None, timeout).await {
        warn!(%failure, "snapshot not acknowledged; closing");
        return;
    }
    let (jobs, queue) = mpsc::channel(8);
    agent
        .ztunnels
        .connected
        .lock()
        .expect("not poisoned")
        .push(Ztunnel { id, jobs });
    agent.metrics.ztunnels.set(agent.ztunnels.count() as i64);
    drop(pods);
    info!("ztunnel holds the snapshot; new pods go to it");
    run_jobs(&connection, queue, timeout).await;
    agent
        .ztunnels
        .connected
        .lock()
        .expect("not poisoned")
        .retain(|z| z.id != id);
    agent.metrics.ztunnels.set(agent.ztunnels.count() as i64);
    warn!("ztunnel disconnected; its pods stay captured (connections refused) until a ztunnel takes them");
}

/// Carries requests one at a time until ztunnel leaves or stops answering.
async fn run_jobs(connection: &Connection, mut queue: mpsc::Receiver<Job>, timeout: Duration) {
    loop {
        tokio::select! {
            job = queue.recv() => {
                let Some(job) = job else { return };
                let result = exchange(connection, &job.request, job.netns.as_deref(), timeout).await;
                let broken = result.as_ref().is_err_and(ZdsFailure::breaks_connection);
                if let Err(failure) = &result && broken {
                    warn!(%failure, "closing the ZDS connection");
                }
                let _ = job.done.send(result);
                if broken {
                    return;
                }
            }
            unsolicited = connection.receive::<WorkloadResponse>("message") => match unsolicited {
                Err(ZdsError::Closed) => return,
                Err(error) => {
                    warn!(%error, "ZDS connection failed");
                    return;
                }
                Ok((message, _)) => warn!(?message, "ztunnel sent a message nobody asked for; ignored"),
            },
        }
    }
}

/// Sends one request and waits for its acknowledgement.
async fn exchange(
    connection: &Connection,
    request: &WorkloadRequest,
    netns: Option<&NetNs>,
    timeout: Duration,
) -> Result<(), ZdsFailure> {
    let what = describe(request);
    let zds = |source| ZdsFailure::Zds {
        what: what.clone(),
        source,
    };
    connection.send(request, netns.map(|n| n.as_fd())).await.map_err(zds)?;
    let answer = tokio::time::timeout(timeout, connection.receive::<WorkloadResponse>("acknowledgement"))
        .await
        .map_err(|_| ZdsFailure::Timeout {
            what: what.clone(),
            timeout,
        })?;
    let (response, _) = answer.map_err(zds)?;
    match response.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
        Some(workload_response::Payload::Ack(ack)) => Err(ZdsFailure::Refused { what, error: ack.error }),
        None => Err(ZdsFailure::Refused {
            what,
            error: "an answer without an Ack".into(),
        }),
    }
}

/// The `AddWorkload` for a held pod.
pub fn add(pod: &HeldPod) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Add(AddWorkload {
            uid: pod.uid.clone(),
            workload_info: Some(pod.info.clone()),
        })),
    }
}

/// A request, for messages.
fn describe(request: &WorkloadRequest) -> String {
    match &request.payload {
        Some(Payload::Add(add)) => match &add.workload_info {
            Some(info) => format!("AddWorkload for pod {}/{} (uid {})", info.namespace, info.name, add.uid),
            None => format!("AddWorkload for uid {}", add.uid),
        },
        Some(Payload::Keep(keep)) => format!("KeepWorkload for uid {}", keep.uid),
        Some(Payload::Del(del)) => format!("DelWorkload for uid {}", del.uid),
        Some(Payload::SnapshotSent(_)) => "SnapshotSent".to_owned(),
        None => "an empty request".to_owned(),
    }
}
