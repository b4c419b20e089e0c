//! The Kubernetes objects istiod-lite reads, typed: Namespace, Pod, Service (k8s-openapi), Istio's
//! security and networking resources, and the Gateway API. [`parse`] turns one decoded YAML/JSON
//! document into an [`Object`], naming the path of any bad field: an unknown field in an Istio
//! spec, or a policy part that is empty ([`istio::validate`]), is an error, never a match-all.

pub mod gateway;
pub mod istio;

use std::fmt;
use std::sync::Arc;

pub use gateway::{Gateway, HTTPRoute};
pub use istio::{AuthorizationPolicy, PeerAuthentication, ServiceEntry, WorkloadEntry};
pub use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;

/// The kinds istiod-lite understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    AuthorizationPolicy,
    PeerAuthentication,
    ServiceEntry,
    WorkloadEntry,
    Gateway,
    HTTPRoute,
}

impl Kind {
    /// The kind of `apiVersion`/`kind`, for the API versions Kubernetes and Istio serve.
    pub fn of(api_version: &str, kind: &str) -> Option<Self> {
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        let kind = match (group, kind) {
            ("", "Namespace") => Self::Namespace,
            ("", "Pod") => Self::Pod,
            ("", "Service") => Self::Service,
            ("security.istio.io", "AuthorizationPolicy") => Self::AuthorizationPolicy,
            ("security.istio.io", "PeerAuthentication") => Self::PeerAuthentication,
            ("networking.istio.io", "ServiceEntry") => Self::ServiceEntry,
            ("networking.istio.io", "WorkloadEntry") => Self::WorkloadEntry,
            ("gateway.networking.k8s.io", "Gateway") => Self::Gateway,
            ("gateway.networking.k8s.io", "HTTPRoute") => Self::HTTPRoute,
            _ => return None,
        };
        Some(kind)
    }

    pub fn is_namespaced(self) -> bool {
        self != Self::Namespace
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identifies an object: kind, namespace (empty for namespaces) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One typed object.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    PeerAuthentication(Arc<PeerAuthentication>),
    ServiceEntry(Arc<ServiceEntry>),
    WorkloadEntry(Arc<WorkloadEntry>),
    Gateway(Arc<Gateway>),
    HTTPRoute(Arc<HTTPRoute>),
}

impl Object {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Namespace(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::AuthorizationPolicy(o) => &o.metadata,
            Self::PeerAuthentication(o) => &o.metadata,
            Self::ServiceEntry(o) => &o.metadata,
            Self::WorkloadEntry(o) => &o.metadata,
            Self::Gateway(o) => &o.metadata,
            Self::HTTPRoute(o) => &o.metadata,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Namespace(_) => Kind::Namespace,
            Self::Pod(_) => Kind::Pod,
            Self::Service(_) => Kind::Service,
            Self::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Self::PeerAuthentication(_) => Kind::PeerAuthentication,
            Self::ServiceEntry(_) => Kind::ServiceEntry,
            Self::WorkloadEntry(_) => Kind::WorkloadEntry,
            Self::Gateway(_) => Kind::Gateway,
            Self::HTTPRoute(_) => Kind::HTTPRoute,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let metadata = self.metadata();
        ObjectKey {
            kind: self.kind(),
            namespace: metadata.namespace.clone().unwrap_or_default(),
            name: metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// Why a document is not a usable object. Displays as `Kind/ns/name: field <path>: <reason>`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("document has no {0}")]
    MissingType(&'static str),
    #[error("{api_version} {kind} is not a kind istiod-lite reads")]
    UnknownKind { api_version: String, kind: String },
    #[error("{key}: field {path}: {reason}")]
    Field {
        key: ObjectKey,
        path: String,
        reason: String,
    },
}

/// Parses one document. Namespaced objects without a namespace land in `default`, as with kubectl.
pub fn parse(document: serde_json::Value) -> Result<Object, ParseError> {
    let text = |field: &'static str| {
        document
            .get(field)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or(ParseError::MissingType(field))
    };
    let (api_version, kind_name) = (text("apiVersion")?, text("kind")?);
    let kind = Kind::of(&api_version, &kind_name).ok_or(ParseError::UnknownKind {
        api_version,
        kind: kind_name,
    })?;
    let name = document
        .pointer("/metadata/name")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let namespace = document
        .pointer("/metadata/namespace")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    let key = ObjectKey {
        kind,
        namespace: if kind.is_namespaced() {
            namespace.clone().unwrap_or_else(|| "default".into())
        } else {
            String::new()
        },
        name: name.clone(),
    };
    let field_error = |path: &str, reason: String| ParseError::Field {
        key: key.clone(),
        path: path.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(field_error("metadata.name", "missing or empty".into()));
    }
    let mut object = match kind {
        Kind::Namespace => Object::Namespace(typed(document, &field_error)?),
        Kind::Pod => Object::Pod(typed(document, &field_error)?),
        Kind::Service => Object::Service(typed(document, &field_error)?),
        Kind::AuthorizationPolicy => {
            let invalid = |e: istio::validate::Invalid| field_error(&e.path, e.reason);
            istio::validate::explicit_empties(&document).map_err(invalid)?;
            let policy: Arc<AuthorizationPolicy> = typed(document, &field_error)?;
            policy.spec.validate().map_err(invalid)?;
            Object::AuthorizationPolicy(policy)
        }
        Kind::PeerAuthentication => Object::PeerAuthentication(typed(document, &field_error)?),
        Kind::ServiceEntry => Object::ServiceEntry(typed(document, &field_error)?),
        Kind::WorkloadEntry => Object::WorkloadEntry(typed(document, &field_error)?),
        Kind::Gateway => Object::Gateway(typed(document, &field_error)?),
        Kind::HTTPRoute => Object::HTTPRoute(typed(document, &field_error)?),
    };
    if kind.is_namespaced() && namespace.is_none() {
        set_namespace(&mut object, "default");
    }
    Ok(object)
}

fn typed<T: DeserializeOwned>(
    document: serde_json::Value,
    field_error: &impl Fn(&str, String) -> ParseError,
) -> Result<Arc<T>, ParseError> {
    serde_path_to_error::deserialize(document)
        .map(Arc::new)
        .map_err(|error| {
            let path = error.path().to_string();
            field_error(&path, error.into_inner().to_string())
        })
}

fn set_namespace(object: &mut Object, namespace: &str) {
    fn set<T: Clone>(object: &mut Arc<T>, meta: impl FnOnce(&mut T) -> &mut ObjectMeta, namespace: &str) {
        meta(Arc::make_mut(object)).namespace = Some(namespace.to_owned());
    }
    match object {
        Object::Namespace(_) => {}
        Object::Pod(o) => set(o, |o| &mut o.metadata, namespace),
        Object::Service(o) => set(o, |o| &mut o.metadata, namespace),
        Object::AuthorizationPolicy(o) => set(o, |o| &mut o.metadata, namespace),
        Object::PeerAuthentication(o) => set(o, |o| &mut o.metadata, namespace),
        Object::ServiceEntry(o) => set(o, |o| &mut o.metadata, namespace),
        Object::WorkloadEntry(o) => set(o, |o| &mut o.metadata, namespace),
        Object::Gateway(o) => set(o, |o| &mut o.metadata, namespace),
        Object::HTTPRoute(o) => set(o, |o| &mut o.metadata, namespace),
    }
}

impl ParseError {
    /// The object the error is about, when the document said which.
    pub fn key(&self) -> Option<&ObjectKey> {
        match self {
            Self::Field { key, .. } => Some(key),
            _ => None,
        }
    }
}
