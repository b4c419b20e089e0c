//! The waypoint deployment controller: for every Gateway of class `istio-waypoint` it keeps a
//! ServiceAccount, a Deployment and a Service named after the Gateway in its namespace, and reports
//! on the Gateway (and the GatewayClass) what it did, as Istio's gateway deployment controller does.
//!
//! The pure part decides: [`render`] turns a Gateway (and the ConfigMap its
//! `spec.infrastructure.parametersRef` names, see [`overlay`]) into the desired objects, [`status`]
//! turns a Gateway and what was observed into its status. [`reconcile`] and [`class`] do the I/O,
//! with server-side apply under one field manager, so the fields we set are ours and everything else
//! (replicas set by `kubectl scale` or an HPA, annotations other controllers add) is left alone.
//!
//! Only the leader writes: [`run`] drops the whole controller the moment `leading` turns false, and
//! every write checks the flag again just before it is sent.

pub mod class;
#[cfg(test)]
mod fake;
pub mod overlay;
pub mod reconcile;
pub mod render;
pub mod status;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

/// On every object we create: says who manages it, and that we may overwrite it. Objects of the
/// Gateway's name without it are never taken over (Istio's `gateway.istio.io/managed`).
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// The value Istio writes for waypoints: the controller name with `/` replaced by `-`.
pub const MANAGED_VALUE: &str = "istio.io-mesh-controller";
/// The controller of the `istio-waypoint` GatewayClass, as Istio names it.
pub const CONTROLLER_NAME: &str = "istio.io/mesh-controller";
/// The Gateway's class, on every object we create (Istio sets it too).
pub const GATEWAY_CLASS_LABEL: &str = "gateway.networking.k8s.io/gateway-class-name";

/// What the deployed waypoints need to know about the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The waypoint container image.
    pub waypoint_image: String,
    /// Where waypoints find istiod-lite's xDS and CA over TLS, e.g.
    /// `https://istiod-lite.istio-system.svc:15012` (the waypoint's `XDS_ADDRESS`).
    pub xds_address: String,
    /// The cluster's DNS suffix: the Gateway's hostname address is `<name>.<ns>.svc.<suffix>`.
    pub domain_suffix: String,
    /// The mesh's trust domain (the waypoint's `TRUST_DOMAIN`, part of its SPIFFE identity).
    pub trust_domain: String,
    /// The server-side apply field manager of every write (default `istiod-lite`).
    pub field_manager: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            waypoint_image: "waypoint:latest".into(),
            xds_address: "https://istiod-lite.istio-system.svc:15012".into(),
            domain_suffix: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            field_manager: "istiod-lite".into(),
        }
    }
}

/// What can go wrong while deploying a waypoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API failed; retried with backoff.
    #[error("{action} {kind} {namespace}/{name}: {source}")]
    Api {
        action: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// The Gateway's parameters are unusable; reported as `Accepted=False` (`InvalidParameters`)
    /// and retried only when the Gateway or its ConfigMap changes.
    #[error("{0}")]
    InvalidParameters(String),
    /// Leadership was lost between deciding and writing; nothing was written.
    #[error("not the leader any more: not writing {kind} {namespace}/{name}")]
    NotLeading {
        kind: &'static str,
        namespace: String,
        name: String,
    },
}

impl Error {
    /// Whether trying again later may succeed without the user changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Api { .. })
    }
}

/// Runs while `leading` is true; stops writing at once when it turns false, and resumes when it
/// turns true again. Returns when the sender of `leading` is dropped (shutdown).
pub async fn run(client: kube::Client, settings: Settings, leading: watch::Receiver<bool>) {
    crate::leader::while_leading("waypoint deployment", leading, |leading| {
        work(client.clone(), settings.clone(), leading)
    })
    .await;
}

/// One term of leadership: the GatewayClass loop and the Gateway controller, sharing the classes.
async fn work(client: kube::Client, settings: Settings, leading: watch::Receiver<bool>) {
    let (classes, writer) = kube::runtime::reflector::store();
    let (class_changed, class_changes) = mpsc::channel(1);
    let context = Arc::new(reconcile::Context::new(
        client.clone(),
        settings.clone(),
        leading.clone(),
        classes,
    ));
    tokio::join!(
        class::run(client, settings, leading, writer, class_changed),
        reconcile::run(context, class_changes),
    );
}

/// Fails with [`Error::NotLeading`] unless we still lead: checked right before each write.
fn still_leading(
    leading: &watch::Receiver<bool>,
    kind: &'static str,
    namespace: &str,
    name: &str,
) -> Result<(), Error> {
    if *leading.borrow() {
        Ok(())
    } else {
        Err(Error::NotLeading {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use std::time::Duration;

    use super::*;
    use crate::deployment::fake::FakeApi;

    const GATEWAY: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/demo/gateways/waypoint";
    const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/demo/deployments/waypoint";
    const CLASS: &str = "/apis/gateway.networking.k8s.io/v1/gatewayclasses/istio-waypoint";

    /// Polls `check` (time is paused, so waiting costs nothing) until it holds; gives up after
    /// 20 virtual or real seconds (a busy loop would never let virtual time pass).
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        for _ in 0..400 {
            if check() {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "never: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never: {what}");
    }

    fn condition(fake: &FakeApi, path: &str, kind: &str) -> Option<String> {
        let object = fake.get(path)?;
        let conditions = object["status"]["conditions"].as_array()?.clone();
        let found = conditions.into_iter().find(|c| c["type"] == kind)?;
        Some(format!("{}/{}", found["status"].as_str()?, found["reason"].as_str()?))
    }

    #[tokio::test(start_paused = true)]
    async fn deploys_only_while_leading_and_follows_changes_to_what_it_owns() {
        let fake = FakeApi::default();
        fake.put(
            GATEWAY,
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": "demo", "uid": "gw-uid", "generation": 1, "resourceVersion": "1"},
                "spec": {"gatewayClassName": "istio-waypoint"},
            }),
        );
        let (leading, follower) = watch::channel(false);
        let running = tokio::spawn(run(fake.client(), Settings::default(), follower));

        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            fake.calls().is_empty(),
            "a follower does not even watch: {:?}",
            fake.calls()
        );

        leading.send(true).unwrap();
        eventually("the waypoint is programmed", || {
            condition(&fake, GATEWAY, "Programmed").as_deref() == Some("True/Programmed")
        })
        .await;
        eventually("the class is created and accepted", || {
            condition(&fake, CLASS, "Accepted").as_deref() == Some("True/Accepted")
        })
        .await;
        assert!(fake.get(DEPLOYMENT).is_some());

        // Someone deletes the Deployment: the watch brings it back.
        let writes = fake.writes().len();
        assert!(fake.delete(DEPLOYMENT) > 0, "the controller watches Deployments");
        eventually("the Deployment is applied again", || fake.get(DEPLOYMENT).is_some()).await;
        let since = fake.writes()[writes..].to_vec();
        assert!(since.contains(&format!("PATCH {DEPLOYMENT}")), "{since:?}");
        assert!(
            !since.iter().any(|w| w.ends_with("/status")),
            "the status did not change: {since:?}"
        );

        // Leadership lost: the watches close at once and a deletion is no longer repaired.
        leading.send(false).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let writes = fake.writes();
        assert_eq!(fake.delete(DEPLOYMENT), 0, "no watch is open any more");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(fake.writes(), writes, "no write after losing the lead");

        // Leading again: it resumes.
        leading.send(true).unwrap();
        eventually("the Deployment is back", || fake.get(DEPLOYMENT).is_some()).await;

        drop(leading);
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("run returns when the leadership sender is dropped")
            .unwrap();
    }
}
