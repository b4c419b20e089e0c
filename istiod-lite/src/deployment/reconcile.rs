//! The Gateway controller: a kube-rs [`Controller`] over Gateways that reconciles a waypoint
//! Gateway whenever it, an object of its name (ServiceAccount, Deployment, Service), its parameters
//! ConfigMap or the waypoint GatewayClass changes. Objects are matched by name rather than by owner
//! reference so that an unmanaged object appearing or going away also triggers: the Gateway then
//! says why it is not programmed, or we take the name over once it is free.
//!
//! A reconcile reads before it writes (Istio's rule: an object of the Gateway's name without our
//! label is never taken over), applies with the resourceVersion it read, and writes the status only
//! when it differs. Failures are retried with a per-Gateway exponential backoff.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use super::status::{self, Problem};
use super::{CONTROLLER_NAME, Error, MANAGED_LABEL, Settings, overlay, render, still_leading};
use crate::objects::Gateway;
use crate::objects::gateway::GatewayClass;
use crate::translate::waypoints::WAYPOINT_CLASS;

/// The first retry of a failed reconcile waits this long; each further failure doubles it.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub(super) struct Context {
    pub(super) client: Client,
    pub(super) settings: Settings,
    pub(super) leading: watch::Receiver<bool>,
    /// The GatewayClasses, kept by [`super::class::run`].
    pub(super) classes: Store<GatewayClass>,
    /// Failed attempts in a row, per Gateway (`namespace/name`).
    failures: Mutex<HashMap<String, u32>>,
    /// The waypoint Gateways seen, so that a deletion is logged for those only.
    deployed: Mutex<HashSet<String>>,
}

impl Context {
    pub(super) fn new(
        client: Client,
        settings: Settings,
        leading: watch::Receiver<bool>,
        classes: Store<GatewayClass>,
    ) -> Self {
        Self {
            client,
            settings,
            leading,
            classes,
            failures: Mutex::default(),
            deployed: Mutex::default(),
        }
    }
}

/// Reconciles waypoint Gateways until dropped. `class_changed` asks for all of them again.
pub(super) async fn run(context: Arc<Context>, class_changed: mpsc::Receiver<()>) {
    let client = context.client.clone();
    let controller = Controller::new(Api::<Gateway>::all(client.clone()), watcher::Config::default());
    let gateways = controller.store();
    controller
        .watches(
            Api::<ServiceAccount>::all(client.clone()),
            watcher::Config::default(),
            same_name(gateways.clone()),
        )
        .watches(
            Api::<Deployment>::all(client.clone()),
            watcher::Config::default(),
            same_name(gateways.clone()),
        )
        .watches(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            same_name(gateways.clone()),
        )
        .watches(
            Api::<ConfigMap>::all(client),
            watcher::Config::default(),
            parameters_of(gateways),
        )
        .reconcile_all_on(ReceiverStream::new(class_changed))
        .run(reconcile, error_policy, context.clone())
        .for_each(|result| {
            report(&context, result);
            std::future::ready(())
        })
        .await;
}

fn is_waypoint(gateway: &Gateway) -> bool {
    gateway.spec.gateway_class_name == WAYPOINT_CLASS
}

fn key(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or_default())
}

/// Maps an object to the waypoint Gateway of the same name and namespace, if there is one.
fn same_name<K: kube::Resource>(gateways: Store<Gateway>) -> impl Fn(K) -> Option<ObjectRef<Gateway>> + Send + Sync {
    move |object| {
        let gateway = ObjectRef::new(&object.name_any()).within(&object.namespace()?);
        gateways.get(&gateway).filter(|g| is_waypoint(g)).map(|_| gateway)
    }
}

/// Maps a ConfigMap to the waypoint Gateways whose parametersRef names it.
fn parameters_of(gateways: Store<Gateway>) -> impl Fn(ConfigMap) -> Vec<ObjectRef<Gateway>> + Send + Sync {
    move |config_map| {
        let name = config_map.name_any();
        gateways
            .state()
            .iter()
            .filter(|g| is_waypoint(g) && g.namespace() == config_map.namespace())
            .filter(|g| matches!(overlay::config_map_name(g), Ok(Some(n)) if n == name))
            .map(|g| ObjectRef::from_obj(&**g))
            .collect()
    }
}

async fn reconcile(gateway: Arc<Gateway>, context: Arc<Context>) -> Result<Action, Error> {
    let namespace = gateway.namespace().unwrap_or_default();
    let name = gateway.name_any();
    if !is_waypoint(&gateway) {
        return Ok(Action::await_change());
    }
    if let Some(class) = context.classes.get(&ObjectRef::new(WAYPOINT_CLASS))
        && class.spec.controller_name != CONTROLLER_NAME
    {
        debug!(gateway = %key(Some(&namespace), &name), controller = %class.spec.controller_name, "class is not ours");
        return Ok(Action::await_change());
    }
    if gateway.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    context.deployed.lock().unwrap().insert(key(Some(&namespace), &name));

    let mut problems = Vec::new();
    let mut service = None;
    match desired(&gateway, &context).await {
        Ok(desired) => {
            let client = &context.client;
            let accounts = Api::namespaced(client.clone(), &namespace);
            apply(&context, accounts, desired.service_account, &mut problems).await?;
            let services = Api::namespaced(client.clone(), &namespace);
            service = apply(&context, services, desired.service, &mut problems).await?;
            let deployments = Api::namespaced(client.clone(), &namespace);
            apply(&context, deployments, desired.deployment, &mut problems).await?;
        }
        Err(Error::InvalidParameters(message)) => problems.push(Problem::InvalidParameters(message)),
        Err(error) => return Err(error),
    }
    write_status(&context, &namespace, &name, service.as_ref(), &problems).await?;
    context.failures.lock().unwrap().remove(&key(Some(&namespace), &name));
    Ok(Action::await_change())
}

/// The objects `gateway` asks for, with its parameters ConfigMap (which must exist) merged in.
async fn desired(gateway: &Gateway, context: &Context) -> Result<render::Desired, Error> {
    let namespace = gateway.namespace().unwrap_or_default();
    let config_map = match overlay::config_map_name(gateway)? {
        None => None,
        Some(name) => {
            let api = Api::<ConfigMap>::namespaced(context.client.clone(), &namespace);
            let found = api
                .get_opt(name)
                .await
                .map_err(|e| api_error("get", "ConfigMap", &namespace, name, e))?;
            Some(found.ok_or_else(|| {
                Error::InvalidParameters(format!(
                    "parametersRef targeting ConfigMap {namespace}/{name}, but it does not exist"
                ))
            })?)
        }
    };
    render::desired(gateway, config_map.as_ref(), &context.settings)
}

fn is_managed(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|labels| labels.contains_key(MANAGED_LABEL))
}

/// Applies `desired` unless an unmanaged object holds its name; returns what the API holds now,
/// or `None` (with a problem recorded) when it was not applied.
async fn apply<K>(
    context: &Context,
    api: Api<K>,
    mut desired: K,
    problems: &mut Vec<Problem>,
) -> Result<Option<K>, Error>
where
    K: kube::Resource<DynamicType = ()> + k8s_openapi::Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let kind = K::KIND;
    let namespace = desired.namespace().unwrap_or_default();
    let name = desired.name_any();
    let existing = api
        .get_opt(&name)
        .await
        .map_err(|e| api_error("get", kind, &namespace, &name, e))?;
    if let Some(existing) = existing {
        if !is_managed(existing.meta()) {
            warn!(object = %key(Some(&namespace), &name), kind, "exists without {MANAGED_LABEL}: not taking it over");
            problems.push(Problem::Unmanaged { kind, namespace, name });
            return Ok(None);
        }
        // As Istio does: what we checked is what we overwrite, or the apply fails and is retried.
        desired.meta_mut().resource_version = existing.meta().resource_version.clone();
    }
    still_leading(&context.leading, kind, &namespace, &name)?;
    let params = PatchParams::apply(&context.settings.field_manager).force();
    match api.patch(&name, &params, &Patch::Apply(&desired)).await {
        Ok(applied) => Ok(Some(applied)),
        Err(kube::Error::Api(status)) if status.code == 400 || status.code == 422 => {
            problems.push(Problem::Rejected {
                kind,
                namespace,
                name,
                message: status.message,
            });
            Ok(None)
        }
        Err(error) => Err(api_error("apply", kind, &namespace, &name, error)),
    }
}

/// Writes the Gateway's status, read afresh, if ours differs from it.
async fn write_status(
    context: &Context,
    namespace: &str,
    name: &str,
    service: Option<&Service>,
    problems: &[Problem],
) -> Result<(), Error> {
    let api = Api::<Gateway>::namespaced(context.client.clone(), namespace);
    let Some(gateway) = api
        .get_opt(name)
        .await
        .map_err(|e| api_error("get", "Gateway", namespace, name, e))?
    else {
        return Ok(());
    };
    let desired = status::gateway_status(&gateway, service, problems, &context.settings.domain_suffix, &now());
    if !status::needs_write(gateway.status.as_ref(), &desired) {
        return Ok(());
    }
    still_leading(&context.leading, "Gateway", namespace, name)?;
    let patch = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "status": desired});
    let params = PatchParams::apply(&context.settings.field_manager).force();
    api.patch_status(name, &params, &Patch::Apply(&patch))
        .await
        .map_err(|e| api_error("write status of", "Gateway", namespace, name, e))?;
    for condition in &desired.conditions {
        info!(gateway = %key(Some(namespace), name), condition = %condition.type_, status = %condition.status,
            reason = %condition.reason, message = %condition.message, "status");
    }
    Ok(())
}

/// The current time, to the second (as the API stores it).
pub(super) fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

pub(super) fn api_error(
    action: &'static str,
    kind: &'static str,
    namespace: &str,
    name: &str,
    source: kube::Error,
) -> Error {
    Error::Api {
        action,
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source: Box::new(source),
    }
}

/// How long to wait after the `attempts`-th failure in a row.
pub fn backoff(attempts: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1)))
        .min(BACKOFF_MAX)
}

fn error_policy(gateway: Arc<Gateway>, error: &Error, context: Arc<Context>) -> Action {
    if matches!(error, Error::NotLeading { .. }) {
        return Action::await_change();
    }
    let gateway = key(gateway.namespace().as_deref(), &gateway.name_any());
    let attempts = {
        let mut failures = context.failures.lock().unwrap();
        let attempts = failures.entry(gateway.clone()).or_insert(0);
        *attempts += 1;
        *attempts
    };
    let delay = backoff(attempts);
    warn!(%gateway, %error, attempts, retry_in = ?delay, "waypoint deployment failed");
    Action::requeue(delay)
}

type Outcome = Result<(ObjectRef<Gateway>, Action), controller::Error<Error, watcher::Error>>;

fn report(context: &Context, outcome: Outcome) {
    match outcome {
        Ok((gateway, _)) => debug!(gateway = %key(gateway.namespace.as_deref(), &gateway.name), "reconciled"),
        Err(controller::Error::ObjectNotFound(gateway)) => {
            let gateway = key(gateway.namespace.as_deref(), &gateway.name);
            if context.deployed.lock().unwrap().remove(&gateway) {
                context.failures.lock().unwrap().remove(&gateway);
                info!(%gateway, "Gateway deleted: the API's garbage collector removes its ServiceAccount, Deployment and Service (they name it as owner)");
            }
        }
        // Logged by error_policy.
        Err(controller::Error::ReconcilerFailed(..)) => {}
        Err(error) => warn!(%error, "waypoint deployment controller"),
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector;
    use serde_json::Value;

    use super::*;
    use crate::deployment::MANAGED_VALUE;
    use crate::deployment::fake::FakeApi;
    use crate::objects::gateway::GatewayClassSpec;

    const ACCOUNT: &str = "/api/v1/namespaces/demo/serviceaccounts/waypoint";
    const SERVICE: &str = "/api/v1/namespaces/demo/services/waypoint";
    const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/demo/deployments/waypoint";
    const GATEWAY: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/demo/gateways/waypoint";
    const PARAMS: &str = "/api/v1/namespaces/demo/configmaps/params";

    fn gateway(class: &str, parameters: bool) -> Value {
        let mut spec = json!({"gatewayClassName": class});
        if parameters {
            spec["infrastructure"] = json!({"parametersRef": {"group": "", "kind": "ConfigMap", "name": "params"}});
        }
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "demo", "uid": "gw-uid", "generation": 1},
            "spec": spec,
        })
    }

    fn setup(fake: &FakeApi, leading: bool, classes: Store<GatewayClass>) -> (Arc<Context>, watch::Sender<bool>) {
        let (sender, leading) = watch::channel(leading);
        let context = Context::new(fake.client(), Settings::default(), leading, classes);
        (Arc::new(context), sender)
    }

    async fn reconcile_stored(fake: &FakeApi, context: &Arc<Context>) -> Result<Action, Error> {
        let gateway: Gateway = serde_json::from_value(fake.get(GATEWAY).unwrap()).unwrap();
        reconcile(Arc::new(gateway), context.clone()).await
    }

    fn condition(fake: &FakeApi, kind: &str) -> (String, String, String) {
        let gateway = fake.get(GATEWAY).unwrap();
        let conditions = gateway["status"]["conditions"].as_array().unwrap().clone();
        let found = conditions.iter().find(|c| c["type"] == kind).unwrap();
        let field = |name: &str| found[name].as_str().unwrap().to_owned();
        (field("status"), field("reason"), field("message"))
    }

    fn patch(path: &str) -> String {
        format!("PATCH {path}")
    }

    #[tokio::test]
    async fn applies_the_three_objects_as_ours_then_reports_programmed_and_then_stays_quiet() {
        let fake = FakeApi::default();
        fake.put(GATEWAY, gateway("istio-waypoint", false));
        let (context, _leading) = setup(&fake, true, reflector::store().0);

        reconcile_stored(&fake, &context).await.unwrap();
        let status = format!("{GATEWAY}/status");
        assert_eq!(
            fake.writes(),
            [patch(ACCOUNT), patch(SERVICE), patch(DEPLOYMENT), patch(&status)]
        );
        for call in fake.calls().iter().filter(|c| c.method == "PATCH") {
            assert!(
                call.query.contains("fieldManager=istiod-lite") && call.query.contains("force=true"),
                "{call:?}"
            );
        }
        let deployment = fake.get(DEPLOYMENT).unwrap();
        assert_eq!(deployment["metadata"]["labels"][MANAGED_LABEL], MANAGED_VALUE);
        assert!(deployment["spec"].get("replicas").is_none(), "{deployment}");
        assert_eq!(
            condition(&fake, "Programmed"),
            (
                "True".into(),
                "Programmed".into(),
                "Resource programmed, assigned to service(s) waypoint.demo.svc.cluster.local:15008".into()
            )
        );
        assert_eq!(
            fake.get(GATEWAY).unwrap()["status"]["addresses"],
            json!([{"type": "IPAddress", "value": "10.96.0.10"}, {"type": "Hostname", "value": "waypoint.demo.svc.cluster.local"}])
        );

        // Nothing changed: the same applies (guarded by the resourceVersion read), no status write.
        let version = fake.get(ACCOUNT).unwrap()["metadata"]["resourceVersion"].clone();
        let before = fake.calls().len();
        reconcile_stored(&fake, &context).await.unwrap();
        let again: Vec<_> = fake.calls()[before..]
            .iter()
            .filter(|c| c.method == "PATCH")
            .cloned()
            .collect();
        let paths: Vec<&str> = again.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, [ACCOUNT, SERVICE, DEPLOYMENT]);
        assert_eq!(again[0].body["metadata"]["resourceVersion"], version);
    }

    #[tokio::test]
    async fn an_unmanaged_deployment_is_left_alone_and_the_gateway_says_why() {
        let fake = FakeApi::default();
        fake.put(GATEWAY, gateway("istio-waypoint", false));
        let theirs = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "waypoint", "namespace": "demo", "labels": {"app": "theirs"}},
            "spec": {"selector": {"matchLabels": {"app": "theirs"}}, "template": {}},
        });
        fake.put(DEPLOYMENT, theirs.clone());
        let (context, _leading) = setup(&fake, true, reflector::store().0);

        reconcile_stored(&fake, &context).await.unwrap();
        let status = format!("{GATEWAY}/status");
        assert_eq!(fake.writes(), [patch(ACCOUNT), patch(SERVICE), patch(&status)]);
        assert_eq!(fake.get(DEPLOYMENT).unwrap(), theirs);
        assert_eq!(
            condition(&fake, "Programmed"),
            (
                "False".into(),
                "Invalid".into(),
                "Deployment demo/waypoint exists and is not managed by istiod-lite; not taking it over".into()
            )
        );
        assert_eq!(condition(&fake, "Accepted").0, "True");
    }

    #[tokio::test]
    async fn a_missing_parameters_config_map_is_not_accepted_until_it_exists() {
        let fake = FakeApi::default();
        fake.put(GATEWAY, gateway("istio-waypoint", true));
        let (context, _leading) = setup(&fake, true, reflector::store().0);

        reconcile_stored(&fake, &context).await.unwrap();
        assert_eq!(fake.writes(), [patch(&format!("{GATEWAY}/status"))]);
        let message = "parametersRef targeting ConfigMap demo/params, but it does not exist";
        assert_eq!(
            condition(&fake, "Accepted"),
            ("False".into(), "InvalidParameters".into(), message.into())
        );

        fake.put(
            PARAMS,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "params", "namespace": "demo"},
                "data": {"deployment": "spec:\n  replicas: 2\n"}}),
        );
        reconcile_stored(&fake, &context).await.unwrap();
        assert_eq!(fake.get(DEPLOYMENT).unwrap()["spec"]["replicas"], 2);
        assert_eq!(condition(&fake, "Accepted").0, "True");
    }

    #[tokio::test]
    async fn a_refused_apply_is_reported_and_a_failed_one_retried_with_backoff() {
        let fake = FakeApi::default();
        fake.put(GATEWAY, gateway("istio-waypoint", false));
        fake.refuse(
            DEPLOYMENT,
            422,
            "Deployment.apps \"waypoint\" is invalid: spec.replicas: must be >= 0",
        );
        let (context, _leading) = setup(&fake, true, reflector::store().0);
        reconcile_stored(&fake, &context).await.unwrap();
        assert_eq!(
            condition(&fake, "Programmed").2,
            "Deployment demo/waypoint was refused: Deployment.apps \"waypoint\" is invalid: spec.replicas: must be >= 0"
        );

        fake.refuse(DEPLOYMENT, 503, "etcdserver: leader changed");
        let error = reconcile_stored(&fake, &context).await.unwrap_err();
        assert!(error.is_retryable());
        assert!(
            error.to_string().starts_with("apply Deployment demo/waypoint: "),
            "{error}"
        );
        let gateway = Arc::new(serde_json::from_value::<Gateway>(fake.get(GATEWAY).unwrap()).unwrap());
        let delays: Vec<Action> = (0..3)
            .map(|_| error_policy(gateway.clone(), &error, context.clone()))
            .collect();
        assert_eq!(
            delays,
            [500, 1000, 2000].map(|ms| Action::requeue(Duration::from_millis(ms)))
        );
        assert_eq!(backoff(30), BACKOFF_MAX);
    }

    #[tokio::test]
    async fn nothing_is_written_without_the_lead_nor_for_other_classes_or_controllers() {
        let fake = FakeApi::default();
        fake.put(GATEWAY, gateway("istio-waypoint", false));
        let (context, _leading) = setup(&fake, false, reflector::store().0);
        let error = reconcile_stored(&fake, &context).await.unwrap_err();
        assert!(
            matches!(
                error,
                Error::NotLeading {
                    kind: "ServiceAccount",
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(fake.writes(), Vec::<String>::new());

        let fake = FakeApi::default();
        fake.put(GATEWAY, gateway("istio", false));
        let (context, _leading) = setup(&fake, true, reflector::store().0);
        reconcile_stored(&fake, &context).await.unwrap();
        assert!(fake.calls().is_empty(), "another class is ignored: {:?}", fake.calls());

        let fake = FakeApi::default();
        fake.put(GATEWAY, gateway("istio-waypoint", false));
        let (classes, mut writer) = reflector::store();
        let theirs = GatewayClassSpec {
            controller_name: "example.com/other".into(),
            description: None,
        };
        writer.apply_watcher_event(&watcher::Event::Apply(GatewayClass::new(WAYPOINT_CLASS, theirs)));
        let (context, _leading) = setup(&fake, true, classes);
        reconcile_stored(&fake, &context).await.unwrap();
        assert!(
            fake.calls().is_empty(),
            "a class of another controller is ignored: {:?}",
            fake.calls()
        );
    }
}
