//! `waypoint apply|list|status|delete --kubernetes` against kube's mocked API client: the requests
//! the CLI makes (server-side apply of the Gateway, merge patches of the namespace label, lists
//! and a delete) and what it prints from the answers.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use kube::client::Body;
use serde_json::{Value, json};
use waypoint::cli::{Backend, Command, Store, Target, run_with};

const GATEWAY: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/demo/gateways/waypoint";

fn gateway() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "demo"},
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

fn namespace(labelled: bool) -> Value {
    let labels = if labelled {
        json!({"istio.io/use-waypoint": "waypoint"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": labels}})
}

/// (method, path?query, content-type, body) of every request.
type Seen = Arc<Mutex<Vec<(String, String, String, Value)>>>;

/// A client whose API server answers from the fixtures above and records what it was asked.
fn client() -> (kube::Client, Seen) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Full<Bytes>>>();
    let seen: Seen = Arc::default();
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let content_type = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let target = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
            let answer = match (parts.method.as_str(), parts.uri.path()) {
                ("PATCH" | "GET" | "DELETE", GATEWAY) => gateway(),
                ("PATCH", "/api/v1/namespaces/demo") => namespace(body.to_string().contains("\"waypoint\"")),
                ("GET", "/api/v1/namespaces/demo") => namespace(true),
                ("GET", "/apis/gateway.networking.k8s.io/v1/gateways") => {
                    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayList", "metadata": {}, "items": [gateway()]})
                }
                ("GET", "/api/v1/namespaces") => {
                    json!({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": [namespace(true)]})
                }
                other => panic!("unexpected request {other:?}"),
            };
            recorded
                .lock()
                .unwrap()
                .push((parts.method.to_string(), target, content_type, body));
            respond.send_response(Response::new(Full::new(Bytes::from(answer.to_string()))));
        }
    });
    (kube::Client::new(service, "default"), seen)
}

fn target() -> Target {
    Target {
        namespace: "demo".into(),
        name: "waypoint".into(),
        store: Store {
            kubernetes: true,
            ..Store::default()
        },
    }
}

#[tokio::test]
async fn apply_list_status_delete_through_the_kubernetes_api() {
    let (client, seen) = client();
    let backend = || Backend::Kubernetes(client.clone());

    let applied = run_with(
        Command::Apply {
            target: target(),
            enroll_namespace: true,
        },
        backend(),
    )
    .await
    .unwrap();
    assert_eq!(applied, "waypoint demo/waypoint applied\nnamespace demo now uses it\n");
    {
        let seen = seen.lock().unwrap();
        let (method, path, content_type, body) = &seen[0];
        assert_eq!(
            (method.as_str(), content_type.as_str()),
            ("PATCH", "application/apply-patch+yaml")
        );
        assert!(
            path.starts_with(GATEWAY) && path.contains("fieldManager=waypoint") && path.contains("force=true"),
            "{path}"
        );
        assert_eq!(body["spec"]["gatewayClassName"], "istio-waypoint");
        assert_eq!(body["spec"]["listeners"][0]["port"], 15008);
        let (method, path, content_type, body) = &seen[1];
        assert_eq!(
            (method.as_str(), path.as_str(), content_type.as_str()),
            ("PATCH", "/api/v1/namespaces/demo?", "application/merge-patch+json")
        );
        assert_eq!(body["metadata"]["labels"]["istio.io/use-waypoint"], "waypoint");
    }

    let store = Store {
        kubernetes: true,
        ..Store::default()
    };
    let listed = run_with(Command::List { store }, backend()).await.unwrap();
    assert_eq!(listed, "demo/waypoint  used by: demo\n");
    let status = run_with(Command::Status { target: target() }, backend()).await.unwrap();
    assert_eq!(status, "waypoint demo/waypoint: declared; used by: demo\n");

    let deleted = run_with(Command::Delete { target: target() }, backend()).await.unwrap();
    assert_eq!(
        deleted,
        "waypoint demo/waypoint deleted\nnamespace demo no longer uses it\n"
    );
    let seen = seen.lock().unwrap();
    let last = seen.last().unwrap();
    assert_eq!(last.0, "PATCH");
    assert_eq!(
        last.3,
        json!({"metadata": {"labels": {"istio.io/use-waypoint": null}}}),
        "the label is removed"
    );
    assert!(
        seen.iter()
            .any(|(method, path, _, _)| method == "DELETE" && path.starts_with(GATEWAY))
    );
}
