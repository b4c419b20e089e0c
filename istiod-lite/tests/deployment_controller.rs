//! The waypoint deployment controller against the Kubernetes API double, through a kube client
//! built from the double's kubeconfig: what it creates for a waypoint Gateway (field by field),
//! the status it writes, what garbage collection removes with the Gateway, an unmanaged Deployment
//! left alone (and taken over once it is gone), and no writes while not leading.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use istiod_lite::deployment::{self, Settings};
use kube_api_double::{ApiCall, ApiServer};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);
/// The controller's user: its calls are told apart from the test's by it.
const USER: &str = "system:serviceaccount:istio-system:istiod-lite";
const GATEWAYS: &str = "gateway.networking.k8s.io/v1";

/// A kubeconfig file, removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        _ = std::fs::remove_file(&self.0);
    }
}

/// The controller running against the double; aborted when dropped, also when a test fails.
struct Running {
    leading: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(api: &ApiServer, leading: bool) -> Running {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let token = "istiod-lite-token";
    api.add_user_token(token, USER, &[]);
    let name = format!(
        "deployment-controller-{}-{}.yaml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let file = TempFile(std::env::temp_dir().join(name));
    api.write_kubeconfig(&file.0, token).unwrap();
    let client = istiod_lite::source::kubernetes::client(Some(&file.0)).await.unwrap();
    let settings = Settings {
        waypoint_image: "registry.example/waypoint:1.0".into(),
        ..Settings::default()
    };
    let (sender, receiver) = watch::channel(leading);
    Running {
        leading: sender,
        task: tokio::spawn(deployment::run(client, settings, receiver)),
    }
}

/// The cluster with namespace `demo` (the API refuses objects in a namespace that does not exist).
async fn cluster() -> ApiServer {
    let api = ApiServer::start().await.unwrap();
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}));
    api
}

fn gateway() -> Value {
    json!({
        "apiVersion": GATEWAYS,
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "demo"},
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

fn object(api: &ApiServer, api_version: &str, kind: &str) -> Option<Value> {
    api.get(api_version, kind, Some("demo"), "waypoint")
}

/// `status/reason: message` of the Gateway's condition `kind`.
fn condition(api: &ApiServer, kind: &str) -> Option<String> {
    let gateway = object(api, GATEWAYS, "Gateway")?;
    let conditions = gateway["status"]["conditions"].as_array()?.clone();
    let found = conditions.into_iter().find(|c| c["type"] == kind)?;
    Some(format!(
        "{}/{}: {}",
        found["status"].as_str()?,
        found["reason"].as_str()?,
        found["message"].as_str()?
    ))
}

fn writes_by_controller(api: &ApiServer) -> Vec<ApiCall> {
    let writes = api.calls().into_iter().filter(|c| c.user == USER);
    writes
        .filter(|c| !matches!(c.verb.as_str(), "get" | "list" | "watch"))
        .collect()
}

async fn until(api: &ApiServer, what: &str, condition: impl Fn(&ApiServer) -> bool) {
    if !api.wait_until(condition, WAIT).await {
        let calls: Vec<String> = api
            .calls()
            .iter()
            .filter(|c| c.user == USER)
            .map(|c| {
                format!(
                    "{} {}/{} {:?} {:?} {:?}",
                    c.verb, c.group, c.resource, c.subresource, c.namespace, c.name
                )
            })
            .collect();
        panic!("never: {what}; the controller called: {calls:#?}");
    }
}

#[tokio::test]
async fn a_waypoint_gateway_gets_its_objects_and_status_and_takes_them_along_when_deleted() {
    let api = cluster().await;
    let created = api.apply(gateway());
    let uid = created["metadata"]["uid"].as_str().unwrap().to_owned();
    let _running = start(&api, true).await;

    let programmed =
        "True/Programmed: Resource programmed, assigned to service(s) waypoint.demo.svc.cluster.local:15008";
    until(&api, "the Gateway is programmed", |api| {
        condition(api, "Programmed").as_deref() == Some(programmed)
    })
    .await;
    assert_eq!(
        condition(&api, "Accepted").as_deref(),
        Some("True/Accepted: Resource accepted")
    );
    let gateway = object(&api, GATEWAYS, "Gateway").unwrap();
    let ip = object(&api, "v1", "Service").unwrap()["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        gateway["status"]["addresses"],
        json!([{"type": "IPAddress", "value": ip}, {"type": "Hostname", "value": "waypoint.demo.svc.cluster.local"}])
    );
    let generation = gateway["metadata"]["generation"].clone();
    for condition in gateway["status"]["conditions"].as_array().unwrap() {
        assert_eq!(condition["observedGeneration"], generation, "{condition}");
    }

    for (api_version, kind) in [("v1", "ServiceAccount"), ("apps/v1", "Deployment"), ("v1", "Service")] {
        let object = object(&api, api_version, kind).unwrap_or_else(|| panic!("no {kind}"));
        let meta = &object["metadata"];
        assert_eq!(
            meta["labels"]["gateway.istio.io/managed"], "istio.io-mesh-controller",
            "{kind}"
        );
        assert_eq!(
            meta["labels"]["gateway.networking.k8s.io/gateway-name"], "waypoint",
            "{kind}"
        );
        assert_eq!(
            meta["ownerReferences"],
            json!([{"apiVersion": GATEWAYS, "kind": "Gateway", "name": "waypoint", "uid": uid}]),
            "{kind}"
        );
    }
    let deployment = object(&api, "apps/v1", "Deployment").unwrap();
    assert!(
        deployment["spec"].get("replicas").is_none(),
        "replicas are left to scaling: {deployment}"
    );
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
    assert_eq!(pod["spec"]["serviceAccountName"], "waypoint");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example/waypoint:1.0");
    assert_eq!(
        container["readinessProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"})
    );
    let token = &pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], "istio-ca");
    let service = object(&api, "v1", "Service").unwrap();
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert_eq!(
        service["spec"]["ports"][1],
        json!({"name": "mesh", "port": 15008, "protocol": "TCP", "appProtocol": "hbone"})
    );

    let class = api.get(GATEWAYS, "GatewayClass", None, "istio-waypoint").unwrap();
    assert_eq!(class["spec"]["controllerName"], "istio.io/mesh-controller");
    until(&api, "the class is accepted", |api| {
        let class = api.get(GATEWAYS, "GatewayClass", None, "istio-waypoint").unwrap();
        class["status"]["conditions"][0]["status"] == "True"
    })
    .await;

    // The events of its own writes re-reconcile it a few times; then it settles and writes nothing
    // more: applying unchanged objects is no change, and an unchanged status is not written.
    let mut settled = writes_by_controller(&api).len();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = writes_by_controller(&api).len();
        if now == settled {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never settles: {:?}",
            &writes_by_controller(&api)[settled..]
        );
        settled = now;
    }
    let changes = api.resource_version();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(writes_by_controller(&api).len(), settled);
    assert_eq!(api.resource_version(), changes, "nothing changed in the cluster");

    assert!(api.delete(GATEWAYS, "Gateway", Some("demo"), "waypoint"));
    until(&api, "the owned objects are collected", |api| {
        [("v1", "ServiceAccount"), ("apps/v1", "Deployment"), ("v1", "Service")]
            .iter()
            .all(|(api_version, kind)| object(api, api_version, kind).is_none())
    })
    .await;
}

#[tokio::test]
async fn an_unmanaged_deployment_is_left_alone_until_it_is_gone() {
    let api = cluster().await;
    let theirs = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "waypoint", "namespace": "demo", "labels": {"app": "theirs"}},
        "spec": {"selector": {"matchLabels": {"app": "theirs"}},
                 "template": {"metadata": {"labels": {"app": "theirs"}}, "spec": {"containers": [{"name": "app", "image": "theirs:1"}]}}},
    });
    api.apply(theirs);
    api.apply(gateway());
    let _running = start(&api, true).await;

    let refused =
        "False/Invalid: Deployment demo/waypoint exists and is not managed by istiod-lite; not taking it over";
    until(&api, "the Gateway says why", |api| {
        condition(api, "Programmed").as_deref() == Some(refused)
    })
    .await;
    let deployment = object(&api, "apps/v1", "Deployment").unwrap();
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "theirs:1"
    );
    assert!(
        deployment["metadata"]["labels"]
            .get("gateway.istio.io/managed")
            .is_none()
    );
    assert!(!writes_by_controller(&api).iter().any(|c| c.resource == "deployments"));

    assert!(api.delete("apps/v1", "Deployment", Some("demo"), "waypoint"));
    until(&api, "ours replaces it", |api| {
        object(api, "apps/v1", "Deployment")
            .is_some_and(|d| d["metadata"]["labels"]["gateway.istio.io/managed"].is_string())
    })
    .await;
    until(&api, "the Gateway is programmed", |api| {
        condition(api, "Programmed").is_some_and(|c| c.starts_with("True/Programmed"))
    })
    .await;
}

#[tokio::test]
async fn nothing_is_written_while_not_leading() {
    let api = cluster().await;
    api.apply(gateway());
    let running = start(&api, false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        api.calls().iter().all(|c| c.user != USER),
        "a follower does not even watch"
    );

    running.leading.send(true).unwrap();
    until(&api, "the Deployment is created", |api| {
        object(api, "apps/v1", "Deployment").is_some()
    })
    .await;

    running.leading.send(false).unwrap();
    until(&api, "the watches are closed", |api| api.open_watches() == 0).await;
    let before = writes_by_controller(&api).len();
    assert!(api.delete("apps/v1", "Deployment", Some("demo"), "waypoint"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        writes_by_controller(&api).len(),
        before,
        "no write after losing the lead"
    );
    assert!(object(&api, "apps/v1", "Deployment").is_none());

    running.leading.send(true).unwrap();
    until(&api, "leading again, it repairs", |api| {
        object(api, "apps/v1", "Deployment").is_some()
    })
    .await;
}
