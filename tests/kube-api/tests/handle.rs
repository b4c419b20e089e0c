//! The handle a test drives the cluster with, and the server's answers to plain HTTP requests
//! (no client library in between).

use kube_api_double::{ADMIN_TOKEN, ApiServer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config_map(data: Value, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "settings", "namespace": "apps", "labels": labels}, "data": data})
}

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "apps"}, "spec": spec})
}

fn version(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn generation_counts_changes_outside_metadata_and_status() {
    let api = ApiServer::start().await.unwrap();
    let first = api.apply(config_map(json!({"k": "v"}), json!({})));
    assert_eq!(first["metadata"]["generation"], 1);
    let relabelled = api.apply(config_map(json!({"k": "v"}), json!({"a": "b"})));
    assert_eq!(relabelled["metadata"]["generation"], 1);
    assert_eq!(version(&relabelled), version(&first) + 1);
    let changed = api.apply(config_map(json!({"k": "w"}), json!({"a": "b"})));
    assert_eq!(changed["metadata"]["generation"], 2);
    assert_eq!(changed["metadata"]["uid"], first["metadata"]["uid"]);
    let same = api.apply(config_map(json!({"k": "w"}), json!({"a": "b"})));
    assert_eq!(
        version(&same),
        version(&changed),
        "a write that changes nothing is not a change"
    );

    api.apply(
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "apps"},
                     "spec": {"replicas": 1}}),
    );
    api.set_status(
        "apps/v1",
        "Deployment",
        Some("apps"),
        "web",
        json!({"readyReplicas": 1}),
    );
    let deployment = api.get("apps/v1", "Deployment", Some("apps"), "web").unwrap();
    assert_eq!(deployment["status"], json!({"readyReplicas": 1}));
    assert_eq!(deployment["spec"], json!({"replicas": 1}));
    assert_eq!(deployment["metadata"]["generation"], 1);
    assert_eq!(version(&deployment), api.resource_version());
}

#[tokio::test]
async fn services_get_cluster_ips_in_order() {
    let api = ApiServer::start().await.unwrap();
    let ip = |service: &Value| service["spec"]["clusterIP"].clone();
    let a = api.apply(service("a", json!({"ports": [{"port": 80}]})));
    assert_eq!(ip(&a), "10.96.0.1");
    assert_eq!(a["spec"]["clusterIPs"], json!(["10.96.0.1"]));
    assert_eq!(ip(&api.apply(service("b", json!({})))), "10.96.0.2");
    assert_eq!(
        ip(&api.apply(service("c", json!({"clusterIP": "10.96.0.3"})))),
        "10.96.0.3"
    );
    assert_eq!(
        ip(&api.apply(service("d", json!({})))),
        "10.96.0.4",
        "an IP in use is skipped"
    );
    assert_eq!(ip(&api.apply(service("h", json!({"clusterIP": "None"})))), "None");
    let external = api.apply(service(
        "e",
        json!({"type": "ExternalName", "externalName": "example.com"}),
    ));
    assert_eq!(ip(&external), Value::Null);
    let replaced = api.apply(service("a", json!({"ports": [{"port": 81}]})));
    assert_eq!(ip(&replaced), "10.96.0.1", "a replace without clusterIP keeps it");
}

#[tokio::test]
async fn deleting_a_namespace_deletes_what_is_in_it() {
    let api = ApiServer::start().await.unwrap();
    api.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings, namespace: apps}\n---\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings, namespace: other}\n",
    );
    assert_eq!(api.list("v1", "ConfigMap").len(), 2);
    assert!(api.delete("v1", "Namespace", None, "apps"));
    assert!(api.get("v1", "ConfigMap", Some("apps"), "settings").is_none());
    assert!(api.get("v1", "ConfigMap", Some("other"), "settings").is_some());
    assert!(!api.delete("v1", "Namespace", None, "apps"), "already gone");
}

#[tokio::test]
async fn seeded_objects_keep_a_uid_the_test_gives() {
    let api = ApiServer::start().await.unwrap();
    let pod = |labels: Value| {
        let metadata = json!({"name": "p", "uid": "fixed-uid", "labels": labels});
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata})
    };
    let created = api.apply(pod(json!({})));
    assert_eq!(created["metadata"]["uid"], "fixed-uid");
    assert_eq!(created["metadata"]["namespace"], "default");
    let stamp = created["metadata"]["creationTimestamp"].as_str().unwrap();
    assert!(stamp.len() == 20 && stamp.ends_with('Z'), "{stamp}");
    let mut without_uid = pod(json!({"x": "y"}));
    without_uid["metadata"].as_object_mut().unwrap().remove("uid");
    assert_eq!(api.apply(without_uid)["metadata"]["uid"], "fixed-uid");
}

#[test]
#[should_panic(expected = "no kind Widget in v1")]
fn an_unknown_kind_is_a_test_bug() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let api = runtime.block_on(ApiServer::start()).unwrap();
    let _guard = runtime.enter();
    api.apply(json!({"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "w"}}));
}

/// One HTTP/1.1 request; the status code and the body as JSON.
async fn request(api: &ApiServer, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let address = api.url().trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&address).await.unwrap();
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\n{authorization}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        head.to_ascii_lowercase().contains("content-type: application/json"),
        "{head}"
    );
    (code, serde_json::from_str(body).unwrap())
}

#[tokio::test]
async fn plain_requests_get_the_servers_answers() {
    let api = ApiServer::start().await.unwrap();
    let (code, version) = request(&api, "GET", "/version", None).await;
    assert_eq!((code, &version["gitVersion"]), (200, &json!("v1.30.0")));
    assert_eq!((&version["major"], &version["minor"]), (&json!("1"), &json!("30")));

    let (code, status) = request(&api, "GET", "/api/v1/widgets", Some(ADMIN_TOKEN)).await;
    assert_eq!(code, 404);
    let not_found = json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
        "message":"the server could not find the requested resource","reason":"NotFound","code":404});
    assert_eq!(status, not_found);

    let (code, status) = request(&api, "GET", "/api/v1/pods", None).await;
    assert_eq!((code, &status["reason"]), (401, &json!("Unauthorized")));

    api.apply(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "apps",
                     "labels": {"app": "web"}}}),
    );
    let (code, list) = request(&api, "GET", "/api/v1/pods?labelSelector=app%3Dweb", Some(ADMIN_TOKEN)).await;
    assert_eq!(
        (code, &list["kind"], &list["apiVersion"]),
        (200, &json!("PodList"), &json!("v1"))
    );
    assert_eq!(list["metadata"]["resourceVersion"], api.resource_version().to_string());
    assert_eq!(list["items"][0]["metadata"]["name"], "p");
    let (_, none) = request(
        &api,
        "GET",
        "/api/v1/namespaces/apps/pods?labelSelector=app!%3Dweb",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(none["items"], json!([]));

    let (code, status) = request(&api, "GET", "/api/v1/namespaces/apps/pods/q", Some(ADMIN_TOKEN)).await;
    assert_eq!((code, &status["message"]), (404, &json!("pods \"q\" not found")));
    assert_eq!(status["details"], json!({"name": "q", "kind": "pods"}));
    let (code, deleted) = request(&api, "DELETE", "/api/v1/namespaces/apps/pods/p", Some(ADMIN_TOKEN)).await;
    assert_eq!((code, &deleted["metadata"]["name"]), (200, &json!("p")));
}
