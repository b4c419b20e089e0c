//! The node agent's side of ZDS, written from the protocol's facts (Istio's `zds.proto`): accepts
//! ztunnel's connection, checks its hello, and sends it pods (network namespace fds as
//! SCM_RIGHTS), keeps, deletions and snapshot ends, returning each ack. It drives our ztunnel
//! in the scenarios exactly as the real agent (or Istio's CNI agent) would.

use std::path::{Path, PathBuf};

use mesh_core::netns::NetNs;
use mesh_core::zds::{
    AddWorkload, Connection, DelWorkload, KeepWorkload, Listener, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request::Payload, workload_response,
};

/// The agent's socket, waiting for ztunnel.
#[derive(Debug)]
pub struct ZdsPeer {
    listener: Listener,
    pub path: PathBuf,
}

/// One accepted ztunnel.
#[derive(Debug)]
pub struct ZdsSession {
    connection: Connection,
}

impl ZdsPeer {
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            listener: Listener::bind(path)?,
            path: path.to_owned(),
        })
    }

    /// The next ztunnel to connect, once it said hello with version V1.
    pub async fn accept(&mut self) -> anyhow::Result<ZdsSession> {
        let connection = self.listener.accept().await?;
        let (hello, _) = connection.receive::<ZdsHello>("hello").await?;
        anyhow::ensure!(hello.version == Version::V1 as i32, "ztunnel said hello with {hello:?}");
        Ok(ZdsSession { connection })
    }
}

impl ZdsSession {
    /// Sends `request` (with `netns` as its fd) and returns the ack's error, if any.
    async fn ask(&self, payload: Payload, netns: Option<&NetNs>) -> anyhow::Result<Result<(), String>> {
        let request = WorkloadRequest { payload: Some(payload) };
        self.connection.send(&request, netns.map(NetNs::as_fd)).await?;
        let (response, _) = self.connection.receive::<WorkloadResponse>("response").await?;
        let Some(workload_response::Payload::Ack(ack)) = response.payload else {
            anyhow::bail!("ztunnel answered without an ack: {response:?}");
        };
        Ok(if ack.error.is_empty() { Ok(()) } else { Err(ack.error) })
    }

    pub async fn add(
        &self,
        uid: &str,
        namespace: &str,
        name: &str,
        service_account: &str,
        netns: Option<&NetNs>,
    ) -> anyhow::Result<Result<(), String>> {
        let add = AddWorkload {
            uid: uid.to_owned(),
            workload_info: Some(WorkloadInfo {
                name: name.to_owned(),
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            }),
        };
        self.ask(Payload::Add(add), netns).await
    }

    /// What the agent does for a new pod: its capture rules, then its namespace over ZDS (uid
    /// `uid-<name>`, service account `<name>`); fails unless the ack is empty.
    pub async fn capture(&self, netns_path: &Path, namespace: &str, name: &str) -> anyhow::Result<()> {
        let netns = NetNs::open(netns_path)?;
        mesh_core::capture::install(&netns, mesh_core::capture::DEFAULT_MARK)?;
        let acked = self
            .add(&format!("uid-{name}"), namespace, name, name, Some(&netns))
            .await?;
        anyhow::ensure!(acked.is_ok(), "ztunnel refused {name}: {acked:?}");
        Ok(())
    }

    pub async fn keep(&self, uid: &str) -> anyhow::Result<Result<(), String>> {
        self.ask(Payload::Keep(KeepWorkload { uid: uid.to_owned() }), None)
            .await
    }

    pub async fn delete(&self, uid: &str) -> anyhow::Result<Result<(), String>> {
        self.ask(Payload::Del(DelWorkload { uid: uid.to_owned() }), None).await
    }

    pub async fn snapshot_sent(&self) -> anyhow::Result<Result<(), String>> {
        self.ask(Payload::SnapshotSent(SnapshotSent {}), None).await
    }
}
