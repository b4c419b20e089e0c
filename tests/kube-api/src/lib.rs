//! Test infrastructure, never part of the product: a Kubernetes API server double.
//!
//! [`ApiServer`] serves the Kubernetes REST contract over plain HTTP on 127.0.0.1, closely enough
//! that unchanged kube-rs clients (typed `Api`s, reflectors and watchers, server-side apply,
//! the status subresource, Lease updates with optimistic concurrency) and the `istiod-lite`
//! binary, pointed at it through a kubeconfig, work against it:
//! resourceVersions from one counter, watches with bookmarks and 410 after [`ApiServer::compact`],
//! owner-reference garbage collection, bearer tokens with TokenReview, and RBAC refusals a
//! test asks for. The test drives the cluster through the handle (apply, delete, set status,
//! stop and restart the API) and reads back what clients did ([`ApiServer::calls`]).
//!
//! Left out on purpose: TLS, discovery documents beyond a stub, pagination (one page always),
//! finalizers (deletes are immediate), admission and validation beyond names, field ownership
//! conflicts of server-side apply (`force` or not, the applied fields win).

mod auth;
mod http;
mod meta;
mod patch;
mod resources;
mod rest;
mod selector;
mod status;
mod store;
mod watch;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use auth::{ADMIN_TOKEN, API_AUDIENCE, ApiCall};
use resources::Kind;
use store::{Origin, Store, Write};

/// A running (or stopped) API server double and its objects.
#[derive(Debug)]
pub struct ApiServer {
    store: Arc<Store>,
    port: u16,
    serving: Option<Serving>,
}

#[derive(Debug)]
struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ApiServer {
    /// Listens on 127.0.0.1 on a free port, served by the current tokio runtime.
    pub async fn start() -> std::io::Result<ApiServer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let mut server = ApiServer {
            store: Store::new(),
            port,
            serving: None,
        };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(http::serve(listener, self.store.clone(), stopped));
        self.serving = Some(Serving { stop, task });
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The API goes away: the listener is closed and every open connection (watches too) dropped.
    pub async fn stop(&mut self) {
        if let Some(serving) = self.serving.take() {
            _ = serving.stop.send(());
            _ = serving.task.await;
        }
    }

    /// The API comes back on the same port with the same objects and history.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await?;
        self.serve(listener);
        Ok(())
    }

    /// Writes a kubeconfig with one cluster, user (`token`) and context, the current one.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> std::io::Result<()> {
        let token = serde_json::to_string(token).expect("strings serialize");
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-api-double\n  cluster:\n    server: {}\n\
             users:\n- name: kube-api-double\n  user:\n    token: {token}\ncontexts:\n- name: kube-api-double\n  \
             context:\n    cluster: kube-api-double\n    user: kube-api-double\n    namespace: default\n\
             current-context: kube-api-double\n",
            self.url()
        );
        std::fs::write(path, config)
    }

    /// Creates or replaces `object` as the admin would (uid and creationTimestamp kept on
    /// replace, status replaced too), without RBAC and without requiring its Namespace. A uid or
    /// creationTimestamp the object brings is kept on create, so a test can name its pods' uids.
    /// Panics when the kind is unknown or not installed, or the object has no name.
    pub fn apply(&self, mut object: Value) -> Value {
        let kind = kind_of(&object);
        let mut state = self.store.lock();
        assert!(state.installed(kind), "{} is not installed", kind.qualified());
        if kind.namespaced && object["metadata"]["namespace"].as_str().is_none() {
            object["metadata"]["namespace"] = json!("default");
        }
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let written = if state.get(kind, namespace.as_deref(), &name).is_some() {
            state.update(kind, namespace.as_deref(), &name, object, Write::Admin)
        } else {
            state.create(kind, namespace.as_deref(), object, Origin::Admin)
        };
        written.unwrap_or_else(|refused| panic!("applying {}: {}", kind.kind, refused.body["message"]))
    }

    /// [`ApiServer::apply`] for every document of a multi-document YAML. Panics on invalid YAML.
    pub fn apply_yaml(&self, yaml: &str) -> Vec<Value> {
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(yaml).unwrap_or_else(|error| panic!("invalid YAML: {error}"));
        documents
            .into_iter()
            .filter(|d| !d.is_null())
            .map(|document| self.apply(document))
            .collect()
    }

    pub fn get(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let kind = lookup(api_version, kind);
        self.store.lock().get(kind, namespace, name).cloned()
    }

    /// Every object of a kind, in all namespaces.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let kind = lookup(api_version, kind);
        self.store.lock().list(kind, None).cloned().collect()
    }

    /// Deletes the object and what it owns; false when there was no such object.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let kind = lookup(api_version, kind);
        self.store.lock().delete(kind, namespace, name).is_ok()
    }

    /// Replaces the object's status, as its controller would. Panics when there is no such object.
    pub fn set_status(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str, status: Value) {
        let kind = lookup(api_version, kind);
        let object = json!({"status": status});
        if let Err(refused) = self.store.lock().update(kind, namespace, name, object, Write::Status) {
            panic!(
                "setting the status of {} {name}: {}",
                kind.kind, refused.body["message"]
            );
        }
    }

    /// Drops the watch history: a watch from an earlier resourceVersion gets 410 Expired, and the
    /// open watches are sent one and ended, so their clients relist.
    pub fn compact(&self) {
        self.store.lock().compact();
    }

    /// Sends a bookmark at the current resourceVersion to every watch that allows them (they also
    /// get one every second).
    pub fn bookmark(&self) {
        let mut state = self.store.lock();
        let revision = state.revision();
        state.watches.bookmark_all(revision);
    }

    /// How many watches are open.
    pub fn open_watches(&self) -> usize {
        self.store.lock().watches.open_count()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store.lock().revision()
    }

    /// Removes a CRD: its objects are deleted, its watches end, its paths answer 404.
    /// Panics unless `group`/`plural` is one of the CRD kinds.
    pub fn uninstall(&self, group: &str, plural: &str) {
        self.store.lock().uninstall(crd(group, plural));
    }

    /// Installs a CRD again (all are installed at start).
    pub fn install(&self, group: &str, plural: &str) {
        self.store.lock().install(crd(group, plural));
    }

    /// Refuses `verb` on `group`/`plural` (or `plural/status`) to every user but the admins.
    pub fn forbid(&self, verb: &str, group: &str, plural: &str) {
        self.store.lock().auth.forbid(verb, group, plural);
    }

    /// Mints a projected service-account token, as the kubelet gets for a pod: its TokenReview
    /// names the service account (uid from its object when there is one) and, in `extra`, the pod
    /// and node. No audiences means the API server's; a token bound to a pod is valid while that
    /// pod exists with that uid.
    pub fn issue_service_account_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<(&str, &str)>,
        node: Option<&str>,
        audiences: &[&str],
    ) -> String {
        let mut state = self.store.lock();
        let uid_of = |state: &store::State, api_version: &str, kind: &str, namespace: Option<&str>, name: &str| {
            let kind = lookup(api_version, kind);
            let object = state.get(kind, namespace, name);
            object
                .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
                .unwrap_or_else(meta::uid)
        };
        let sa_uid = uid_of(&state, "v1", "ServiceAccount", Some(namespace), service_account);
        let node = node.map(|name| (name, uid_of(&state, "v1", "Node", None, name)));
        let node = node.as_ref().map(|(name, uid)| (*name, uid.as_str()));
        state
            .auth
            .issue_service_account_token(namespace, (service_account, &sa_uid), pod, node, audiences)
    }

    /// A static token for `username` in `groups` (and `system:authenticated`).
    pub fn add_user_token(&self, token: &str, username: &str, groups: &[&str]) {
        self.store.lock().auth.add_user_token(token, username, groups);
    }

    /// From now on `token` is refused, by requests (401) and by TokenReview.
    pub fn expire_token(&self, token: &str) {
        self.store.lock().auth.expire_token(token);
    }

    /// Every resource request so far, in order.
    pub fn calls(&self) -> Vec<ApiCall> {
        self.store.lock().calls.clone()
    }

    /// Polls `condition` every 20 ms until it holds (true) or `timeout` passes (false).
    pub async fn wait_until(&self, condition: impl Fn(&ApiServer) -> bool, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if condition(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            _ = serving.stop.send(());
        }
    }
}

fn lookup(api_version: &str, kind: &str) -> &'static Kind {
    resources::by_kind(api_version, kind).unwrap_or_else(|| panic!("no kind {kind} in {api_version}"))
}

fn kind_of(object: &Value) -> &'static Kind {
    lookup(
        object["apiVersion"].as_str().unwrap_or_default(),
        object["kind"].as_str().unwrap_or_default(),
    )
}

fn crd(group: &str, plural: &str) -> &'static Kind {
    resources::crd(group, plural).unwrap_or_else(|| panic!("{plural}.{group} is not a CRD kind"))
}
