//! The double against the real kube-rs client, built from the kubeconfig it writes: watches and
//! reflectors, relists after compaction and outages, server-side apply, the status subresource,
//! optimistic concurrency, TokenReview, RBAC refusals, CRDs that are not installed, garbage
//! collection and the request log.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, Store as Reader};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use kube_api_double::{ADMIN_TOKEN, ApiCall, ApiServer};
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
    let name = format!("kube-api-double-{}-{}.yaml", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
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
        let (reader, writer) = reflector::store();
        let events = reflector::reflector(writer, watcher(Api::<Pod>::all(client), watcher::Config::default()));
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
    api.wait_until(|api| reflector.names() == server_pod_names(api), WAIT).await
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_and_reflector_see_added_modified_deleted() {
    let api = ApiServer::start().await.unwrap();
    let client = client(&api, ADMIN_TOKEN).await;
    let pods: Api<Pod> = Api::all(client.clone());
    let mut raw = pods.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    let reflector = Reflector::start(client);
    reflector.reader.wait_until_ready().await.unwrap();

    api.apply(pod("web", json!({"app": "web"})));
    assert!(api.wait_until(|_| reflector.names() == ["web"], WAIT).await);
    api.apply(pod("web", json!({"app": "web", "version": "v2"})));
    let relabelled = |_: &ApiServer| {
        let state = reflector.reader.state();
        state.iter().any(|p| p.labels().get("version").map(String::as_str) == Some("v2"))
    };
    assert!(api.wait_until(relabelled, WAIT).await);
    assert!(api.delete("v1", "Pod", Some("apps"), "web"));
    assert!(api.wait_until(|_| reflector.names().is_empty(), WAIT).await);

    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(match raw.try_next().await.unwrap().unwrap() {
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Added(p) => format!("ADDED {} {}", p.name_any(), p.resource_version().unwrap()),
            WatchEvent::Modified(p) => format!("MODIFIED {} {}", p.name_any(), p.resource_version().unwrap()),
            WatchEvent::Deleted(p) => format!("DELETED {} {}", p.name_any(), p.resource_version().unwrap()),
            other => format!("{other:?}"),
        });
    }
    let first = api.resource_version() - 2;
    let expected = [
        format!("ADDED web {first}"),
        format!("MODIFIED web {}", first + 1),
        format!("DELETED web {}", first + 2),
    ];
    assert_eq!(seen, expected);
    let log = reflector.log.lock().unwrap().clone();
    assert_eq!(log, ["init", "init-done", "apply web", "apply web", "delete web"]);
}

#[tokio::test]
async fn after_compaction_the_watcher_relists_to_the_servers_state() {
    let api = ApiServer::start().await.unwrap();
    let client = client(&api, ADMIN_TOKEN).await;
    for name in ["a", "b", "c"] {
        api.apply(pod(name, json!({})));
    }
    let reflector = Reflector::start(client.clone());
    assert!(synced(&api, &reflector).await);
    let before = api.resource_version();

    api.compact();
    api.delete("v1", "Pod", Some("apps"), "a");
    api.apply(pod("d", json!({})));
    api.apply(pod("b", json!({"changed": "yes"})));
    assert!(api.wait_until(|_| reflector.count("init-done") == 2, WAIT).await);
    assert!(synced(&api, &reflector).await);
    assert_eq!(reflector.reader.state().len(), 3, "no duplicates: {:?}", reflector.names());
    let b = reflector.reader.get(&reflector::ObjectRef::new("b").within("apps")).unwrap();
    assert_eq!(b.labels()["changed"], "yes");
    let log = reflector.log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l.contains("too old resource version")), "{log:?}");

    // A new watch from before the compaction is refused the way the API server refuses it.
    let pods: Api<Pod> = Api::all(client);
    let stale_version = before - 1;
    let mut stale = pods.watch(&WatchParams::default(), &stale_version.to_string()).await.unwrap().boxed();
    match stale.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert_eq!(status.message, format!("too old resource version: {stale_version} ({before})"));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(stale.try_next().await.unwrap().is_none(), "the stream ends after the ERROR");
}

#[tokio::test]
async fn the_watcher_recovers_from_an_outage_with_what_changed_meanwhile() {
    let mut api = ApiServer::start().await.unwrap();
    let client = client(&api, ADMIN_TOKEN).await;
    api.apply(pod("before", json!({})));
    let reflector = Reflector::start(client.clone());
    assert!(synced(&api, &reflector).await);
    assert!(api.wait_until(|api| api.open_watches() == 1, WAIT).await);

    api.stop().await;
    assert_eq!(api.open_watches(), 0, "the watch connection went with the server");
    let refused = Api::<Pod>::all(client.clone()).list(&ListParams::default()).await;
    assert!(matches!(refused, Err(kube::Error::HyperError(_) | kube::Error::Service(_))), "{refused:?}");
    api.apply(pod("during", json!({})));
    api.delete("v1", "Pod", Some("apps"), "before");
    api.restart().await.unwrap();

    assert!(synced(&api, &reflector).await, "reflector has {:?}", reflector.names());
    assert_eq!(reflector.names(), ["during"]);
    let pods = Api::<Pod>::all(client).list(&ListParams::default()).await.unwrap();
    assert_eq!(pods.items.len(), 1);
}

#[tokio::test]
async fn server_side_apply_creates_then_updates() {
    let api = ApiServer::start().await.unwrap();
    api.apply(namespace("apps"));
    let deployments: Api<Deployment> = Api::namespaced(client(&api, ADMIN_TOKEN).await, "apps");
    let deployment = |replicas: i32| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
               "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}}}})
    };
    let params = PatchParams::apply("mgr").force();

    let created = deployments
        .patch("web", &params, &Patch::Apply(deployment(1)))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let managers = created.metadata.managed_fields.clone().unwrap();
    assert_eq!(managers.len(), 1);
    assert_eq!(managers[0].manager.as_deref(), Some("mgr"));
    assert_eq!(managers[0].operation.as_deref(), Some("Apply"));

    let updated = deployments
        .patch("web", &params, &Patch::Apply(deployment(3)))
        .await
        .unwrap();
    assert_eq!(updated.spec.replicas, Some(3));
    assert_eq!(updated.metadata.generation, Some(2));
    assert_eq!(updated.metadata.uid, created.metadata.uid);
    assert_ne!(updated.metadata.resource_version, created.metadata.resource_version);
    assert_eq!(api.get("apps/v1", "Deployment", Some("apps"), "web").unwrap()["spec"]["replicas"], 3);

    let unchanged = deployments
        .patch("web", &params, &Patch::Apply(deployment(3)))
        .await
        .unwrap();
    assert_eq!(unchanged.metadata.resource_version, updated.metadata.resource_version);

    let refused = deployments
        .patch("web", &PatchParams::default(), &Patch::Apply(deployment(4)))
        .await;
    let status = api_error(refused);
    assert_eq!(status.code, 400);
    assert!(status.message.contains("fieldManager: Required value"), "{}", status.message);
}

#[tokio::test]
async fn the_status_subresource_changes_status_and_not_generation() {
    let api = ApiServer::start().await.unwrap();
    api.apply(namespace("apps"));
    let deployments: Api<Deployment> = Api::namespaced(client(&api, ADMIN_TOKEN).await, "apps");
    let object: Deployment = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"spec": {"containers": []}}}}))
    .unwrap();
    let created = deployments.create(&PostParams::default(), &object).await.unwrap();

    let status = Patch::Merge(json!({"status": {"readyReplicas": 2}}));
    let patched = deployments
        .patch_status("web", &PatchParams::default(), &status)
        .await
        .unwrap();
    assert_eq!(patched.status.as_ref().unwrap().ready_replicas, Some(2));
    assert_eq!(patched.metadata.generation, Some(1));
    assert_ne!(patched.metadata.resource_version, created.metadata.resource_version);

    // The main resource ignores status; its spec changes bump the generation.
    let main = Patch::Merge(json!({"spec": {"replicas": 5}, "status": {"readyReplicas": 9}}));
    let patched = deployments.patch("web", &PatchParams::default(), &main).await.unwrap();
    assert_eq!(patched.status.unwrap().ready_replicas, Some(2));
    assert_eq!(patched.metadata.generation, Some(2));

    // A status change through the subresource keeps the spec as it is.
    let mut stale_spec = created.clone();
    stale_spec.status = Some(serde_json::from_value(json!({"readyReplicas": 3})).unwrap());
    stale_spec.metadata.resource_version = None;
    let replaced = deployments
        .replace_status("web", &PostParams::default(), &stale_spec)
        .await
        .unwrap();
    assert_eq!(replaced.spec.replicas, Some(5));
    assert_eq!(replaced.status.unwrap().ready_replicas, Some(3));
    assert_eq!(replaced.metadata.generation, Some(2));
}

#[tokio::test]
async fn replacing_a_lease_with_a_stale_resource_version_conflicts() {
    let api = ApiServer::start().await.unwrap();
    api.apply(namespace("istio-system"));
    let leases: Api<Lease> = Api::namespaced(client(&api, ADMIN_TOKEN).await, "istio-system");
    let lease = |holder: &str| -> Lease {
        serde_json::from_value(json!({"metadata": {"name": "istiod"}, "spec": {"holderIdentity": holder}})).unwrap()
    };
    let missing = api_error(leases.replace("istiod", &PostParams::default(), &lease("a")).await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    let created = leases.create(&PostParams::default(), &lease("a")).await.unwrap();
    let duplicate = api_error(leases.create(&PostParams::default(), &lease("a")).await);
    assert_eq!((duplicate.code, duplicate.reason.as_str()), (409, "AlreadyExists"));

    let mut renewed = created.clone();
    renewed.spec.as_mut().unwrap().holder_identity = Some("b".to_owned());
    let renewed = leases.replace("istiod", &PostParams::default(), &renewed).await.unwrap();
    assert_eq!(renewed.spec.unwrap().holder_identity.as_deref(), Some("b"));

    let mut stale = created;
    stale.spec.as_mut().unwrap().holder_identity = Some("c".to_owned());
    let status = api_error(leases.replace("istiod", &PostParams::default(), &stale).await);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        status.message,
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"istiod\": the object has been modified; \
         please apply your changes to the latest version and try again"
    );
    let stored = api.get("coordination.k8s.io/v1", "Lease", Some("istio-system"), "istiod").unwrap();
    assert_eq!(stored["spec"]["holderIdentity"], "b");
}

async fn review(reviews: &Api<TokenReview>, token: &str, audiences: &[&str]) -> TokenReview {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
        },
        ..Default::default()
    };
    reviews.create(&PostParams::default(), &request).await.unwrap()
}

#[tokio::test]
async fn token_review_authenticates_projected_tokens() {
    let api = ApiServer::start().await.unwrap();
    let web = api.apply(pod("web", json!({})));
    let pod_uid = web["metadata"]["uid"].as_str().unwrap();
    let reviews: Api<TokenReview> = Api::all(client(&api, ADMIN_TOKEN).await);
    let token = api.issue_service_account_token("apps", "web-sa", Some(("web", pod_uid)), Some("node-1"), &["istio-ca"]);

    let status = review(&reviews, &token, &["istio-ca", "other"]).await.status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{:?}", status.error);
    assert_eq!(status.audiences.unwrap(), ["istio-ca"]);
    let user = status.user.unwrap();
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:apps:web-sa"));
    assert!(user.groups.unwrap().contains(&"system:serviceaccounts:apps".to_owned()));
    let extra = user.extra.unwrap();
    assert_eq!(extra["authentication.kubernetes.io/pod-name"], ["web"]);
    assert_eq!(extra["authentication.kubernetes.io/pod-uid"], [pod_uid]);
    assert_eq!(extra["authentication.kubernetes.io/node-name"], ["node-1"]);

    let refused = |review: TokenReview| {
        let status = review.status.unwrap();
        assert_eq!(status.authenticated, Some(false));
        status.error.unwrap()
    };
    let wrong_audience = refused(review(&reviews, &token, &["somebody-else"]).await);
    assert!(wrong_audience.contains("invalid for the target audiences"), "{wrong_audience}");
    let unknown = refused(review(&reviews, "not-a-token", &["istio-ca"]).await);
    assert!(unknown.contains("unknown token"), "{unknown}");
    api.apply(pod("web", json!({"relabelled": "still-the-same-pod"})));
    assert_eq!(review(&reviews, &token, &["istio-ca"]).await.status.unwrap().authenticated, Some(true));
    api.expire_token(&token);
    let expired = refused(review(&reviews, &token, &["istio-ca"]).await);
    assert!(expired.contains("expired"), "{expired}");

    let bound = api.issue_service_account_token("apps", "web-sa", Some(("web", pod_uid)), None, &["istio-ca"]);
    api.delete("v1", "Pod", Some("apps"), "web");
    let gone = refused(review(&reviews, &bound, &["istio-ca"]).await);
    assert!(gone.contains("no longer exists"), "{gone}");
}

#[tokio::test]
async fn bearer_tokens_are_authenticated_and_forbidden_verbs_refused() {
    let api = ApiServer::start().await.unwrap();
    let token = api.issue_service_account_token("istio-system", "istiod-lite", None, None, &[]);
    let istiod = client(&api, &token).await;
    let all: Api<Pod> = Api::all(istiod.clone());
    let in_apps: Api<Pod> = Api::namespaced(istiod, "apps");
    assert!(all.list(&ListParams::default()).await.unwrap().items.is_empty());

    api.forbid("list", "", "pods");
    let status = api_error(all.list(&ListParams::default()).await);
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "pods is forbidden: User \"system:serviceaccount:istio-system:istiod-lite\" cannot list resource \"pods\" \
         in API group \"\" at the cluster scope"
    );
    let status = api_error(in_apps.list(&ListParams::default()).await);
    assert!(status.message.ends_with("in the namespace \"apps\""), "{}", status.message);
    assert!(in_apps.get_opt("web").await.unwrap().is_none(), "get is still allowed");
    let admin: Api<Pod> = Api::all(client(&api, ADMIN_TOKEN).await);
    assert!(admin.list(&ListParams::default()).await.is_ok(), "the admin is never forbidden");

    let stranger: Api<Pod> = Api::all(client(&api, "nobody-issued-this").await);
    let status = api_error(stranger.list(&ListParams::default()).await);
    assert_eq!((status.code, status.reason.as_str()), (401, "Unauthorized"));
    api.expire_token(&token);
    assert_eq!(api_error(in_apps.get_opt("web").await).code, 401);
}

fn service_entries(client: Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("networking.istio.io", "v1", "ServiceEntry");
    Api::all_with(client, &ApiResource::from_gvk_with_plural(&gvk, "serviceentries"))
}

#[tokio::test]
async fn an_uninstalled_crd_is_not_found() {
    let api = ApiServer::start().await.unwrap();
    let entries = service_entries(client(&api, ADMIN_TOKEN).await);
    api.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                     "metadata": {"name": "ext", "namespace": "apps"}, "spec": {"hosts": ["example.com"]}}));
    assert_eq!(entries.list(&ListParams::default()).await.unwrap().items.len(), 1);

    api.uninstall("networking.istio.io", "serviceentries");
    let status = api_error(entries.list(&ListParams::default()).await);
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(status.message, "the server could not find the requested resource");

    api.install("networking.istio.io", "serviceentries");
    let items = entries.list(&ListParams::default()).await.unwrap().items;
    assert!(items.is_empty(), "removing the CRD removed its objects");
}

#[tokio::test]
async fn deleting_an_owner_deletes_its_dependents() {
    let api = ApiServer::start().await.unwrap();
    let client = client(&api, ADMIN_TOKEN).await;
    let owner = api.apply(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                                 "metadata": {"name": "web", "namespace": "apps"}, "spec": {}}));
    let owned_by = |object: &Value| {
        json!([{"apiVersion": object["apiVersion"], "kind": object["kind"], "name": object["metadata"]["name"],
                "uid": object["metadata"]["uid"]}])
    };
    let config = api.apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "web-config", "namespace": "apps", "ownerReferences": owned_by(&owner)}}));
    let mut dependent = pod("web-1", json!({}));
    dependent["metadata"]["ownerReferences"] = owned_by(&config);
    api.apply(dependent);
    api.apply(pod("unrelated", json!({})));

    let pods: Api<Pod> = Api::namespaced(client.clone(), "apps");
    let mut watch = pods.watch(&WatchParams::default(), &api.resource_version().to_string()).await.unwrap().boxed();
    let deployments: Api<Deployment> = Api::namespaced(client, "apps");
    deployments.delete("web", &DeleteParams::default()).await.unwrap();

    assert!(api.get("v1", "ConfigMap", Some("apps"), "web-config").is_none());
    assert!(api.get("v1", "Pod", Some("apps"), "web-1").is_none(), "the grandchild goes too");
    assert!(api.get("v1", "Pod", Some("apps"), "unrelated").is_some());
    match watch.try_next().await.unwrap() {
        Some(WatchEvent::Deleted(pod)) => assert_eq!(pod.name_any(), "web-1"),
        other => panic!("expected the dependent's DELETED, got {other:?}"),
    }
}

#[tokio::test]
async fn calls_record_each_request_with_its_rbac_verb() {
    let api = ApiServer::start().await.unwrap();
    api.apply(namespace("apps"));
    let token = api.issue_service_account_token("apps", "app", None, None, &[]);
    let maps: Api<ConfigMap> = Api::namespaced(client(&api, &token).await, "apps");
    let map: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "m"}, "data": {"k": "v"}})).unwrap();

    let created = maps.create(&PostParams::default(), &map).await.unwrap();
    maps.get("m").await.unwrap();
    maps.list(&ListParams::default().labels("app=web")).await.unwrap();
    maps.watch(&WatchParams::default().timeout(1), "0").await.unwrap().boxed().try_next().await.unwrap();
    maps.replace("m", &PostParams::default(), &created).await.unwrap();
    let merge = Patch::Merge(json!({"data": {"k": "w"}}));
    maps.patch("m", &PatchParams::default(), &merge).await.unwrap();
    maps.delete("m", &DeleteParams::default()).await.unwrap();
    let other_namespace = api_error(Api::<ConfigMap>::namespaced(maps.clone().into_client(), "ghost")
        .create(&PostParams::default(), &map)
        .await);
    assert_eq!((other_namespace.code, other_namespace.message.as_str()), (404, "namespaces \"ghost\" not found"));

    let calls: Vec<ApiCall> = api
        .calls()
        .into_iter()
        .filter(|c| c.user == "system:serviceaccount:apps:app")
        .collect();
    let verbs: Vec<&str> = calls.iter().map(|c| c.verb.as_str()).collect();
    assert_eq!(verbs, ["create", "get", "list", "watch", "update", "patch", "delete", "create"]);
    let names: Vec<Option<&str>> = calls.iter().map(|c| c.name.as_deref()).collect();
    let m = Some("m");
    assert_eq!(names, [None, m, None, None, m, m, m, None]);
    assert_eq!(
        calls[4],
        ApiCall {
            user: "system:serviceaccount:apps:app".to_owned(),
            verb: "update".to_owned(),
            group: String::new(),
            resource: "configmaps".to_owned(),
            subresource: None,
            namespace: Some("apps".to_owned()),
            name: Some("m".to_owned()),
        }
    );
    assert_eq!(calls[7].namespace.as_deref(), Some("ghost"));
}
