//! The HTTP side: accepting connections, resolving each request to a target, authenticating and
//! authorizing it, recording it, and writing the answer (a JSON object, a `Status`, or a watch
//! stream).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};

use crate::auth::{ApiCall, BoundPod, User};
use crate::resources::{self, Kind, Path, Target};
use crate::rest::{self, Reply};
use crate::status::{self, Status};
use crate::store::{State, Store};
use crate::watch::WatchBody;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Serves `listener` until `stop` fires, then closes it and drops every open connection.
pub async fn serve(listener: TcpListener, store: Arc<Store>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    next_id += 1;
                    let span = info_span!("kube_api_connection", id = next_id, %peer);
                    connections.spawn(connection(stream, store.clone()).instrument(span));
                }
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn connection(stream: TcpStream, store: Arc<Store>) {
    let service = service_fn(move |request| {
        let store = store.clone();
        async move { Ok::<_, Infallible>(handle(store, request).await) }
    });
    if let Err(error) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(%error, "connection ended");
    }
}

/// A request's query parameters, percent-decoded.
pub type Query = HashMap<String, String>;

async fn handle(store: Arc<Store>, request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let query = parse_query(parts.uri.query().unwrap_or_default());
    let header = |name| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let (bearer, content_type, accept) = (
        header(header::AUTHORIZATION).to_owned(),
        header(header::CONTENT_TYPE).to_owned(),
        header(header::ACCEPT).to_owned(),
    );
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => return failure(&status::bad_request(format!("reading the request body: {error}"))),
    };
    let path = resources::resolve(parts.uri.path());
    let mut state = store.lock();
    let user = authenticate(&state, &bearer);
    let target = match path {
        Some(Path::Discovery(what)) => return json_response(200, &discovery(what)),
        Some(Path::TokenReviews) => return review_token(&mut state, user, &parts.method, &body),
        Some(Path::Resource(target)) => target,
        None if user.is_none() => return failure(&status::unauthorized()),
        None => return failure(&status::no_such_path()),
    };
    let Some(verb) = verb(&parts.method, &target, &query) else {
        return failure(&status::method_not_allowed());
    };
    let call = call(&user, verb, target.kind, Some(&target));
    let installed = state.installed(target.kind);
    if let Err(refused) = admit(&mut state, user, call, target.kind, installed) {
        return failure(&refused);
    }
    let request = rest::Request {
        target: &target,
        query: &query,
        content_type: &content_type,
        body: &body,
        metadata_only: accept.contains("as=PartialObjectMetadata"),
    };
    match rest::serve(&mut state, verb, &request) {
        Ok(Reply::Object(code, object)) => json_response(code, &object),
        Ok(Reply::Watch(subscription, timeout)) => {
            drop(state);
            let body = WatchBody::new(store.clone(), subscription, timeout, request.metadata_only);
            let mut response = Response::new(body.boxed_unsync());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(refused) => failure(&refused),
    }
}

/// Records the call, then lets it through if its user is authenticated, its resource served and
/// the verb allowed, in the API server's order (401, 404, 403).
fn admit(state: &mut State, user: Option<User>, call: ApiCall, kind: &Kind, served: bool) -> Result<(), Status> {
    state.calls.push(call.clone());
    let user = user.ok_or_else(status::unauthorized)?;
    if !served {
        return Err(status::no_such_path());
    }
    state.auth.authorize(&user, &call, kind)
}

/// `POST .../tokenreviews`: answered from the token table, never stored.
fn review_token(state: &mut State, user: Option<User>, method: &Method, body: &[u8]) -> Response<Body> {
    let kind = resources::token_reviews();
    let call = call(&user, "create", kind, None);
    if let Err(refused) = admit(state, user, call, kind, true) {
        return failure(&refused);
    }
    if *method != Method::POST {
        return failure(&status::method_not_allowed());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(review) => json_response(201, &token_review(state, &review)),
        Err(error) => failure(&status::bad_request(format!("decoding the TokenReview: {error}"))),
    }
}

/// The user a bearer token stands for; tokens must be valid for the API server's audience.
fn authenticate(state: &State, bearer: &str) -> Option<User> {
    let token = bearer.strip_prefix("Bearer ")?.trim();
    let pod_exists = |bound: BoundPod<'_>| state.pod_exists(bound);
    state.auth.review(token, &[], pod_exists).ok().map(|(user, _)| user)
}

fn token_review(state: &State, review: &Value) -> Value {
    state
        .auth
        .token_review(review, |bound: BoundPod<'_>| state.pod_exists(bound))
}

/// The RBAC verb of a request, as the API server derives it.
fn verb(method: &Method, target: &Target, query: &Query) -> Option<&'static str> {
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let named = target.name.is_some();
    Some(match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => return None,
    })
}

fn call(user: &Option<User>, verb: &str, kind: &Kind, target: Option<&Target>) -> ApiCall {
    ApiCall {
        user: user
            .as_ref()
            .map_or("system:anonymous", |u| u.username.as_str())
            .to_owned(),
        verb: verb.to_owned(),
        group: kind.group.to_owned(),
        resource: kind.plural.to_owned(),
        subresource: target.and_then(|t| t.subresource.clone()),
        namespace: target.and_then(|t| t.namespace.clone()),
        name: target.and_then(|t| t.name.clone()),
    }
}

fn discovery(what: &str) -> Value {
    match what {
        "version" => json!({"major": "1", "minor": "30", "gitVersion": "v1.30.0", "platform": "linux/amd64"}),
        "api" => json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        _ => {
            let mut groups: Vec<(&str, &str)> = resources::KINDS
                .iter()
                .filter(|k| !k.group.is_empty())
                .map(|k| (k.group, k.version))
                .collect();
            groups.dedup();
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(group, version)| {
                    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
                    json!({"name": group, "versions": [gv], "preferredVersion": gv})
                })
                .collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
    }
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("JSON values serialize");
    let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed_unsync());
    *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn failure(status: &Status) -> Response<Body> {
    json_response(status.code, &status.body)
}

fn parse_query(query: &str) -> Query {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(hex)) => {
                let digits = std::str::from_utf8(hex).expect("ASCII hex digits");
                out.push(u8::from_str_radix(digits, 16).expect("two hex digits"));
                i += 2;
            }
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        let query = parse_query("labelSelector=app%3Dweb%2Ctier+in+(a)&watch=1&x=%zz&y=%4");
        assert_eq!(query["labelSelector"], "app=web,tier in (a)");
        assert_eq!(query["watch"], "1");
        assert_eq!(query["x"], "%zz");
        assert_eq!(query["y"], "%4");
    }
}
