//! The delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService`): every client
//! gets the full state of what it subscribes to, then only what changed or was removed.

mod metrics;
mod snapshot;
mod stream;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mesh_core::proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use mesh_core::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, warn};

use crate::auth::Authenticators;

pub use metrics::{Metrics, ResourceType, TypeLabels};
pub use snapshot::{Publisher, Resource, Snapshot};

/// Responses queued per client before the server waits for it to read; snapshots published
/// meanwhile coalesce, so a slow client costs bounded memory.
const CLIENT_QUEUE: usize = 4;

/// Serves snapshots from a [`Publisher`] to any number of delta xDS clients.
#[derive(Clone, Debug)]
pub struct Server {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    next_client: Arc<AtomicU64>,
    /// Who may subscribe; `None` serves anyone (the loopback-only plaintext port).
    authenticators: Option<Authenticators>,
}

impl Server {
    pub fn new(publisher: &Publisher, metrics: Arc<Metrics>) -> Self {
        Self {
            snapshots: publisher.subscribe(),
            metrics,
            next_client: Arc::default(),
            authenticators: None,
        }
    }

    /// The same server, serving only callers one of `authenticators` accepts.
    pub fn authenticated(mut self, authenticators: Authenticators) -> Self {
        self.authenticators = Some(authenticators);
        self
    }
}

type ResponseStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Server {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let caller = match &self.authenticators {
            None => None,
            Some(authenticators) => match authenticators.authenticate(request.metadata()).await {
                Ok(caller) => Some(caller.to_string()),
                Err(status) => {
                    warn!(peer = ?peer, reason = status.message(), "xDS subscription refused: caller not authenticated");
                    return Err(status);
                }
            },
        };
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let (responses, queue) = mpsc::channel(CLIENT_QUEUE);
        let client = stream::Client::new(id, responses, self.metrics.clone());
        let span =
            tracing::info_span!("xds_client", id, peer = ?peer, caller = caller.as_deref().unwrap_or("(loopback)"));
        tokio::spawn(
            client
                .run(request.into_inner(), self.snapshots.clone())
                .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(queue))))
    }
}
