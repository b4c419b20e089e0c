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
pub fn class_status(
    class: &GatewayClass,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> GatewayClassStatus {
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
    // The class's controller as last seen: the Gateways are reconciled again when it changes.
    let mut controller = None;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::InitDone)) => pending = true,
                Some(Ok(watcher::Event::Apply(class))) if class.name_any() == WAYPOINT_CLASS => {
                    pending = true;
                    seen(&mut controller, Some(&class.spec.controller_name), &changed);
                }
                Some(Ok(watcher::Event::Delete(class))) if class.name_any() == WAYPOINT_CLASS => {
                    pending = true;
                    seen(&mut controller, None, &changed);
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

/// Records the class's controller; asks for every Gateway again when it changed.
fn seen(last: &mut Option<String>, now: Option<&String>, changed: &mpsc::Sender<()>) {
    if last.as_ref() != now {
        *last = now.cloned();
        let _ = changed.try_send(());
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
    api.patch_status(
        WAYPOINT_CLASS,
        &PatchParams::apply(&settings.field_manager).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|e| api_error("write status of", "GatewayClass", "", WAYPOINT_CLASS, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use kube::runtime::reflector;

    use super::*;
    use crate::deployment::fake::FakeApi;

    const CLASS: &str = "/apis/gateway.networking.k8s.io/v1/gatewayclasses/istio-waypoint";

    fn store(class: Option<GatewayClass>) -> Store<GatewayClass> {
        let (reader, mut writer) = reflector::store();
        if let Some(class) = class {
            writer.apply_watcher_event(&watcher::Event::Apply(class));
        }
        reader
    }

    #[test]
    fn the_class_is_istios_waypoint_class_and_accepted_at_its_generation() {
        let mut class = default_class();
        assert_eq!(class.name_any(), "istio-waypoint");
        assert_eq!(class.spec.controller_name, "istio.io/mesh-controller");
        class.metadata.generation = Some(3);
        let first = Time(Timestamp::from_second(100).unwrap());
        let status = class_status(&class, &first);
        let accepted = &status.conditions[0];
        assert_eq!(
            (
                accepted.type_.as_str(),
                accepted.status.as_str(),
                accepted.reason.as_str()
            ),
            ("Accepted", "True", "Accepted")
        );
        assert_eq!(accepted.observed_generation, Some(3));
        class.status = Some(status.clone());
        let later = class_status(&class, &Time(Timestamp::from_second(200).unwrap()));
        assert_eq!(later, status, "unchanged: the transition time is kept");
    }

    #[tokio::test]
    async fn a_missing_class_is_created_and_ours_gets_its_status_once() {
        let fake = FakeApi::default();
        let api = Api::<GatewayClass>::all(fake.client());
        let (_sender, leading) = watch::channel(true);
        ensure(&api, &store(None), &Settings::default(), &leading)
            .await
            .unwrap();
        let calls = fake.calls();
        assert_eq!(
            fake.writes(),
            ["POST /apis/gateway.networking.k8s.io/v1/gatewayclasses"]
        );
        assert!(calls[0].query.contains("fieldManager=istiod-lite"), "{:?}", calls[0]);
        assert_eq!(
            fake.get(CLASS).unwrap()["spec"]["controllerName"],
            "istio.io/mesh-controller"
        );

        let created: GatewayClass = serde_json::from_value(fake.get(CLASS).unwrap()).unwrap();
        ensure(&api, &store(Some(created)), &Settings::default(), &leading)
            .await
            .unwrap();
        assert_eq!(fake.writes()[1], format!("PATCH {CLASS}/status"));
        let written = fake.get(CLASS).unwrap();
        assert_eq!(written["status"]["conditions"][0]["status"], "True");
        assert_eq!(written["status"]["conditions"][0]["observedGeneration"], 1);

        let accepted: GatewayClass = serde_json::from_value(written).unwrap();
        ensure(&api, &store(Some(accepted)), &Settings::default(), &leading)
            .await
            .unwrap();
        assert_eq!(fake.writes().len(), 2, "no write when the status is already right");
    }

    #[tokio::test]
    async fn a_class_of_another_controller_is_left_alone() {
        let fake = FakeApi::default();
        let api = Api::<GatewayClass>::all(fake.client());
        let (_sender, leading) = watch::channel(true);
        let mut theirs = default_class();
        theirs.spec.controller_name = "example.com/other".into();
        ensure(&api, &store(Some(theirs)), &Settings::default(), &leading)
            .await
            .unwrap();
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }
}
