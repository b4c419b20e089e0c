//! Writes: server-side apply, the status subresource, optimistic concurrency, CRDs that are not
//! installed, and garbage collection.

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use kube_api_double::{ADMIN_TOKEN, ApiServer};
use serde_json::{Value, json};

use crate::{api_error, client, namespace, pod};

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
    assert_eq!(
        api.get("apps/v1", "Deployment", Some("apps"), "web").unwrap()["spec"]["replicas"],
        3
    );

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
    assert!(
        status.message.contains("fieldManager: Required value"),
        "{}",
        status.message
    );
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
    let renewed = leases
        .replace("istiod", &PostParams::default(), &renewed)
        .await
        .unwrap();
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
    let stored = api
        .get("coordination.k8s.io/v1", "Lease", Some("istio-system"), "istiod")
        .unwrap();
    assert_eq!(stored["spec"]["holderIdentity"], "b");
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
    let mut watch = pods
        .watch(&WatchParams::default(), &api.resource_version().to_string())
        .await
        .unwrap()
        .boxed();
    let deployments: Api<Deployment> = Api::namespaced(client, "apps");
    deployments.delete("web", &DeleteParams::default()).await.unwrap();

    assert!(api.get("v1", "ConfigMap", Some("apps"), "web-config").is_none());
    assert!(
        api.get("v1", "Pod", Some("apps"), "web-1").is_none(),
        "the grandchild goes too"
    );
    assert!(api.get("v1", "Pod", Some("apps"), "unrelated").is_some());
    match watch.try_next().await.unwrap() {
        Some(WatchEvent::Deleted(pod)) => assert_eq!(pod.name_any(), "web-1"),
        other => panic!("expected the dependent's DELETED, got {other:?}"),
    }
}

#[tokio::test]
async fn generate_name_gives_each_object_a_fresh_name() {
    let api = ApiServer::start().await.unwrap();
    api.apply(namespace("apps"));
    let leases: Api<Lease> = Api::namespaced(client(&api, ADMIN_TOKEN).await, "apps");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"generateName": "lock-"}})).unwrap();
    let first = leases.create(&PostParams::default(), &lease).await.unwrap().name_any();
    let second = leases.create(&PostParams::default(), &lease).await.unwrap().name_any();
    assert!(
        first.starts_with("lock-") && first.len() == "lock-".len() + 5,
        "{first}"
    );
    assert_ne!(first, second);
    let nameless: Lease = serde_json::from_value(json!({"metadata": {}})).unwrap();
    let status = api_error(leases.create(&PostParams::default(), &nameless).await);
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
}
