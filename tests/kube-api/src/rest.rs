//! The REST verbs on a resolved target: get, list, watch, create, update, patch, delete and
//! deletecollection, with the status codes and `Status` failures the API server gives.

use std::time::Duration;

use serde_json::{Value, json};

use crate::http::Query;
use crate::patch::{self, PatchType};
use crate::resources::Target;
use crate::selector::Selector;
use crate::status::{self, Status};
use crate::store::{Origin, State, Write};
use crate::watch::{Filter, Subscription, partial_metadata};

/// A watch without `timeoutSeconds` stays open this long (the server's minimum request timeout).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// What a verb needs from the request.
#[derive(Debug)]
pub struct Request<'a> {
    pub target: &'a Target,
    pub query: &'a Query,
    pub content_type: &'a str,
    pub body: &'a [u8],
    /// `Accept: ...;as=PartialObjectMetadata`: answer with metadata only.
    pub metadata_only: bool,
}

/// A verb's answer.
#[derive(Debug)]
pub enum Reply {
    Object(u16, Value),
    Watch(Subscription, Duration),
}

pub fn serve(state: &mut State, verb: &str, request: &Request<'_>) -> Result<Reply, Status> {
    let target = request.target;
    let namespace = target.namespace.as_deref();
    let shape = |object: Value| {
        if request.metadata_only {
            partial_metadata(&object)
        } else {
            object
        }
    };
    match verb {
        "get" => {
            let name = target.name.as_deref().unwrap_or_default();
            let object = state.get(target.kind, namespace, name).cloned();
            let object = object.ok_or_else(|| status::not_found(target.kind, name))?;
            Ok(Reply::Object(200, shape(object)))
        }
        "list" => {
            let selector = selector(request.query)?;
            let items: Vec<Value> = state
                .list(target.kind, namespace)
                .filter(|o| selector.matches(o))
                .cloned()
                .map(shape)
                .collect();
            Ok(Reply::Object(200, list(request, items, state.revision())))
        }
        "watch" => watch(state, request),
        "create" => create(state, request),
        "update" => update(state, request),
        "patch" => patch(state, request),
        "delete" => {
            let name = target.name.as_deref().unwrap_or_default();
            Ok(Reply::Object(200, state.delete(target.kind, namespace, name)?))
        }
        "deletecollection" => {
            let selector = selector(request.query)?;
            let names: Vec<(Option<String>, String)> = state
                .list(target.kind, namespace)
                .filter(|o| selector.matches(o))
                .map(|o| {
                    (
                        o["metadata"]["namespace"].as_str().map(str::to_owned),
                        name_of(o).to_owned(),
                    )
                })
                .collect();
            let deleted = names
                .iter()
                .filter_map(|(ns, name)| state.delete(target.kind, ns.as_deref(), name).ok())
                .collect();
            Ok(Reply::Object(200, list(request, deleted, state.revision())))
        }
        _ => Err(status::method_not_allowed()),
    }
}

fn list(request: &Request<'_>, items: Vec<Value>, revision: u64) -> Value {
    let kind = request.target.kind;
    let (api_version, list_kind) = if request.metadata_only {
        ("meta.k8s.io/v1".to_owned(), "PartialObjectMetadataList".to_owned())
    } else {
        (kind.api_version(), format!("{}List", kind.kind))
    };
    json!({"kind": list_kind, "apiVersion": api_version, "metadata": {"resourceVersion": revision.to_string()},
           "items": items})
}

fn selector(query: &Query) -> Result<Selector, Status> {
    let labels = query.get("labelSelector").map(String::as_str);
    let fields = query.get("fieldSelector").map(String::as_str);
    Selector::parse(labels, fields).map_err(status::bad_request)
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn watch(state: &mut State, request: &Request<'_>) -> Result<Reply, Status> {
    let query = request.query;
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true" || v == "1");
    let mut selector = selector(query)?;
    if let Some(name) = &request.target.name {
        selector = selector.named(name);
    }
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(version) => Some(
            version
                .parse::<u64>()
                .map_err(|_| status::bad_request(format!("invalid resource version {version:?}")))?,
        ),
    };
    let timeout = match query.get("timeoutSeconds") {
        Some(seconds) => Duration::from_secs(
            seconds
                .parse()
                .map_err(|_| status::bad_request(format!("invalid timeoutSeconds {seconds:?}")))?,
        ),
        None => DEFAULT_WATCH_TIMEOUT,
    };
    let filter = Filter {
        kind: request.target.kind,
        namespace: request.target.namespace.clone(),
        selector,
        bookmarks: flag("allowWatchBookmarks"),
    };
    let subscription = state.watch(filter, from, flag("sendInitialEvents"));
    Ok(Reply::Watch(subscription, timeout))
}

fn body_object(request: &Request<'_>) -> Result<Value, Status> {
    let object: Value = serde_json::from_slice(request.body)
        .map_err(|e| status::bad_request(format!("couldn't get version/kind; json parse error: {e}")))?;
    if !object.is_object() {
        return Err(status::bad_request("the request body is not an object".to_owned()));
    }
    Ok(object)
}

/// The body's name and namespace must agree with the URL's (an empty one takes the URL's).
fn check_identity(request: &Request<'_>, object: &mut Value) -> Result<(), Status> {
    let target = request.target;
    if let Some(name) = &target.name {
        match object["metadata"]["name"].as_str() {
            None | Some("") => object["metadata"]["name"] = json!(name),
            Some(own) if own != name => {
                let message = format!("the name of the object ({own}) does not match the name on the URL ({name})");
                return Err(status::bad_request(message));
            }
            Some(_) => {}
        }
    }
    if let (Some(namespace), Some(own)) = (&target.namespace, object["metadata"]["namespace"].as_str())
        && own != namespace
    {
        let message = "the namespace of the provided object does not match the namespace sent on the request";
        return Err(status::bad_request(message.to_owned()));
    }
    Ok(())
}

fn create(state: &mut State, request: &Request<'_>) -> Result<Reply, Status> {
    let target = request.target;
    if target.name.is_some() {
        return Err(status::method_not_allowed());
    }
    let mut object = body_object(request)?;
    check_identity(request, &mut object)?;
    if target.kind.status && object.get("status").is_some() {
        object.as_object_mut().map(|o| o.remove("status"));
    }
    if let Some(manager) = request.query.get("fieldManager") {
        patch::managed(&mut object, manager, "Update", None);
    }
    let created = state.create(target.kind, target.namespace.as_deref(), object, Origin::Client)?;
    Ok(Reply::Object(201, created))
}

fn write_of(target: &Target) -> Write {
    if target.subresource.is_some() {
        Write::Status
    } else {
        Write::Main
    }
}

fn update(state: &mut State, request: &Request<'_>) -> Result<Reply, Status> {
    let target = request.target;
    let name = target.name.as_deref().ok_or_else(status::method_not_allowed)?;
    let mut object = body_object(request)?;
    check_identity(request, &mut object)?;
    if let Some(manager) = request.query.get("fieldManager") {
        patch::managed(&mut object, manager, "Update", target.subresource.as_deref());
    }
    let namespace = target.namespace.as_deref();
    let updated = state.update(target.kind, namespace, name, object, write_of(target))?;
    Ok(Reply::Object(200, updated))
}

fn patch(state: &mut State, request: &Request<'_>) -> Result<Reply, Status> {
    let target = request.target;
    let (kind, namespace) = (target.kind, target.namespace.as_deref());
    let name = target.name.as_deref().ok_or_else(status::method_not_allowed)?;
    let patch_type = PatchType::from_content_type(request.content_type)
        .ok_or_else(|| status::unsupported_media_type(request.content_type))?;
    let existing = state.get(kind, namespace, name).cloned();
    let patched = match patch_type {
        PatchType::Apply => return apply(state, request, existing),
        PatchType::Merge | PatchType::Strategic => {
            let mut patched = existing.ok_or_else(|| status::not_found(kind, name))?;
            patch::merge(&mut patched, &body_object(request)?);
            patched
        }
        PatchType::Json => {
            let existing = existing.ok_or_else(|| status::not_found(kind, name))?;
            let operations: Value = serde_json::from_slice(request.body)
                .map_err(|e| status::bad_request(format!("decoding the JSON patch: {e}")))?;
            patch::json_patch(&existing, &operations).map_err(|cause| status::invalid(kind, name, &cause))?
        }
    };
    let mut patched = patched;
    check_identity(request, &mut patched)?;
    if let Some(manager) = request.query.get("fieldManager") {
        patch::managed(&mut patched, manager, "Update", target.subresource.as_deref());
    }
    Ok(Reply::Object(
        200,
        state.update(kind, namespace, name, patched, write_of(target))?,
    ))
}

/// Server-side apply: creates the object when absent, else lays the applied fields over it.
fn apply(state: &mut State, request: &Request<'_>, existing: Option<Value>) -> Result<Reply, Status> {
    let target = request.target;
    let (kind, namespace) = (target.kind, target.namespace.as_deref());
    let name = target.name.as_deref().unwrap_or_default();
    let manager = request
        .query
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            status::bad_request(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
                    .to_owned(),
            )
        })?;
    let text = std::str::from_utf8(request.body).map_err(|e| status::bad_request(format!("apply body: {e}")))?;
    let mut applied: Value = serde_json::from_str(text)
        .or_else(|_| serde_saphyr::from_str(text))
        .map_err(|e| status::bad_request(format!("error decoding YAML: {e}")))?;
    if !applied.is_object() {
        return Err(status::bad_request(
            "the applied configuration is not an object".to_owned(),
        ));
    }
    check_identity(request, &mut applied)?;
    let subresource = target.subresource.as_deref();
    let Some(existing) = existing else {
        if subresource.is_some() {
            return Err(status::not_found(kind, name));
        }
        if kind.status {
            applied.as_object_mut().map(|o| o.remove("status"));
        }
        applied["apiVersion"] = json!(kind.api_version());
        patch::managed(&mut applied, manager, "Apply", None);
        return Ok(Reply::Object(
            201,
            state.create(kind, namespace, applied, Origin::Client)?,
        ));
    };
    let version = &applied["metadata"]["resourceVersion"];
    if !version.is_null() && *version != existing["metadata"]["resourceVersion"] {
        return Err(status::conflict(kind, name));
    }
    let mut merged = patch::apply(&existing, &applied, subresource.is_some());
    patch::managed(&mut merged, manager, "Apply", subresource);
    Ok(Reply::Object(
        200,
        state.update(kind, namespace, name, merged, write_of(target))?,
    ))
}
