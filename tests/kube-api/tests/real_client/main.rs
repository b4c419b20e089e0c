//! The double against the real kube-rs client, built from the kubeconfig it writes: watches and
//! reflectors, relists after compaction and outages, server-side apply, the status subresource,
//! optimistic concurrency, TokenReview, RBAC refusals, CRDs that are not installed, garbage
//! collection and the request log.

mod access;
mod watches;
mod writes;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, Store as Reader};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use kube_api_double::ApiServer;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// A kubeconfig file, removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        _ = std::fs::remove_file(&self.0);
    }
}

/// A real kube client for `token`, configured only through the kubeconfig the double writes.
async fn client(api: &ApiServer, token: &str) -> Client {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "kube-api-double-{}-{}.yaml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let file = TempFile(std::env::temp_dir().join(name));
    api.write_kubeconfig(&file.0, token).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&file.0).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{}/", api.url()));
    assert_eq!(config.default_namespace, "default");
    Client::try_from(config).unwrap()
}

fn pod(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "apps", "labels": labels},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// A reflector over every pod, with a log of what its watcher reported; stopped when dropped.
struct Reflector {
    reader: Reader<Pod>,
    log: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reflector {
    fn start(client: Client) -> Reflector {
        Reflector::with_config(client, watcher::Config::default())
    }

    fn with_config(client: Client, config: watcher::Config) -> Reflector {
        let (reader, writer) = reflector::store();
        let events = reflector::reflector(writer, watcher(Api::<Pod>::all(client), config));
        let log = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                let mut events = std::pin::pin!(events.default_backoff());
                while let Some(event) = events.next().await {
                    let line = match event {
                        Ok(watcher::Event::Init) => "init".to_owned(),
                        Ok(watcher::Event::InitApply(pod)) => format!("init-apply {}", pod.name_any()),
                        Ok(watcher::Event::InitDone) => "init-done".to_owned(),
                        Ok(watcher::Event::Apply(pod)) => format!("apply {}", pod.name_any()),
                        Ok(watcher::Event::Delete(pod)) => format!("delete {}", pod.name_any()),
                        Err(error) => format!("error {error}"),
                    };
                    log.lock().unwrap().push(line);
                }
            }
        });
        Reflector { reader, log, task }
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.reader.state().iter().map(|p| p.name_any()).collect();
        names.sort();
        names
    }

    fn count(&self, line: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| *l == line).count()
    }
}

fn server_pod_names(api: &ApiServer) -> Vec<String> {
    let mut names: Vec<String> = api
        .list("v1", "Pod")
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

async fn synced(api: &ApiServer, reflector: &Reflector) -> bool {
    api.wait_until(|api| reflector.names() == server_pod_names(api), WAIT)
        .await
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}
