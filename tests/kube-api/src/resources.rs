//! The table of kinds the double serves, and the REST paths that name them.
//!
//! A path is resolved the way the API server's request-info resolver does it:
//! `/api/v1/[namespaces/{ns}/]{plural}[/{name}[/{subresource}]]` for the core group and
//! `/apis/{group}/{version}/[namespaces/{ns}/]{plural}[/{name}[/{subresource}]]` for the others.

/// One kind of object: where it lives and what it is called.
#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    /// The API group; `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// The lower-case plural of the REST path (`pods`), also RBAC's resource name.
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Whether the kind has a `status` subresource (so the main resource ignores status changes).
    pub status: bool,
    /// Defined by a CustomResourceDefinition, so a test may uninstall it.
    pub crd: bool,
}

impl Kind {
    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The resource as the API server's messages name it: `pods`, `leases.coordination.k8s.io`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const fn kind(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
    crd: bool,
) -> Kind {
    Kind {
        group,
        version,
        plural,
        kind,
        namespaced,
        status,
        crd,
    }
}

/// Every kind the double knows, built in or from a CRD.
pub static KINDS: &[Kind] = &[
    kind("", "v1", "namespaces", "Namespace", false, true, false),
    kind("", "v1", "nodes", "Node", false, true, false),
    kind("", "v1", "pods", "Pod", true, true, false),
    kind("", "v1", "services", "Service", true, true, false),
    kind("", "v1", "configmaps", "ConfigMap", true, false, false),
    kind("", "v1", "secrets", "Secret", true, false, false),
    kind("", "v1", "serviceaccounts", "ServiceAccount", true, false, false),
    kind("", "v1", "events", "Event", true, false, false),
    kind("events.k8s.io", "v1", "events", "Event", true, false, false),
    kind(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
        false,
        false,
    ),
    kind("apps", "v1", "deployments", "Deployment", true, true, false),
    kind("coordination.k8s.io", "v1", "leases", "Lease", true, false, false),
    kind(
        "networking.istio.io",
        "v1",
        "serviceentries",
        "ServiceEntry",
        true,
        true,
        true,
    ),
    kind(
        "networking.istio.io",
        "v1",
        "workloadentries",
        "WorkloadEntry",
        true,
        true,
        true,
    ),
    kind(
        "security.istio.io",
        "v1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        true,
        true,
        true,
    ),
    kind(
        "security.istio.io",
        "v1",
        "peerauthentications",
        "PeerAuthentication",
        true,
        true,
        true,
    ),
    kind(
        "gateway.networking.k8s.io",
        "v1",
        "gateways",
        "Gateway",
        true,
        true,
        true,
    ),
    kind(
        "gateway.networking.k8s.io",
        "v1",
        "gatewayclasses",
        "GatewayClass",
        false,
        true,
        true,
    ),
    kind(
        "gateway.networking.k8s.io",
        "v1",
        "httproutes",
        "HTTPRoute",
        true,
        true,
        true,
    ),
    kind(
        "gateway.networking.k8s.io",
        "v1beta1",
        "referencegrants",
        "ReferenceGrant",
        true,
        false,
        true,
    ),
];

/// TokenReviews: created and answered, never stored.
static TOKEN_REVIEWS: Kind = kind(
    "authentication.k8s.io",
    "v1",
    "tokenreviews",
    "TokenReview",
    false,
    false,
    false,
);

pub fn token_reviews() -> &'static Kind {
    &TOKEN_REVIEWS
}

/// The kind served at `group`/`version`/`plural`.
pub fn by_plural(group: &str, version: &str, plural: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
}

/// The kind an object's `apiVersion` and `kind` name.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Kind> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.kind == kind)
}

/// The kind of a CRD named by group and plural, whatever its version.
pub fn crd(group: &str, plural: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.crd && k.group == group && k.plural == plural)
}

/// What a REST path names.
#[derive(Debug, PartialEq, Eq)]
pub enum Path {
    /// `/api`, `/apis`, `/version`.
    Discovery(&'static str),
    /// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
    TokenReviews,
    /// A collection, one object or one object's subresource.
    Resource(Target),
}

/// A resource request's target.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub kind: &'static Kind,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

/// Resolves a request path, `None` when the server would not find it.
pub fn resolve(path: &str) -> Option<Path> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["api"] => Some(Path::Discovery("api")),
        ["apis"] => Some(Path::Discovery("apis")),
        ["version"] => Some(Path::Discovery("version")),
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => Some(Path::TokenReviews),
        ["api", "v1", rest @ ..] => target("", "v1", rest).map(Path::Resource),
        ["apis", group, version, rest @ ..] => target(group, version, rest).map(Path::Resource),
        _ => None,
    }
}

fn target(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let owned = |s: &&str| Some((*s).to_owned());
    // `namespaces/{ns}/{plural}...` names a namespaced kind; `namespaces/{name}[/status]` a Namespace.
    if let ["namespaces", namespace, plural, tail @ ..] = rest
        && let Some(kind) = by_plural(group, version, plural).filter(|k| k.namespaced)
    {
        return with_tail(kind, owned(namespace), tail);
    }
    let [plural, tail @ ..] = rest else { return None };
    let kind = by_plural(group, version, plural)?;
    with_tail(kind, None, tail)
}

fn with_tail(kind: &'static Kind, namespace: Option<String>, tail: &[&str]) -> Option<Target> {
    let (name, subresource) = match tail {
        [] => (None, None),
        [name] => (Some(*name), None),
        [name, sub] => (Some(*name), Some(*sub)),
        _ => return None,
    };
    if subresource.is_some_and(|s| s != "status" || !kind.status) {
        return None;
    }
    Some(Target {
        kind,
        namespace,
        name: name.map(str::to_owned),
        subresource: subresource.map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(path: &str) -> Target {
        match resolve(path) {
            Some(Path::Resource(target)) => target,
            other => panic!("{path} resolved to {other:?}"),
        }
    }

    #[test]
    fn core_and_group_paths() {
        let all_pods = resource("/api/v1/pods");
        assert_eq!(
            (all_pods.kind.kind, all_pods.namespace, all_pods.name),
            ("Pod", None, None)
        );
        let pod = resource("/api/v1/namespaces/ns/pods/p/status");
        assert_eq!(pod.namespace.as_deref(), Some("ns"));
        assert_eq!(pod.name.as_deref(), Some("p"));
        assert_eq!(pod.subresource.as_deref(), Some("status"));
        let lease = resource("/apis/coordination.k8s.io/v1/namespaces/istio-system/leases/istiod");
        assert_eq!(lease.kind.qualified(), "leases.coordination.k8s.io");
        let class = resource("/apis/gateway.networking.k8s.io/v1/gatewayclasses/istio");
        assert_eq!(
            (class.kind.kind, class.name.as_deref()),
            ("GatewayClass", Some("istio"))
        );
    }

    #[test]
    fn a_namespace_and_its_status_are_not_a_namespaced_collection() {
        let namespace = resource("/api/v1/namespaces/default");
        assert_eq!(
            (namespace.kind.kind, namespace.name.as_deref()),
            ("Namespace", Some("default"))
        );
        let status = resource("/api/v1/namespaces/default/status");
        assert_eq!(status.subresource.as_deref(), Some("status"));
    }

    #[test]
    fn unknown_paths_and_subresources_are_not_found() {
        assert_eq!(resolve("/api/v1/widgets"), None);
        assert_eq!(resolve("/apis/apps/v2/deployments"), None);
        assert_eq!(resolve("/api/v1/namespaces/ns/configmaps/c/status"), None);
        assert_eq!(resolve("/api/v1/namespaces/ns/pods/p/log"), None);
        assert_eq!(resolve("/healthz"), None);
    }
}
