//! The `istio-waypoint` GatewayClass: created when missing (and again if deleted), never updated
//! once it exists, so users may edit it (Istio's class controller behaves the same). When its
//! `controllerName` is ours, its status says `Accepted`; a change to it re-reconciles every Gateway.

use futures_util::StreamExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::reconcile::{api_error, backoff, now};
use super::status::{self, ACCEPTED};
use super::{CONTROLLER_NAME, Error, Settings, still_leading};
use crate::objects::gateway::{GatewayClass, GatewayClassSpec, GatewayClassStatus};
use crate::translate::waypoints::WAYPOINT_CLASS;

/// Istio's description of its waypoint class.
const DESCRIPTION: &str = "The default Istio waypoint GatewayClass";

/// The class to create when there is none.
pub fn default_class() -> GatewayClass {
    GatewayClass::new(
        WAYPOINT_CLASS,
        GatewayClassSpec {
            controller_name: CONTROLLER_NAME.into(),
            description: Some(DESCRIPTION.into()),
        },
    )
}

/// The status of a class we implement: `Accepted=True`, at its generation.
pub fn class_status(class: &GatewayClass, now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> GatewayClassStatus {
    let previous = class.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    let accepted = status::condition(
        previous,
        ACCEPTED,
        true,
        ACCEPTED,
        "Handled by istiod-lite".into(),
        class.metadata.generation,
        now,
    );
    GatewayClassStatus {
        conditions: vec![accepted],
    }
}

/// Keeps the class in `writer`'s store and in the cluster; sends on `changed` when it changes.
pub(super) async fn run(
    client: Client,
    settings: Settings,
    leading: watch::Receiver<bool>,
    writer: reflector::store::Writer<GatewayClass>,
    changed: mpsc::Sender<()>,
) {
    let api = Api::<GatewayClass>::all(client);
    let classes = writer.as_reader();
    let mut events = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .boxed();
    let (mut pending, mut attempts) = (false, 0);
    let mut retry = None;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::InitDone)) => pending = true,
                Some(Ok(watcher::Event::Apply(class) | watcher::Event::Delete(class))) if class.name_any() == WAYPOINT_CLASS => {
                    pending = true;
                    let _ = changed.try_send(());
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => warn!(%error, "watching GatewayClasses"),
                None => return,
            },
            _ = sleep_until(retry) => pending = true,
        }
        if !pending {
            continue;
        }
        retry = None;
        match ensure(&api, &classes, &settings, &leading).await {
            Ok(()) => (pending, attempts) = (false, 0),
            Err(Error::NotLeading { .. }) => pending = false,
            Err(error) => {
                attempts += 1;
                let delay = backoff(attempts);
                warn!(%error, attempts, retry_in = ?delay, "GatewayClass {WAYPOINT_CLASS}");
                (pending, retry) = (false, Some(tokio::time::Instant::now() + delay));
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Creates the class if it is missing; writes its status if it is ours and the status differs.
async fn ensure(
    api: &Api<GatewayClass>,
    classes: &Store<GatewayClass>,
    settings: &Settings,
    leading: &watch::Receiver<bool>,
) -> Result<(), Error> {
    let Some(class) = classes.get(&ObjectRef::new(WAYPOINT_CLASS)) else {
        still_leading(leading, "GatewayClass", "", WAYPOINT_CLASS)?;
        let params = PostParams {
            field_manager: Some(settings.field_manager.clone()),
            ..PostParams::default()
        };
        return match api.create(&params, &default_class()).await {
            // Its status is written when the watch brings it back.
            Ok(_) => {
                info!("created GatewayClass {WAYPOINT_CLASS}");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(error) => Err(api_error("create", "GatewayClass", "", WAYPOINT_CLASS, error)),
        };
    };
    if class.spec.controller_name != CONTROLLER_NAME {
        debug!(controller = %class.spec.controller_name, "GatewayClass {WAYPOINT_CLASS} is not ours");
        return Ok(());
    }
    let desired = class_status(&class, &now());
    let current = class.status.as_ref().map_or(&[][..], |s| &s.conditions[..]);
    if !status::missing(current, &desired.conditions) {
        return Ok(());
    }
    still_leading(leading, "GatewayClass", "", WAYPOINT_CLASS)?;
    let patch = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "status": desired});
    api.patch_status(WAYPOINT_CLASS, &PatchParams::apply(&settings.field_manager).force(), &Patch::Apply(&patch))
        .await
        .map_err(|e| api_error("write status of", "GatewayClass", "", WAYPOINT_CLASS, e))?;
    Ok(())
}
