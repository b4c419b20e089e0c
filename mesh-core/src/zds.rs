//! ZDS, the node agent ↔ ztunnel contract (Istio's `istio.workload.zds`): a unix SOCK_SEQPACKET
//! socket carrying one protobuf message per packet, a pod's network namespace passed along as an
//! SCM_RIGHTS file descriptor. ztunnel connects and says hello; the agent (the server) sends
//! every pod it holds, then `SnapshotSent`, then changes; ztunnel acks each request before the
//! next is sent. This module is the framing both sides share.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use prost::Message;
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

pub use crate::proto::zds::{
    Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request, workload_response,
};

/// Where Istio's ztunnel looks for the agent (`INPOD_UDS`).
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// The largest ZDS message accepted (a pod's names are far below it).
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ZDS socket {path}: {source}")]
    Socket { path: String, source: std::io::Error },
    #[error("ZDS: {0}")]
    Io(#[from] std::io::Error),
    #[error("ZDS: the peer closed the connection")]
    Closed,
    #[error("ZDS: undecodable {what}: {source}")]
    Decode {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("ZDS: a message of {0} bytes or more is larger than any ZDS message")]
    TooLarge(usize),
    #[error("ZDS: {0} carries {1} file descriptors; expected at most one")]
    Descriptors(&'static str, usize),
}

/// One ZDS connection, either side.
#[derive(Debug)]
pub struct Connection {
    socket: UnixSeqpacket,
}

impl Connection {
    /// Connects to the agent at `path` (ztunnel's side).
    pub async fn connect(path: &Path) -> Result<Self, ZdsError> {
        let socket = UnixSeqpacket::connect(path).await.map_err(|source| ZdsError::Socket {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { socket })
    }

    /// A connected pair, for tests.
    pub fn pair() -> Result<(Self, Self), ZdsError> {
        let (a, b) = UnixSeqpacket::pair()?;
        Ok((Self { socket: a }, Self { socket: b }))
    }

    /// Sends `message`, with `fd` as SCM_RIGHTS when given.
    pub async fn send(&self, message: &impl Message, fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        let bytes = message.encode_to_vec();
        let mut control = [0u8; 64];
        let mut ancillary = AncillaryMessageWriter::new(&mut control);
        if let Some(fd) = fd {
            ancillary
                .add_fds(&[fd])
                .map_err(|_| std::io::Error::other("no room for the file descriptor"))?;
        }
        self.socket
            .send_vectored_with_ancillary(&[IoSlice::new(&bytes)], &mut ancillary)
            .await?;
        Ok(())
    }

    /// Receives one message of type `M` (named `what` in errors) and the descriptor it carried.
    pub async fn receive<M: Message + Default>(&self, what: &'static str) -> Result<(M, Option<OwnedFd>), ZdsError> {
        let mut buffer = vec![0u8; MAX_MESSAGE];
        let mut control = [0u8; 64];
        let (length, ancillary) = self
            .socket
            .recv_vectored_with_ancillary(&mut [IoSliceMut::new(&mut buffer)], &mut control)
            .await?;
        let mut descriptors = Vec::new();
        for message in ancillary.into_messages() {
            if let OwnedAncillaryMessage::FileDescriptors(fds) = message {
                descriptors.extend(fds);
            }
        }
        if length == 0 && descriptors.is_empty() {
            return Err(ZdsError::Closed);
        }
        if length >= MAX_MESSAGE {
            return Err(ZdsError::TooLarge(length));
        }
        if descriptors.len() > 1 {
            return Err(ZdsError::Descriptors(what, descriptors.len()));
        }
        let message = M::decode(&buffer[..length]).map_err(|source| ZdsError::Decode { what, source })?;
        Ok((message, descriptors.pop()))
    }
}

/// The agent's listening socket.
#[derive(Debug)]
pub struct Listener {
    listener: UnixSeqpacketListener,
}

impl Listener {
    /// Listens at `path`, replacing a socket file a previous agent left behind.
    pub fn bind(path: &Path) -> Result<Self, ZdsError> {
        let error = |source| ZdsError::Socket {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(error)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(error(e)),
        }
        let listener = UnixSeqpacketListener::bind(path).map_err(error)?;
        Ok(Self { listener })
    }

    pub async fn accept(&mut self) -> Result<Connection, ZdsError> {
        Ok(Connection {
            socket: self.listener.accept().await?,
        })
    }
}

/// An empty ack (done) or one with the error.
pub fn ack(error: Option<String>) -> WorkloadResponse {
    WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: error.unwrap_or_default(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek};
    use std::os::fd::AsFd;

    use super::*;

    #[tokio::test]
    async fn a_request_carries_its_descriptor_across() {
        let (agent, ztunnel) = Connection::pair().unwrap();
        ztunnel
            .send(
                &ZdsHello {
                    version: Version::V1 as i32,
                },
                None,
            )
            .await
            .unwrap();
        let (hello, fd) = agent.receive::<ZdsHello>("hello").await.unwrap();
        assert_eq!((hello.version, fd.is_none()), (Version::V1 as i32, true));

        let path = std::env::temp_dir().join(format!("zds-fd-{}", std::process::id()));
        std::fs::write(&path, b"netns").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let add = WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: "uid-1".into(),
                workload_info: Some(WorkloadInfo {
                    name: "a".into(),
                    namespace: "demo".into(),
                    service_account: "server".into(),
                }),
            })),
        };
        agent.send(&add, Some(file.as_fd())).await.unwrap();
        let (received, fd) = ztunnel.receive::<WorkloadRequest>("request").await.unwrap();
        assert_eq!(received, add);
        let mut passed = std::fs::File::from(fd.expect("the descriptor"));
        passed.rewind().unwrap();
        let mut text = String::new();
        passed.read_to_string(&mut text).unwrap();
        assert_eq!(text, "netns");
        std::fs::remove_file(path).unwrap();

        ztunnel.send(&ack(Some("no room".into())), None).await.unwrap();
        let (response, _) = agent.receive::<WorkloadResponse>("response").await.unwrap();
        assert_eq!(response, ack(Some("no room".into())));
        drop(ztunnel);
        assert!(matches!(
            agent.receive::<WorkloadResponse>("response").await,
            Err(ZdsError::Closed)
        ));
    }
}
