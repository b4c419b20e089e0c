//! Failure `Status` objects, worded as the API server words them
//! (k8s.io/apimachinery/pkg/api/errors).

use serde_json::{Value, json};

use crate::resources::Kind;

/// A failed request: the HTTP code and the `Status` body that goes with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub code: u16,
    pub body: Value,
}

impl Status {
    fn new(code: u16, reason: &str, message: String, details: Option<Value>) -> Status {
        let mut body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        });
        if let Some(details) = details {
            body["details"] = details;
        }
        Status { code, body }
    }
}

fn details(kind: &Kind, name: &str) -> Value {
    let mut details = json!({ "kind": kind.plural });
    if !name.is_empty() {
        details["name"] = json!(name);
    }
    if !kind.group.is_empty() {
        details["group"] = json!(kind.group);
    }
    details
}

/// A path the server does not serve (or a CRD that is not installed).
pub fn no_such_path() -> Status {
    Status::new(
        404,
        "NotFound",
        "the server could not find the requested resource".to_owned(),
        None,
    )
}

pub fn not_found(kind: &Kind, name: &str) -> Status {
    let message = format!("{} \"{name}\" not found", kind.qualified());
    Status::new(404, "NotFound", message, Some(details(kind, name)))
}

pub fn already_exists(kind: &Kind, name: &str) -> Status {
    let message = format!("{} \"{name}\" already exists", kind.qualified());
    Status::new(409, "AlreadyExists", message, Some(details(kind, name)))
}

/// An update whose `metadata.resourceVersion` is not the stored one.
pub fn conflict(kind: &Kind, name: &str) -> Status {
    let message = format!(
        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
         please apply your changes to the latest version and try again",
        kind.qualified()
    );
    Status::new(409, "Conflict", message, Some(details(kind, name)))
}

/// RBAC's refusal; `reason` is the "User ... cannot ..." part.
pub fn forbidden(kind: &Kind, name: &str, reason: &str) -> Status {
    let message = if name.is_empty() {
        format!("{} is forbidden: {reason}", kind.qualified())
    } else {
        format!("{} \"{name}\" is forbidden: {reason}", kind.qualified())
    };
    Status::new(403, "Forbidden", message, Some(details(kind, name)))
}

/// A missing, unknown or expired bearer token.
pub fn unauthorized() -> Status {
    Status::new(401, "Unauthorized", "Unauthorized".to_owned(), None)
}

pub fn bad_request(message: String) -> Status {
    Status::new(400, "BadRequest", message, None)
}

/// A well-formed request whose object the server rejects (422).
pub fn invalid(kind: &Kind, name: &str, cause: &str) -> Status {
    let message = format!("{} \"{name}\" is invalid: {cause}", kind.kind);
    Status::new(422, "Invalid", message, Some(details(kind, name)))
}

pub fn unsupported_media_type(content_type: &str) -> Status {
    let message = format!(
        "the body of the request was in an unknown format ({content_type}) - accepted media types include: \
         application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, \
         application/strategic-merge-patch+json"
    );
    Status::new(415, "UnsupportedMediaType", message, None)
}

pub fn method_not_allowed() -> Status {
    Status::new(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource".to_owned(),
        None,
    )
}

/// A watch from a resourceVersion older than the kept history.
pub fn expired(requested: u64, oldest: u64) -> Status {
    let message = format!("too old resource version: {requested} ({oldest})");
    Status::new(410, "Expired", message, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::by_kind;

    #[test]
    fn conflict_names_the_qualified_resource() {
        let lease = by_kind("coordination.k8s.io/v1", "Lease").unwrap();
        let status = conflict(lease, "istiod");
        assert_eq!(
            status.body["message"],
            "Operation cannot be fulfilled on leases.coordination.k8s.io \"istiod\": the object has been \
             modified; please apply your changes to the latest version and try again"
        );
        assert_eq!(
            status.body["details"],
            json!({"name": "istiod", "group": "coordination.k8s.io", "kind": "leases"})
        );
    }

    #[test]
    fn the_unknown_path_status_is_the_servers() {
        let expected = json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
            "message":"the server could not find the requested resource","reason":"NotFound","code":404});
        assert_eq!(no_such_path().body, expected);
    }
}
