//! The Kubernetes API as a source: a kube-rs reflector per kind feeds the same store as the file
//! source. A kind whose CRD is not installed is retried with backoff and does not hold up the rest.

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store as Reader};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{info, warn};

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

/// Watches every kind istiod-lite reads and keeps `store` in step, until dropped.
pub async fn run(client: Client, store: Arc<Store>) {
    let mut watches = Watches {
        changed: Arc::new(Notify::new()),
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
    loop {
        watches.changed.notified().await;
        tokio::time::sleep(SETTLE).await;
        store.replace(SOURCE, readers.objects());
    }
}

/// The watch tasks (stopped when dropped) and the signal that one of them saw a change.
struct Watches {
    changed: Arc<Notify>,
    tasks: JoinSet<()>,
}

impl Watches {
    fn reflect<K>(&mut self, kind: &'static str, api: Api<K>) -> Reader<K>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    {
        let (reader, writer) = reflector::store();
        let events = reflector::reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
        let changed = self.changed.clone();
        self.tasks.spawn(async move {
            let mut events = std::pin::pin!(events);
            let mut failing = false;
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        info!(kind, "initial list synced");
                        failing = false;
                        changed.notify_one();
                    }
                    Ok(_) => changed.notify_one(),
                    Err(error) if !failing => {
                        failing = true;
                        warn!(kind, %error, "watch failed; retrying with backoff (is its CRD installed?)");
                    }
                    Err(_) => {}
                }
            }
        });
        reader
    }
}
