//! A ZDS client standing in for ztunnel, written from the protocol: hello, then requests (each
//! acknowledged by the test), the netns of an `AddWorkload` as its descriptor.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use mesh_core::zds::{Connection, Version, WorkloadRequest, ZdsHello, ack, workload_request::Payload};

/// A ZDS client standing in for ztunnel.
#[derive(Debug)]
pub struct Ztunnel {
    connection: Connection,
}

/// A request as the test sees it.
pub type Received = (WorkloadRequest, Option<OwnedFd>);

impl Ztunnel {
    /// Connects and says hello.
    pub async fn connect(socket: &Path) -> Self {
        let connection = Connection::connect(socket)
            .await
            .expect("connect to the agent's ZDS socket");
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        connection.send(&hello, None).await.expect("hello");
        Self { connection }
    }

    /// The next request (within 10 s).
    pub async fn next(&self) -> Received {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.connection.receive::<WorkloadRequest>("request"),
        )
        .await
        .expect("a ZDS request within 10s")
        .expect("a ZDS request")
    }

    /// Whether the agent closed the connection (within 10 s).
    pub async fn closed(&self) -> bool {
        let next = self.connection.receive::<WorkloadRequest>("request");
        matches!(
            tokio::time::timeout(Duration::from_secs(10), next).await,
            Ok(Err(mesh_core::zds::ZdsError::Closed))
        )
    }

    pub async fn ack(&self, error: Option<&str>) {
        self.connection
            .send(&ack(error.map(str::to_owned)), None)
            .await
            .expect("ack");
    }

    /// Takes a snapshot: acks each request up to and including `SnapshotSent` and returns the
    /// added pods (uid, descriptor) in order.
    pub async fn snapshot(&self) -> Vec<(String, OwnedFd)> {
        let mut added = Vec::new();
        loop {
            let (request, fd) = self.next().await;
            self.ack(None).await;
            match request.payload {
                Some(Payload::Add(add)) => added.push((add.uid, fd.expect("AddWorkload carries the netns"))),
                Some(Payload::SnapshotSent(_)) => return added,
                other => panic!("unexpected request in a snapshot: {other:?}"),
            }
        }
    }

    /// The next request, which must be an `AddWorkload`; returns its uid, info and descriptor.
    pub async fn expect_add(&self) -> (String, mesh_core::zds::WorkloadInfo, OwnedFd) {
        match self.next().await {
            (
                WorkloadRequest {
                    payload: Some(Payload::Add(add)),
                },
                Some(fd),
            ) => (add.uid, add.workload_info.expect("workload info"), fd),
            other => panic!("expected AddWorkload with a descriptor, got {other:?}"),
        }
    }

    /// The next request, which must be a `DelWorkload`; returns its uid.
    pub async fn expect_del(&self) -> String {
        match self.next().await {
            (
                WorkloadRequest {
                    payload: Some(Payload::Del(del)),
                },
                None,
            ) => del.uid,
            other => panic!("expected DelWorkload, got {other:?}"),
        }
    }
}
