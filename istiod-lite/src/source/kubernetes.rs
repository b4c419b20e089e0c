//! The Kubernetes API as a source: a kube-rs reflector per kind feeds the same store as the file
//! source. Nothing reaches the store until every kind has listed once, so the first publication
//! is the whole cluster, never a part of it. A kind whose CRD is not installed (404) counts as an
//! empty list, is reported once and retried with backoff, and does not hold up the rest; a kind
//! the API refuses (403) holds readiness until RBAC allows it, with one line naming the grant.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store as Reader};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::objects::{
    AuthorizationPolicy, Gateway, HTTPRoute, Namespace, Object, PeerAuthentication, Pod, Service, ServiceEntry,
    WorkloadEntry,
};
use crate::store::Store;

/// The store's name for this source.
pub const SOURCE: &str = "kubernetes";

/// Events that arrive within this window are applied together.
const SETTLE: Duration = Duration::from_millis(50);

/// A client from `kubeconfig`, else in-cluster, else `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, kube::Error> {
    let Some(path) = kubeconfig else {
        return Client::try_default().await;
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(kube::Error::InferKubeconfig)?;
    Client::try_from(config)
}

/// One reflector per kind.
struct Readers {
    namespaces: Reader<Namespace>,
    pods: Reader<Pod>,
    services: Reader<Service>,
    authorization_policies: Reader<AuthorizationPolicy>,
    peer_authentications: Reader<PeerAuthentication>,
    service_entries: Reader<ServiceEntry>,
    workload_entries: Reader<WorkloadEntry>,
    gateways: Reader<Gateway>,
    http_routes: Reader<HTTPRoute>,
}

impl Readers {
    fn objects(&self) -> Vec<Object> {
        let mut objects = Vec::new();
        objects.extend(self.namespaces.state().into_iter().map(Object::Namespace));
        objects.extend(self.pods.state().into_iter().map(Object::Pod));
        objects.extend(self.services.state().into_iter().map(Object::Service));
        objects.extend(
            self.authorization_policies
                .state()
                .into_iter()
                .map(Object::AuthorizationPolicy),
        );
        objects.extend(
            self.peer_authentications
                .state()
                .into_iter()
                .map(Object::PeerAuthentication),
        );
        objects.extend(self.service_entries.state().into_iter().map(Object::ServiceEntry));
        objects.extend(self.workload_entries.state().into_iter().map(Object::WorkloadEntry));
        objects.extend(self.gateways.state().into_iter().map(Object::Gateway));
        objects.extend(self.http_routes.state().into_iter().map(Object::HTTPRoute));
        objects
    }
}

/// Watches every kind istiod-lite reads and keeps `store` in step, until dropped; `synced` fires
/// once every kind has listed and the store holds them.
pub async fn run(client: Client, store: Arc<Store>, synced: oneshot::Sender<()>) {
    let mut watches = Watches {
        changed: Arc::new(Notify::new()),
        pending: Arc::default(),
        tasks: JoinSet::new(),
    };
    let readers = Readers {
        namespaces: watches.reflect("Namespace", Api::all(client.clone())),
        pods: watches.reflect("Pod", Api::all(client.clone())),
        services: watches.reflect("Service", Api::all(client.clone())),
        authorization_policies: watches.reflect("AuthorizationPolicy", Api::all(client.clone())),
        peer_authentications: watches.reflect("PeerAuthentication", Api::all(client.clone())),
        service_entries: watches.reflect("ServiceEntry", Api::all(client.clone())),
        workload_entries: watches.reflect("WorkloadEntry", Api::all(client.clone())),
        gateways: watches.reflect("Gateway", Api::all(client.clone())),
        http_routes: watches.reflect("HTTPRoute", Api::all(client)),
    };
    let mut synced = Some(synced);
    loop {
        watches.changed.notified().await;
        tokio::time::sleep(SETTLE).await;
        let pending = watches.pending.lock().expect("not poisoned").clone();
        if !pending.is_empty() {
            info!(waiting_for = ?pending, "waiting for the initial lists");
            continue;
        }
        store.replace(SOURCE, readers.objects());
        if let Some(synced) = synced.take() {
            info!("every kind listed: the Kubernetes configuration is complete");
            let _ = synced.send(());
        }
    }
}

/// The watch tasks (stopped when dropped), the signal that one of them saw a change, and the
/// kinds that have not listed yet.
struct Watches {
    changed: Arc<Notify>,
    pending: Arc<Mutex<BTreeSet<&'static str>>>,
    tasks: JoinSet<()>,
}

/// Why a watch failed, as far as the operator must act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    NotServed,
    Forbidden,
    Other,
}

fn classify(error: &watcher::Error) -> (Failure, String) {
    let api = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status),
        watcher::Error::WatchError(status) => Some(status),
        _ => None,
    };
    match api {
        Some(status) if status.is_not_found() => (Failure::NotServed, status.message.clone()),
        Some(status) if status.is_forbidden() => (Failure::Forbidden, status.message.clone()),
        _ => (Failure::Other, error.to_string()),
    }
}

impl Watches {
    fn reflect<K>(&mut self, kind: &'static str, api: Api<K>) -> Reader<K>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    {
        let (reader, writer) = reflector::store();
        let plural = K::plural(&()).into_owned();
        let group = K::group(&()).into_owned();
        let events = reflector::reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
        let (changed, pending) = (self.changed.clone(), self.pending.clone());
        pending.lock().expect("not poisoned").insert(kind);
        let listed = move || {
            pending.lock().expect("not poisoned").remove(kind);
            changed.notify_one();
        };
        let changed = self.changed.clone();
        self.tasks.spawn(async move {
            let mut events = std::pin::pin!(events);
            let mut failing = None;
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        info!(kind, "initial list synced");
                        failing = None;
                        listed();
                    }
                    Ok(_) => changed.notify_one(),
                    Err(error) => {
                        let (failure, message) = classify(&error);
                        if failing == Some(failure) {
                            continue;
                        }
                        failing = Some(failure);
                        let resource = if group.is_empty() { plural.clone() } else { format!("{plural}.{group}") };
                        match failure {
                            Failure::NotServed => {
                                warn!(kind, "the API does not serve {resource} (is its CRD installed?); treating it as empty and retrying");
                                listed();
                            }
                            Failure::Forbidden => error!(
                                kind,
                                "the API forbids reading {resource}: {message}; grant istiod-lite list and watch on {resource}"
                            ),
                            Failure::Other => warn!(kind, "watching {resource} failed: {message}; retrying with backoff"),
                        }
                    }
                }
            }
        });
        reader
    }
}
