//! One delta xDS client: its subscriptions, what it has been sent, ACK/NACK handling.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use mesh_core::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as ProtoResource};
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, HTTP_ROUTE_TYPE_URL, L7_POLICY_TYPE_URL};
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use super::metrics::{Metrics, ResourceType, TypeLabels};
use super::snapshot::Snapshot;

const SERVED_TYPES: [&str; 4] = [
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    HTTP_ROUTE_TYPE_URL,
    L7_POLICY_TYPE_URL,
];

/// The most resource names one client may hold subscriptions (and declared initial versions) for,
/// across all types. Past it the stream ends with `ResourceExhausted`: one client naming millions
/// of resources would otherwise grow the server without bound. Wildcard subscriptions name nothing
/// and are not limited. (Type URLs need no limit of their own: only the [`SERVED_TYPES`] are kept.)
pub(super) const MAX_SUBSCRIBED_NAMES: usize = 100_000;

/// What a client subscribed to within one type, and the versions it holds.
#[derive(Debug, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Name → version the client has (sent by us or declared in `initial_resource_versions`).
    sent: BTreeMap<String, String>,
    /// Whether the first response (the full state) has gone out.
    answered: bool,
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

pub(super) struct Client {
    id: u64,
    node: String,
    subscriptions: HashMap<String, Subscription>,
    nonce: u64,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    metrics: Arc<Metrics>,
}

/// Counts a connected client for as long as it lives.
struct Connected(Arc<Metrics>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.clients.dec();
    }
}

impl Client {
    pub(super) fn new(
        id: u64,
        responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            id,
            node: String::new(),
            subscriptions: HashMap::new(),
            nonce: 0,
            responses,
            metrics,
        }
    }

    pub(super) async fn run(
        mut self,
        mut requests: Streaming<DeltaDiscoveryRequest>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
    ) {
        self.metrics.clients.inc();
        let _connected = Connected(self.metrics.clone());
        loop {
            let open = tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        // Read without marking it seen: a change that arrived meanwhile must still
                        // trigger a push, even when this request is only an ACK.
                        let snapshot = snapshots.borrow().clone();
                        self.on_request(request, &snapshot).await
                    }
                    Ok(None) => false,
                    Err(status) => {
                        debug!(%status, "client stream failed");
                        false
                    }
                },
                changed = snapshots.changed() => match changed {
                    Ok(()) => {
                        let snapshot = snapshots.borrow_and_update().clone();
                        self.push_all(&snapshot).await
                    }
                    Err(_) => false,
                },
            };
            if !open {
                break;
            }
        }
        info!(node = %self.node, id = self.id, "xDS client disconnected");
    }

    /// Handles ACK/NACK and subscription changes; returns false once the client is gone.
    async fn on_request(&mut self, request: DeltaDiscoveryRequest, snapshot: &Snapshot) -> bool {
        if let Some(node) = &request.node
            && self.node.is_empty()
        {
            self.node = node.id.clone();
            info!(node = %self.node, id = self.id, "xDS client connected");
        }
        let type_url = request.type_url.as_str();
        if !SERVED_TYPES.contains(&type_url) {
            warn!(node = %self.node, type_url, "subscription to a type this server does not serve; ignored");
            return true;
        }
        if !request.response_nonce.is_empty() {
            match &request.error_detail {
                Some(error) => {
                    self.metrics.nacks.get_or_create(&labels(type_url)).inc();
                    warn!(node = %self.node, type_url, nonce = %request.response_nonce, reason = %error.message, "client rejected (NACK) a response");
                }
                None => debug!(node = %self.node, type_url, nonce = %request.response_nonce, "ACK"),
            }
        }
        if let Err(status) = self.check_size(&request) {
            warn!(node = %self.node, id = self.id, type_url, reason = status.message(), "xDS subscription refused");
            // The stream ends here, so the refusal is logged once.
            let _ = self.responses.send(Err(status)).await;
            return false;
        }
        let new = !self.subscriptions.contains_key(type_url);
        let subscription = self.subscriptions.entry(type_url.to_owned()).or_default();
        if new {
            // An empty first subscription is the legacy way to ask for everything.
            subscription.wildcard = request.resource_names_subscribe.is_empty()
                || request.resource_names_subscribe.iter().any(|n| n == "*");
            subscription.sent = request.initial_resource_versions.clone();
        }
        let mut changed = new;
        for name in request.resource_names_subscribe.iter().filter(|n| *n != "*") {
            changed |= subscription.names.insert(name.clone());
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                subscription.wildcard = false;
            }
            subscription.names.remove(name);
            subscription.sent.remove(name);
        }
        if !changed {
            return true;
        }
        self.push(type_url, snapshot).await
    }

    /// Refuses a request that would take the client past [`MAX_SUBSCRIBED_NAMES`].
    fn check_size(&self, request: &DeltaDiscoveryRequest) -> Result<(), Status> {
        let held: usize = self.subscriptions.values().map(|s| s.names.len()).sum();
        let current = self.subscriptions.get(&request.type_url);
        let added = request
            .resource_names_subscribe
            .iter()
            .filter(|name| *name != "*" && !current.is_some_and(|s| s.names.contains(*name)))
            .collect::<BTreeSet<_>>()
            .len();
        // Initial versions are only read with a type's first request.
        let declared = if current.is_none() {
            request.initial_resource_versions.len()
        } else {
            0
        };
        let total = held + added + declared;
        if total > MAX_SUBSCRIBED_NAMES {
            return Err(Status::resource_exhausted(format!(
                "subscription to {total} resource names (with {declared} initial versions) exceeds the limit of {MAX_SUBSCRIBED_NAMES} per client; subscribe to the wildcard instead"
            )));
        }
        Ok(())
    }

    async fn push_all(&mut self, snapshot: &Snapshot) -> bool {
        let types: Vec<String> = self.subscriptions.keys().cloned().collect();
        for type_url in types {
            if !self.push(&type_url, snapshot).await {
                return false;
            }
        }
        true
    }

    /// Sends what `type_url`'s subscription lacks; nothing when it is up to date (except the
    /// first response, which is sent even when empty so the client knows it has everything).
    async fn push(&mut self, type_url: &str, snapshot: &Snapshot) -> bool {
        // Before the first translation there is no state to be full: an empty answer would tell
        // the client that nothing exists. Wait for the first snapshot.
        if snapshot.generation == 0 {
            return true;
        }
        let Some(subscription) = self.subscriptions.get_mut(type_url) else {
            return true;
        };
        let empty = Default::default();
        let current = snapshot.resources(type_url).unwrap_or(&empty);
        let resources: Vec<ProtoResource> = current
            .values()
            .filter(|r| subscription.wants(&r.name) && subscription.sent.get(&r.name) != Some(&r.version))
            .map(|r| ProtoResource {
                name: r.name.clone(),
                version: r.version.clone(),
                resource: Some(r.body.clone()),
                ..Default::default()
            })
            .collect();
        let removed: Vec<String> = subscription
            .sent
            .keys()
            .filter(|name| !current.contains_key(*name) || !subscription.wants(name))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() && subscription.answered {
            return true;
        }
        for resource in &resources {
            subscription
                .sent
                .insert(resource.name.clone(), resource.version.clone());
        }
        for name in &removed {
            subscription.sent.remove(name);
        }
        subscription.answered = true;
        self.nonce += 1;
        let response = DeltaDiscoveryResponse {
            system_version_info: snapshot.generation.to_string(),
            type_url: type_url.to_owned(),
            resources,
            removed_resources: removed,
            nonce: format!("{}-{}", self.id, self.nonce),
            ..Default::default()
        };
        debug!(
            node = %self.node,
            type_url,
            updated = response.resources.len(),
            removed = response.removed_resources.len(),
            "push"
        );
        if self.responses.send(Ok(response)).await.is_err() {
            return false;
        }
        self.metrics.pushes.get_or_create(&labels(type_url)).inc();
        if let Some(published) = snapshot.published {
            self.metrics.push_latency.observe(published.elapsed().as_secs_f64());
        }
        true
    }
}

fn labels(type_url: &str) -> TypeLabels {
    TypeLabels {
        r#type: ResourceType::of(type_url),
    }
}
