//! The Kubernetes source against kube's mocked API client: reflectors list and watch every kind,
//! the store follows ADDED/MODIFIED/DELETED events, and a kind whose CRD is missing (404) does not
//! hold up the others.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use istiod_lite::objects::Kind;
use istiod_lite::source::kubernetes;
use istiod_lite::store::{Objects, Store};
use istiod_lite::translate::{Mesh, translate};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

type Frames = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type MockBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// API paths of the kinds, as kube requests them.
const PODS: &str = "/api/v1/pods";
const GATEWAYS: &str = "/apis/gateway.networking.k8s.io/v1/gateways";

fn body(frames: Vec<Bytes>) -> (MockBody, Frames) {
    let (sender, receiver) = mpsc::channel(64);
    for frame in frames {
        sender.try_send(Ok(Frame::data(frame))).unwrap();
    }
    (StreamBody::new(ReceiverStream::new(receiver)), sender)
}

fn path_of(document: &Value) -> String {
    let api_version = document["apiVersion"].as_str().unwrap();
    let plural = format!("{}s", document["kind"].as_str().unwrap().to_lowercase());
    if api_version.contains('/') {
        format!("/apis/{api_version}/{plural}")
    } else {
        format!("/api/{api_version}/{plural}")
    }
}

/// Answers lists from `lists`, holds watches open (handing their senders to the test) and
/// answers 404 for the Gateway API, as a cluster without its CRDs does.
async fn api_server(
    handle: tower_test::mock::Handle<Request<Body>, Response<MockBody>>,
    lists: HashMap<String, Vec<Value>>,
    watches: mpsc::UnboundedSender<(String, Frames)>,
) {
    let mut handle = std::pin::pin!(handle);
    let mut open = Vec::new();
    while let Some((request, respond)) = handle.next_request().await {
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        if path == GATEWAYS {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"});
            let (body, _) = body(vec![Bytes::from(status.to_string())]);
            respond.send_response(Response::builder().status(StatusCode::NOT_FOUND).body(body).unwrap());
        } else if query.contains("watch=true") {
            let (body, sender) = body(Vec::new());
            open.push(sender.clone());
            let _ = watches.send((path, sender));
            respond.send_response(Response::new(body));
        } else {
            let items = lists.get(&path).cloned().unwrap_or_default();
            let list =
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items});
            let (body, _) = body(vec![Bytes::from(list.to_string())]);
            respond.send_response(Response::new(body));
        }
    }
}

async fn wait_for(store: &Store, what: &str, condition: impl Fn(&Objects) -> bool) -> Arc<Objects> {
    let mut updates = store.subscribe();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let current = updates.borrow_and_update().clone();
            if condition(&current) {
                return current;
            }
            updates.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "store never had {what}: {:?}",
            store.current().iter().map(|o| o.key().to_string()).collect::<Vec<_>>()
        )
    })
}

fn pod_names(objects: &Objects) -> Vec<String> {
    objects.pods().map(|p| p.metadata.name.clone().unwrap()).collect()
}

#[tokio::test]
async fn reflectors_feed_the_store_and_follow_watch_events() {
    let fixture = include_str!("fixtures/workloads.yaml");
    let mut reader = fixture.as_bytes();
    let mut lists: HashMap<String, Vec<Value>> = HashMap::new();
    for document in serde_saphyr::read::<_, Value>(&mut reader) {
        let document = document.unwrap();
        lists.entry(path_of(&document)).or_default().push(document);
    }
    let pod_count = lists[PODS].len();

    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
    let (watches, mut opened) = mpsc::unbounded_channel();
    tokio::spawn(api_server(handle, lists, watches));
    let store = Arc::new(Store::new());
    let (synced, initial_lists) = tokio::sync::oneshot::channel();
    let source = tokio::spawn(kubernetes::run(
        kube::Client::new(service, "default"),
        store.clone(),
        synced,
    ));
    // The Gateway API answers 404 here: a missing CRD counts as listed, so the store fills.
    tokio::time::timeout(Duration::from_secs(10), initial_lists)
        .await
        .expect("the initial lists complete without the Gateway API")
        .unwrap();

    let objects = wait_for(&store, "every pod and service", |o| {
        o.pods().count() == pod_count && o.services().count() == 3
    })
    .await;
    assert_eq!(objects.iter().filter(|o| o.key().kind == Kind::Namespace).count(), 2);
    assert_eq!(objects.gateways().count(), 0, "no Gateway API in this cluster");
    let translation = translate(&objects, &Mesh::default());
    assert!(
        translation
            .workloads
            .iter()
            .any(|w| w.uid == "Kubernetes//Pod/demo/server-7d4b9c-x2x")
    );

    // Watch events on pods: one added, one deleted.
    let pods_watch = loop {
        let (path, sender) = tokio::time::timeout(Duration::from_secs(10), opened.recv())
            .await
            .unwrap()
            .unwrap();
        if path == PODS {
            break sender;
        }
    };
    let late = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "late", "namespace": "demo", "resourceVersion": "2"}, "status": {"podIP": "10.0.1.99"}});
    let gone = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain", "namespace": "legacy", "resourceVersion": "3"}});
    for event in [
        json!({"type": "ADDED", "object": late}),
        json!({"type": "DELETED", "object": gone}),
    ] {
        pods_watch
            .send(Ok(Frame::data(Bytes::from(format!("{event}\n")))))
            .await
            .unwrap();
    }
    let objects = wait_for(&store, "the watched changes", |o| {
        let names = pod_names(o);
        names.contains(&"late".to_owned()) && !names.contains(&"plain".to_owned())
    })
    .await;
    assert_eq!(objects.pods().count(), pod_count);
    source.abort();
}
