//! Where the agent learns about a pod: a directory of YAML ([`files`], the lab) or the Kubernetes
//! API ([`kubernetes`]), and Istio's rule for whether a pod is captured ([`ambient`]).

pub mod files;
pub mod kubernetes;

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::protocol::code;

/// The label that puts a namespace or pod in the mesh (`ambient`) or keeps a pod out (`none`).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Written on a pod once ztunnel holds it.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Present on pods with an Istio sidecar, which ztunnel never captures.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// A pod and its namespace (absent when the source has no such Namespace).
#[derive(Clone, Debug)]
pub struct Found {
    pub pod: Pod,
    pub namespace: Option<Namespace>,
}

/// Why a lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("K8S_POD_NAME={name}: no Pod {namespace}/{name} in {origin}")]
    Unknown {
        namespace: String,
        name: String,
        origin: String,
    },
    #[error("reading Pod {namespace}/{name} from the Kubernetes API: {error}")]
    Api {
        namespace: String,
        name: String,
        error: Box<kube::Error>,
    },
    #[error("writing the {REDIRECTION_ANNOTATION} annotation of Pod {namespace}/{name}: {error}")]
    Annotate {
        namespace: String,
        name: String,
        error: Box<kube::Error>,
    },
    #[error("--config-dir {dir}: {error}")]
    Directory { dir: String, error: std::io::Error },
}

impl SourceError {
    pub fn code(&self) -> u32 {
        match self {
            Self::Unknown { .. } => code::POD_UNKNOWN,
            Self::Annotate { .. } => code::ANNOTATION,
            Self::Api { .. } | Self::Directory { .. } => code::TRY_AGAIN_LATER,
        }
    }
}

/// The pod source in use.
#[derive(Clone, Debug)]
pub enum Source {
    Files(files::Files),
    Kubernetes(kubernetes::Kubernetes),
}

impl Source {
    /// The pod `namespace/name` and its Namespace.
    pub async fn lookup(&self, namespace: &str, name: &str) -> Result<Found, SourceError> {
        match self {
            Self::Files(files) => {
                let files = files.clone();
                let (namespace, name) = (namespace.to_owned(), name.to_owned());
                tokio::task::spawn_blocking(move || files.lookup(&namespace, &name))
                    .await
                    .expect("the lookup does not panic")
            }
            Self::Kubernetes(kubernetes) => kubernetes.lookup(namespace, name).await,
        }
    }

    /// Marks the pod captured (`true`) or not; the lab's files are left alone (there, istiod-lite
    /// learns the same from the pod's labels, and ztunnel listens in every pod the agent enrolled
    /// before any peer can reach it: the plugin returns only after ztunnel acknowledged).
    pub async fn annotate(&self, namespace: &str, name: &str, captured: bool) -> Result<(), SourceError> {
        match self {
            Self::Files(_) => Ok(()),
            Self::Kubernetes(kubernetes) => kubernetes.annotate(namespace, name, captured).await,
        }
    }
}

fn label<'a>(map: Option<&'a std::collections::BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    map.and_then(|m| m.get(key)).map(String::as_str)
}

/// Istio's rule (its CNI's `PodRedirectionEnabled`): captured when the namespace or the pod says
/// `istio.io/dataplane-mode=ambient`, unless the pod says `none` (waypoints and gateways carry
/// `none`, as Istio's waypoint template puts on them), has a sidecar, or uses the host's network.
/// `Err` gives the reason it is not captured.
pub fn ambient(found: &Found) -> Result<(), String> {
    let pod = &found.pod;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let pod_mode = label(pod.metadata.labels.as_ref(), DATAPLANE_MODE);
    let namespace_mode = found
        .namespace
        .as_ref()
        .and_then(|n| label(n.metadata.labels.as_ref(), DATAPLANE_MODE));
    if pod_mode != Some("ambient") && namespace_mode != Some("ambient") {
        return Err(format!(
            "neither namespace {namespace} nor pod {namespace}/{name} is labelled {DATAPLANE_MODE}=ambient"
        ));
    }
    if pod_mode == Some("none") {
        return Err(format!("pod {namespace}/{name} is labelled {DATAPLANE_MODE}=none"));
    }
    if label(pod.metadata.annotations.as_ref(), SIDECAR_STATUS_ANNOTATION).is_some() {
        return Err(format!("pod {namespace}/{name} has an Istio sidecar"));
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Err(format!("pod {namespace}/{name} uses the host's network"));
    }
    Ok(())
}

/// The service account a pod runs as (`default` when its spec names none).
pub fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(namespace_labels: &str, pod_labels: &str, extra: &str) -> Found {
        let pod = format!(
            "{{\"metadata\": {{\"name\": \"p\", \"namespace\": \"demo\", \"labels\": {pod_labels}}}, \"spec\": {{\"containers\": []{extra}}}}}"
        );
        let namespace = format!("{{\"metadata\": {{\"name\": \"demo\", \"labels\": {namespace_labels}}}}}");
        Found {
            pod: serde_json::from_str(&pod).unwrap(),
            namespace: Some(serde_json::from_str(&namespace).unwrap()),
        }
    }

    #[test]
    fn istios_rule_decides() {
        let ambient_ns = r#"{"istio.io/dataplane-mode": "ambient"}"#;
        assert_eq!(ambient(&found(ambient_ns, "{}", "")), Ok(()));
        assert_eq!(
            ambient(&found("{}", ambient_ns, "")),
            Ok(()),
            "the pod's own label enrols it"
        );
        let none = r#"{"istio.io/dataplane-mode": "none", "gateway.networking.k8s.io/gateway-name": "waypoint"}"#;
        assert!(ambient(&found(ambient_ns, none, "")).unwrap_err().contains("=none"));
        assert!(
            ambient(&found("{}", "{}", ""))
                .unwrap_err()
                .contains("neither namespace demo")
        );
        let host = ambient(&found(ambient_ns, "{}", r#", "hostNetwork": true"#));
        assert!(host.unwrap_err().contains("host's network"));
    }
}
