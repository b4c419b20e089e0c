//! A small in-memory Kubernetes API behind kube's mocked client, for the controller's tests: it
//! keeps objects by path, answers GET, LIST, POST and (apply) PATCH including `/status`, assigns
//! Service cluster IPs, holds watches open (tests push events into them) and records every call.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

type Frames = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type MockBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub(super) struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

/// What answering a request does besides answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    Nothing,
    /// The response stays open as a watch.
    Watch,
    /// An object changed: watchers get this event.
    Event(&'static str),
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    calls: Vec<Call>,
    watches: Vec<(String, Frames)>,
    /// Writes to these paths are answered with this code and message.
    refusals: BTreeMap<String, (u16, String)>,
    version: u64,
    /// Every event sent, with the version it happened at, for watches that start behind.
    log: Vec<(u64, String, String)>,
}

#[derive(Clone, Default)]
pub(super) struct FakeApi(Arc<Mutex<State>>);

/// Whether `path` names a collection (`/api/v1/services`, `/api/v1/namespaces/demo/services`)
/// rather than one object.
fn is_collection(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let rest = &segments[if segments[0] == "api" { 2 } else { 3 }..];
    if rest.len() >= 3 && rest[0] == "namespaces" {
        rest.len() == 3
    } else {
        rest.len() == 1
    }
}

/// The path of a collection (`/api/v1/services`) matches its namespaced objects too.
fn in_collection(collection: &str, object: &str) -> bool {
    let (prefix, plural) = collection.rsplit_once('/').unwrap();
    object.starts_with(prefix) && object.rsplit('/').nth(1) == Some(plural)
}

fn body(content: Option<Value>) -> (MockBody, Frames) {
    let (sender, receiver) = mpsc::channel(16);
    if let Some(content) = content {
        sender
            .try_send(Ok(Frame::data(Bytes::from(content.to_string()))))
            .unwrap();
    }
    (StreamBody::new(ReceiverStream::new(receiver)), sender)
}

/// The path of an object from its apiVersion, kind, namespace and name.
fn path_of(object: &Value) -> Option<String> {
    let api_version = object["apiVersion"].as_str()?;
    let kind = object["kind"].as_str()?.to_lowercase();
    let plural = if kind.ends_with('s') {
        format!("{kind}es")
    } else {
        format!("{kind}s")
    };
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    let name = object["metadata"]["name"].as_str()?;
    Some(match object["metadata"]["namespace"].as_str() {
        Some(namespace) => format!("{prefix}/namespaces/{namespace}/{plural}/{name}"),
        None => format!("{prefix}/{plural}/{name}"),
    })
}

/// A failure as the API server words it (kube's `get_opt` relies on the reason `NotFound`).
fn status(code: u16, message: &str) -> Value {
    let reason = match code {
        404 => "NotFound",
        409 => "AlreadyExists",
        422 => "Invalid",
        _ => "InternalError",
    };
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": message, "reason": reason})
}

impl FakeApi {
    pub fn client(&self) -> kube::Client {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
        let fake = self.clone();
        tokio::spawn(async move {
            let mut handle = std::pin::pin!(handle);
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, content) = request.into_parts();
                let bytes = content.collect().await.unwrap().to_bytes();
                let call = Call {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_owned(),
                    query: parts.uri.query().unwrap_or_default().to_owned(),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                let (code, content, effect) = fake.answer(&call);
                if let Effect::Event(event) = effect {
                    fake.notify(event, content.clone().unwrap_or_default());
                }
                let (body, sender) = body(content);
                let mut state = fake.0.lock().unwrap();
                state.calls.push(call.clone());
                if effect == Effect::Watch {
                    // As the API server: a watch from a resourceVersion first gets what came after it.
                    let since = call.query.split('&').find_map(|p| p.strip_prefix("resourceVersion="));
                    let since: u64 = since.and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
                    for (version, path, line) in &state.log {
                        if *version > since && in_collection(&call.path, path) {
                            let _ = sender.try_send(Ok(Frame::data(Bytes::from(line.clone()))));
                        }
                    }
                    state.watches.push((call.path, sender));
                }
                respond.send_response(Response::builder().status(code).body(body).unwrap());
            }
        });
        kube::Client::new(service, "default")
    }

    pub fn put(&self, path: &str, object: Value) {
        self.0.lock().unwrap().objects.insert(path.to_owned(), object);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    pub fn refuse(&self, path: &str, code: u16, message: &str) {
        self.0
            .lock()
            .unwrap()
            .refusals
            .insert(path.to_owned(), (code, message.to_owned()));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().calls.clone()
    }

    /// The writes (POST, PATCH, PUT, DELETE) seen so far, as `METHOD path`.
    pub fn writes(&self) -> Vec<String> {
        let calls = self.calls();
        let writes = calls.iter().filter(|c| c.method != "GET");
        writes.map(|c| format!("{} {}", c.method, c.path)).collect()
    }

    /// Deletes the object at `path` as the API would: watchers see it go.
    pub fn delete(&self, path: &str) -> usize {
        let mut object = {
            let mut state = self.0.lock().unwrap();
            state.version += 1;
            state.objects.remove(path).unwrap()
        };
        object["metadata"]["resourceVersion"] = json!(self.0.lock().unwrap().version.to_string());
        self.notify("DELETED", object)
    }

    /// Sends a watch event about `object` to every open watch of its collection; returns how many
    /// watchers took it (a dropped watcher does not).
    fn notify(&self, kind: &str, object: Value) -> usize {
        let Some(path) = path_of(&object) else { return 0 };
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        let mut state = self.0.lock().unwrap();
        let version = state.version;
        state.log.push((version, path.clone(), line.clone()));
        let open = state
            .watches
            .iter()
            .filter(|(collection, _)| in_collection(collection, &path));
        open.filter(|(_, sender)| sender.try_send(Ok(Frame::data(Bytes::from(line.clone())))).is_ok())
            .count()
    }

    fn answer(&self, call: &Call) -> (u16, Option<Value>, Effect) {
        use Effect::{Event, Nothing, Watch};
        let mut state = self.0.lock().unwrap();
        if call.method == "GET" && call.query.contains("watch=true") {
            return (200, None, Watch);
        }
        let refusal = state.refusals.get(&call.path).filter(|_| call.method != "GET");
        if let Some((code, message)) = refusal {
            return (*code, Some(status(*code, message)), Nothing);
        }
        let not_found = (404, Some(status(404, "not found")), Nothing);
        let (path, subresource) = match call.path.strip_suffix("/status") {
            Some(path) => (path.to_owned(), true),
            None => (call.path.clone(), false),
        };
        let version = (state.version + 1).to_string();
        let mut object = match call.method.as_str() {
            "GET" if is_collection(&path) => {
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|(p, _)| in_collection(&path, p))
                    .map(|(_, o)| o.clone())
                    .collect();
                let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": state.version.to_string()}, "items": items});
                return (200, Some(list), Nothing);
            }
            "GET" => {
                return state
                    .objects
                    .get(&path)
                    .map_or(not_found, |o| (200, Some(o.clone()), Nothing));
            }
            "POST" => {
                let name = call.body["metadata"]["name"].as_str().unwrap_or_default();
                if state.objects.contains_key(&format!("{path}/{name}")) {
                    return (409, Some(status(409, "already exists")), Nothing);
                }
                let mut object = call.body.clone();
                object["metadata"]["generation"] = json!(1);
                object
            }
            "PATCH" if subresource => {
                let Some(existing) = state.objects.get(&path) else {
                    return not_found;
                };
                let mut object = existing.clone();
                object["status"] = call.body["status"].clone();
                object
            }
            "PATCH" => {
                let mut object = call.body.clone();
                let existing = state.objects.get(&path);
                object["status"] = existing.map(|e| e["status"].clone()).unwrap_or_default();
                let ip = existing.map_or(json!("10.96.0.10"), |e| e["spec"]["clusterIP"].clone());
                if path.contains("/services/") && ip.is_string() {
                    object["spec"]["clusterIP"] = ip;
                }
                object
            }
            _ => return (405, Some(status(405, "not allowed")), Nothing),
        };
        let path = if call.method == "POST" {
            format!("{path}/{}", call.body["metadata"]["name"].as_str().unwrap_or_default())
        } else {
            path
        };
        // As the API server: a write that changes nothing is no event and keeps the version.
        let existing = state.objects.get(&path).cloned();
        if let Some(existing) = &existing {
            object["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"].clone();
            if &object == existing {
                return (200, Some(object), Nothing);
            }
        }
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(version);
        state.objects.insert(path, object.clone());
        match existing {
            Some(_) => (200, Some(object), Event("MODIFIED")),
            None => (201, Some(object), Event("ADDED")),
        }
    }
}
