//! The mesh's root certificate in every namespace, as ConfigMap `istio-ca-root-cert` (key
//! `root-cert.pem`), as istiod's namespace controller publishes it: workloads and waypoints mount
//! it to verify the controller and their peers. Run by the leader only; a ConfigMap edited or
//! deleted by hand is put back.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, warn};

/// The ConfigMap's name and key, Istio's.
pub const CONFIG_MAP: &str = "istio-ca-root-cert";
pub const KEY: &str = "root-cert.pem";
/// Namespaces that get no copy (Kubernetes' own).
const SKIPPED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

struct Context {
    client: Client,
    root: String,
    field_manager: String,
}

/// Publishes `root` to every namespace while `leading` says so.
pub async fn run(client: Client, root: String, field_manager: String, leading: watch::Receiver<bool>) {
    let context = Arc::new(Context {
        client,
        root,
        field_manager,
    });
    crate::leader::while_leading("root certificate publication", leading, |_| publish(context.clone())).await;
}

async fn publish(context: Arc<Context>) {
    let client = context.client.clone();
    let ours = watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}"));
    Controller::new(Api::<Namespace>::all(client.clone()), watcher::Config::default())
        .watches(Api::<ConfigMap>::all(client), ours, |config_map: ConfigMap| {
            config_map.namespace().map(|ns| ObjectRef::new(&ns))
        })
        .run(reconcile, error_policy, context)
        .for_each(|_| std::future::ready(()))
        .await;
}

/// The ConfigMap as it should be in `namespace`.
fn desired(namespace: &str, root: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([("istio.io/config".to_owned(), "true".to_owned())].into()),
            ..Default::default()
        },
        data: Some([(KEY.to_owned(), root.to_owned())].into()),
        ..Default::default()
    }
}

async fn reconcile(namespace: Arc<Namespace>, context: Arc<Context>) -> Result<Action, kube::Error> {
    let name = namespace.name_any();
    if SKIPPED.contains(&name.as_str()) || namespace.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(context.client.clone(), &name);
    let current = config_maps.get_opt(CONFIG_MAP).await?;
    let up_to_date = current
        .as_ref()
        .and_then(|c| c.data.as_ref()?.get(KEY))
        .is_some_and(|pem| *pem == context.root);
    if !up_to_date {
        let params = PatchParams::apply(&context.field_manager).force();
        config_maps
            .patch(CONFIG_MAP, &params, &Patch::Apply(desired(&name, &context.root)))
            .await?;
        debug!(namespace = %name, "root certificate published");
    }
    Ok(Action::await_change())
}

fn error_policy(namespace: Arc<Namespace>, error: &kube::Error, _: Arc<Context>) -> Action {
    warn!(namespace = %namespace.name_any(), %error, "cannot publish the root certificate; retrying");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_map_carries_the_root_under_istios_key() {
        let config_map = desired("demo", "PEM");
        assert_eq!(config_map.metadata.name.as_deref(), Some("istio-ca-root-cert"));
        assert_eq!(config_map.metadata.namespace.as_deref(), Some("demo"));
        assert_eq!(config_map.data.unwrap()["root-cert.pem"], "PEM");
    }
}
