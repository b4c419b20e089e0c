//! Delta ADS client, as ztunnel and the waypoint use it against istiod-lite (or istiod):
//! subscribes to its types, hands every response to a [`Handler`], ACKs or NACKs with the reason,
//! and when the stream breaks keeps the last state, reconnects with backoff and re-subscribes
//! with the versions it holds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prost_types::Any;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use crate::admin::ReadyGuard;
use crate::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::google::rpc::Status as RpcStatus;
use crate::token::BearerToken;

/// One resource of a response.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub name: String,
    pub version: String,
    pub resource: Any,
}

/// A resource the handler refused, and why (sent back in the NACK).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub name: String,
    pub reason: String,
}

/// Applies what the server sends. Rejected resources are NACKed; the rest of the response stays
/// applied, as Envoy and ztunnel do.
pub trait Handler: Send + 'static {
    fn apply(&mut self, type_url: &str, updates: Vec<Update>, removed: Vec<String>) -> Vec<Rejection>;
}

/// Why a session with the server ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("connect to {uri}: {source}")]
    Connect {
        uri: String,
        source: tonic::transport::Error,
    },
    #[error("xDS stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("invalid xDS server address {0:?}")]
    Address(String),
    #[error("TLS configuration: {0}")]
    Tls(tonic::transport::Error),
}

/// Where and how to reach the server.
#[derive(Clone, Debug)]
pub struct Server {
    endpoint: Endpoint,
    token: Option<BearerToken>,
}

impl Server {
    /// A plaintext server (`http://host:port`, local use).
    pub fn plaintext(address: &str) -> Result<Self, XdsError> {
        let endpoint =
            Endpoint::from_shared(format!("http://{address}")).map_err(|_| XdsError::Address(address.to_owned()))?;
        Ok(Self {
            endpoint: tuned(endpoint),
            token: None,
        })
    }

    /// A TLS server verified against `root_pem` under `domain`, authenticated with a bearer token.
    pub fn tls(address: &str, domain: &str, root_pem: &str, token: Option<BearerToken>) -> Result<Self, XdsError> {
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|_| XdsError::Address(address.to_owned()))?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(root_pem))
                    .domain_name(domain),
            )
            .map_err(XdsError::Tls)?;
        Ok(Self {
            endpoint: tuned(endpoint),
            token,
        })
    }

    /// A channel that connects on first use (and reconnects after failures).
    pub fn connect_lazy(&self) -> tonic::transport::Channel {
        self.endpoint.connect_lazy()
    }

    pub fn uri(&self) -> String {
        self.endpoint.uri().to_string()
    }
}

/// Full pushes of a large mesh are megabytes: windows sized so they do not crawl.
fn tuned(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(Duration::from_secs(10))
        .initial_connection_window_size(16 << 20)
        .initial_stream_window_size(4 << 20)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .tcp_nodelay(true)
}

/// Retry delays after a broken stream.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(15),
        }
    }
}

/// The largest response accepted: a full push of a big mesh.
const MAX_RESPONSE: usize = 256 << 20;

/// A delta xDS client for a fixed set of types.
pub struct Client<H> {
    server: Server,
    node: Node,
    type_urls: Vec<String>,
    backoff: Backoff,
    handler: H,
    /// Type → name → version the handler holds (what a re-subscription declares).
    versions: BTreeMap<String, BTreeMap<String, String>>,
}

impl<H> std::fmt::Debug for Client<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("xds::Client")
            .field("server", &self.server.uri())
            .field("types", &self.type_urls)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> Client<H> {
    pub fn new(server: Server, node: Node, type_urls: &[&str], backoff: Backoff, handler: H) -> Self {
        Self {
            server,
            node,
            type_urls: type_urls.iter().map(|t| (*t).to_owned()).collect(),
            backoff,
            handler,
            versions: BTreeMap::new(),
        }
    }

    /// Runs until dropped. `ready` is released once every type has had its first response.
    pub async fn run(mut self, mut ready: Option<ReadyGuard>) {
        let mut delay = self.backoff.initial;
        loop {
            let mut answered = false;
            let result = self.session(&mut ready, &mut answered).await;
            if answered {
                delay = self.backoff.initial;
            }
            match result {
                Ok(()) => {
                    info!(server = %self.server.uri(), "xDS stream closed by the server; reconnecting")
                }
                Err(error) => {
                    warn!(server = %self.server.uri(), %error, retry_in = ?delay, "xDS unavailable; keeping the last state")
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.backoff.max);
        }
    }

    async fn session(&mut self, ready: &mut Option<ReadyGuard>, answered: &mut bool) -> Result<(), XdsError> {
        let channel = self
            .server
            .endpoint
            .connect()
            .await
            .map_err(|source| XdsError::Connect {
                uri: self.server.uri(),
                source,
            })?;
        let token = self.server.token.clone();
        let mut client =
            AggregatedDiscoveryServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
                if let Some(token) = &token {
                    // Read per stream: a rotated token is picked up at the next reconnect.
                    let header = token
                        .header()
                        .map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
                    request.metadata_mut().insert("authorization", header);
                }
                Ok(request)
            })
            .max_decoding_message_size(MAX_RESPONSE);
        let (requests, queue) = mpsc::channel(self.type_urls.len() + 4);
        for (index, type_url) in self.type_urls.iter().enumerate() {
            let request = DeltaDiscoveryRequest {
                node: (index == 0).then(|| self.node.clone()),
                type_url: type_url.clone(),
                initial_resource_versions: self.versions.get(type_url).cloned().unwrap_or_default(),
                ..Default::default()
            };
            requests.try_send(request).expect("queue sized for the subscriptions");
        }
        let mut responses = client
            .delta_aggregated_resources(ReceiverStream::new(queue))
            .await?
            .into_inner();
        info!(server = %self.server.uri(), types = ?self.type_urls, "xDS stream open");
        let mut waiting: BTreeSet<String> = self.type_urls.iter().cloned().collect();
        while let Some(response) = responses.message().await? {
            *answered = true;
            let type_url = response.type_url.clone();
            let reply = self.apply(response);
            if requests.send(reply).await.is_err() {
                break;
            }
            waiting.remove(&type_url);
            if waiting.is_empty() {
                ready.take();
            }
        }
        Ok(())
    }

    /// Hands a response to the handler; returns the ACK, or the NACK naming what was rejected.
    fn apply(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let type_url = response.type_url;
        let updates: Vec<Update> = response
            .resources
            .into_iter()
            .filter_map(|r| {
                Some(Update {
                    resource: r.resource?,
                    name: r.name,
                    version: r.version,
                })
            })
            .collect();
        let accepted: Vec<(String, String)> = updates.iter().map(|u| (u.name.clone(), u.version.clone())).collect();
        debug!(
            type_url,
            updates = accepted.len(),
            removed = response.removed_resources.len(),
            "xDS response"
        );
        let rejected = self
            .handler
            .apply(&type_url, updates, response.removed_resources.clone());
        let versions = self.versions.entry(type_url.clone()).or_default();
        for name in &response.removed_resources {
            versions.remove(name);
        }
        let refused: BTreeSet<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        for (name, version) in accepted {
            if !refused.contains(name.as_str()) {
                versions.insert(name, version);
            }
        }
        let error_detail = (!rejected.is_empty()).then(|| {
            let message = rejected
                .iter()
                .map(|r| format!("{}: {}", r.name, r.reason))
                .collect::<Vec<_>>()
                .join("; ");
            warn!(type_url, %message, "rejecting (NACK) part of an xDS response");
            RpcStatus {
                code: tonic::Code::InvalidArgument as i32,
                message,
                details: Vec::new(),
            }
        });
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: response.nonce,
            error_detail,
            ..Default::default()
        }
    }
}
