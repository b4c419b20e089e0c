//! Pods and Namespaces from the Kubernetes API: read when the plugin asks (the pod exists before
//! the kubelet creates its sandbox), and the pod annotated `ambient.istio.io/redirection: enabled`
//! by a JSON merge patch once ztunnel holds it (removed again on DEL), as Istio's CNI agent does.
//! The patch goes to the pod itself, not its status subresource.

use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::{Found, REDIRECTION_ANNOTATION, SourceError};

#[derive(Clone)]
pub struct Kubernetes {
    client: Client,
}

impl std::fmt::Debug for Kubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubernetes").finish_non_exhaustive()
    }
}

impl Kubernetes {
    /// A client from `kubeconfig`, else in-cluster, else `$KUBECONFIG` / `~/.kube/config`.
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<Self, kube::Error> {
        let client = match kubeconfig {
            None => Client::try_default().await?,
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
                let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(kube::Error::InferKubeconfig)?;
                Client::try_from(config)?
            }
        };
        Ok(Self { client })
    }

    pub async fn lookup(&self, namespace: &str, name: &str) -> Result<Found, SourceError> {
        let api_error = |error| SourceError::Api {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            error: Box::new(error),
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = pods
            .get_opt(name)
            .await
            .map_err(api_error)?
            .ok_or_else(|| SourceError::Unknown {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                origin: "the Kubernetes API".to_owned(),
            })?;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let namespace = namespaces.get_opt(namespace).await.map_err(api_error)?;
        Ok(Found { pod, namespace })
    }

    /// Sets (`captured`) or removes the redirection annotation. A pod that is gone needs no
    /// removal.
    pub async fn annotate(&self, namespace: &str, name: &str, captured: bool) -> Result<(), SourceError> {
        let value = if captured { json!("enabled") } else { json!(null) };
        let patch = json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if !captured && status.is_not_found() => Ok(()),
            Err(error) => Err(SourceError::Annotate {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                error: Box::new(error),
            }),
        }
    }
}
