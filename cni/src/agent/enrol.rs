//! ADD, DEL and CHECK. ADD: is the pod ambient → open its namespace → rules in → ztunnel
//! acknowledges → (Kubernetes) annotate → held; any step failing undoes the ones before it, so
//! nothing is left half-installed. DEL: ztunnels told → rules out → forgotten; it never fails for
//! a pod the agent does not hold.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_core::capture;
use mesh_core::netns::NetNs;
use mesh_core::zds::{DelWorkload, WorkloadInfo, WorkloadRequest, workload_request::Payload};
use tracing::{Instrument, info, info_span, warn};

use super::source::{self, SourceError};
use super::zds::{self, ZdsFailure};
use super::{Agent, Command, HeldPod, Outcome, RequestLabels};
use crate::protocol::{PodRequest, Request, Response, code};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("CNI_NETNS is not set: ADD needs the pod's network namespace")]
    NoNetns,
    #[error("CNI_NETNS={}: cannot open it as a network namespace: {source}", path.display())]
    Netns { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("K8S_POD_UID={given}: pod {pod} has uid {actual} (a pod of the same name, not this one)")]
    UidMismatch { given: String, pod: String, actual: String },
    #[error("K8S_POD_UID is not set and pod {pod} has no metadata.uid: ztunnel needs the pod's uid")]
    NoUid { pod: String },
    #[error("ztunnel is not connected to the node agent (ZDS socket {})", socket.display())]
    NoZtunnel { socket: PathBuf },
    #[error("installing the capture rules (nftables table inet ztunnel) for pod {pod}: {source}")]
    Rules { pod: String, source: std::io::Error },
    #[error("pod {pod}: {source}")]
    Ztunnel { pod: String, source: ZdsFailure },
    #[error("CNI_NETNS={}: the capture rules (nftables table inet ztunnel) of pod {pod} are missing", path.display())]
    TableMissing { pod: String, path: PathBuf },
    #[error("pod {pod} should be captured but the node agent does not hold it (enrolled before the agent started?)")]
    NotHeld { pod: String },
}

impl Failure {
    pub fn code(&self) -> u32 {
        match self {
            Self::NoNetns | Self::Netns { .. } | Self::NoUid { .. } => code::INVALID_ENV,
            Self::Source(source) => source.code(),
            Self::UidMismatch { .. } => code::POD_UNKNOWN,
            Self::NoZtunnel { .. } => code::TRY_AGAIN_LATER,
            Self::Rules { .. } => code::RULES,
            Self::Ztunnel { .. } => code::ZTUNNEL,
            Self::TableMissing { .. } | Self::NotHeld { .. } => code::NOT_CAPTURED,
        }
    }
}

impl Agent {
    /// Answers one plugin request.
    pub async fn handle(&self, request: Request) -> Response {
        let (command, pod) = match &request {
            Request::Add(pod) => (Command::Add, pod),
            Request::Del(pod) => (Command::Del, pod),
            Request::Check(pod) => (Command::Check, pod),
        };
        let span = info_span!("pod", command = ?command, pod = %pod.pod(), container = %pod.container_id);
        let result = async {
            match command {
                Command::Add => self.add(pod).await,
                Command::Del => Ok(self.del(pod).await),
                Command::Check => self.check(pod).await,
            }
        }
        .instrument(span.clone())
        .await;
        let response = match result {
            Ok(response) => response,
            Err(failure) => {
                span.in_scope(|| warn!(%failure, "failed"));
                Response::Failed {
                    code: failure.code(),
                    message: failure.to_string(),
                }
            }
        };
        let outcome = match &response {
            Response::Captured { .. } => Outcome::Captured,
            Response::Skipped { .. } => Outcome::Skipped,
            Response::Released { .. } => Outcome::Released,
            Response::Failed { .. } => Outcome::Failed,
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels { command, outcome })
            .inc();
        response
    }

    fn excluded(&self, request: &PodRequest) -> Option<Response> {
        let excluded = self.config.exclude_namespaces.contains(&request.namespace);
        excluded.then(|| Response::Skipped {
            reason: format!("namespace {} is excluded (--exclude-namespaces)", request.namespace),
        })
    }

    async fn add(&self, request: &PodRequest) -> Result<Response, Failure> {
        if let Some(skipped) = self.excluded(request) {
            return Ok(skipped);
        }
        let pod = request.pod();
        let path = request.netns.clone().ok_or(Failure::NoNetns)?;
        let found = self.source.lookup(&request.namespace, &request.name).await?;
        let uid = match (request.uid.clone(), found.pod.metadata.uid.clone()) {
            (Some(given), Some(actual)) if given != actual => return Err(Failure::UidMismatch { given, pod, actual }),
            (Some(uid), _) | (None, Some(uid)) => uid,
            (None, None) => return Err(Failure::NoUid { pod }),
        };
        if let Err(reason) = source::ambient(&found) {
            info!(%reason, "not ambient: passed through");
            return Ok(Response::Skipped { reason });
        }
        let netns = open(&path).await?;
        let held = HeldPod {
            uid: uid.clone(),
            container_id: request.container_id.clone(),
            netns: netns.clone(),
            info: WorkloadInfo {
                name: request.name.clone(),
                namespace: request.namespace.clone(),
                service_account: source::service_account(&found.pod),
            },
        };

        let mut pods = self.pods.lock().await;
        let ztunnel = self.ztunnels.newest().ok_or_else(|| Failure::NoZtunnel {
            socket: self.ztunnels.socket.clone(),
        })?;
        let mark = self.config.mark;
        blocking(netns.clone(), move |n| capture::install(n, mark))
            .await
            .map_err(|source| Failure::Rules {
                pod: pod.clone(),
                source,
            })?;
        // From here on a failure takes the rules out again, and the pod with them if a previous
        // ADD of this sandbox had enrolled it.
        let undo = async |pods: &mut super::Pods| {
            if pods.get(&uid).is_some_and(|p| *p.netns == *netns) {
                pods.remove(&uid);
                self.held_changed(pods).await;
            }
            release_rules(netns.clone()).await
        };
        if let Err(source) = ztunnel.request(zds::add(&held), Some(netns.clone())).await {
            undo(&mut pods).await;
            return Err(Failure::Ztunnel { pod, source });
        }
        if let Err(error) = self.source.annotate(&request.namespace, &request.name, true).await {
            if let Err(failure) = ztunnel.request(del(&uid), None).await {
                warn!(%failure, "ztunnel keeps the pod that could not be annotated");
            }
            undo(&mut pods).await;
            return Err(error.into());
        }
        pods.insert(uid.clone(), held);
        self.held_changed(&pods).await;
        info!(%uid, ztunnel = ztunnel.id, "captured: ztunnel holds the pod");
        Ok(Response::Captured { uid })
    }

    async fn del(&self, request: &PodRequest) -> Response {
        let mut pods = self.pods.lock().await;
        let uid = pods
            .iter()
            .find(|(_, p)| p.container_id == request.container_id)
            .map(|(uid, _)| uid.clone());
        let Some(held) = uid.and_then(|uid| pods.remove(&uid)) else {
            drop(pods);
            // Not (or no longer) held: a namespace still there may yet have rules of ours in it
            // (an ADD that failed half-way in an agent that then died, say).
            if let Some(path) = &request.netns
                && let Ok(netns) = open(path).await
                && blocking(netns.clone(), |n| Ok(capture::installed(n)))
                    .await
                    .unwrap_or(false)
            {
                release_rules(netns).await;
            }
            return Response::Released { known: false };
        };
        self.held_changed(&pods).await;
        for ztunnel in self.ztunnels.all() {
            if let Err(failure) = ztunnel.request(del(&held.uid), None).await {
                warn!(%failure, ztunnel = ztunnel.id, "DelWorkload not acknowledged");
            }
        }
        release_rules(held.netns.clone()).await;
        drop(pods);
        if let Err(error) = self.source.annotate(&request.namespace, &request.name, false).await {
            warn!(%error, "annotation left on the pod");
        }
        info!(uid = %held.uid, "released");
        Response::Released { known: true }
    }

    async fn check(&self, request: &PodRequest) -> Result<Response, Failure> {
        let held = {
            let pods = self.pods.lock().await;
            let held = pods.values().find(|p| p.container_id == request.container_id);
            held.map(|p| (p.uid.clone(), p.netns.clone()))
        };
        let pod = request.pod();
        if let Some((uid, netns)) = held {
            let path = request.netns.clone().unwrap_or_else(|| netns.path().to_owned());
            return match blocking(netns, |n| Ok(capture::installed(n))).await {
                Ok(true) => Ok(Response::Captured { uid }),
                _ => Err(Failure::TableMissing { pod, path }),
            };
        }
        if let Some(skipped) = self.excluded(request) {
            return Ok(skipped);
        }
        let found = self.source.lookup(&request.namespace, &request.name).await?;
        match source::ambient(&found) {
            Err(reason) => Ok(Response::Skipped { reason }),
            Ok(()) => Err(Failure::NotHeld { pod }),
        }
    }
}

fn del(uid: &str) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Del(DelWorkload { uid: uid.to_owned() })),
    }
}

/// Opens `path` and checks it is a network namespace.
async fn open(path: &Path) -> Result<Arc<NetNs>, Failure> {
    let path = path.to_owned();
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || NetNs::from_fd(File::open(&path)?.into(), &path))
    };
    match opened.await.expect("opening does not panic") {
        Ok(netns) => Ok(Arc::new(netns)),
        Err(source) => Err(Failure::Netns { path, source }),
    }
}

/// Runs a blocking namespace operation off the runtime's threads.
async fn blocking<T: Send + 'static>(
    netns: Arc<NetNs>,
    f: impl FnOnce(&NetNs) -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(move || f(&netns))
        .await
        .expect("namespace operations do not panic")
}

/// Removes the pod's rules, logging (not failing) when that cannot be done.
async fn release_rules(netns: Arc<NetNs>) {
    let path = netns.path().to_owned();
    if let Err(error) = blocking(netns, capture::remove).await {
        warn!(%error, netns = %path.display(), "the capture rules could not be removed");
    }
}
