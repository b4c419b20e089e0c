//! The RBAC of `deploy/kubernetes` is exactly what istiod-lite uses: the binary, started with the
//! rendered Deployment's own arguments and environment against the Kubernetes API test double,
//! goes through a representative run (start-up with the initial lists, leader election and
//! renewal, the CA created in a Secret, the root certificate published to every namespace, a pod,
//! a waypoint Gateway with a parameters ConfigMap deployed and its status written, the
//! `istio-waypoint` GatewayClass created and accepted, a certificate signed after a TokenReview).
//! Every request it made, as the double recorded it, must be allowed by the rendered
//! ClusterRole/Role bound to its service account, and every part of those rules must have been
//! needed by some request (no wildcards, nothing cluster-wide that only its own namespace needs).

#[path = "support/process.rs"]
mod process;
#[allow(dead_code)]
#[path = "../../deploy/validate/src/rbac.rs"]
mod rbac;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube_api_double::ApiServer;
use mesh_core::identity::SpiffeId;
use process::{Istiod, Scratch, request_certificate};
use rbac::{Access, Rbac, rendered, requests_of};
use serde_json::{Value, json};
use tokio::task::block_in_place;

const NAMESPACE: &str = "istio-system";
const ACCOUNT: &str = "istiod-lite";
const USER: &str = "system:serviceaccount:istio-system:istiod-lite";
const TOKEN: &str = "istiod-lite-rbac-token";
const WAIT: Duration = Duration::from_secs(30);

/// The istiod-lite container's arguments and environment as the Deployment gives them (the
/// downward API resolved as the kubelet would), each variable as the flag that reads it.
fn deployed_command_line(documents: &[Value]) -> (Vec<String>, Vec<(String, String)>) {
    let deployment = documents
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "istiod-lite")
        .expect("the istiod-lite Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"].as_array().into_iter().flatten();
    let args = args.map(|a| a.as_str().unwrap().to_owned()).collect();
    let mut env = Vec::new();
    for variable in container["env"].as_array().into_iter().flatten() {
        let name = variable["name"].as_str().unwrap().to_owned();
        let value = match variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => "istiod-lite-5f7c9-abcde".to_owned(),
            Some("metadata.namespace") => NAMESPACE.to_owned(),
            Some(other) => panic!("{name}: a downward-API field this test does not know: {other}"),
            None => variable["value"].as_str().unwrap().to_owned(),
        };
        env.push((name, value));
    }
    (args, env)
}

/// `env` as the flags of istiod-lite that read those variables.
fn as_flags(env: &[(String, String)]) -> Vec<String> {
    let command = <istiod_lite::Config as clap::CommandFactory>::command();
    env.iter()
        .map(|(name, value)| {
            let arg = command
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
                .unwrap_or_else(|| panic!("no flag of istiod-lite reads {name}"));
            format!("--{}={value}", arg.get_long().unwrap())
        })
        .collect()
}

/// The cluster before istiod-lite starts: its namespace, an ambient namespace with a server pod
/// and Service, a ztunnel pod, and a waypoint Gateway whose parameters are in a ConfigMap. No
/// GatewayClass (istiod-lite creates it) and no CA Secret (it creates that too).
async fn cluster() -> ApiServer {
    let api = ApiServer::start().await.unwrap();
    api.add_user_token(TOKEN, USER, &[]);
    api.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: demo}\n\
         spec: {selector: {app: server}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: waypoint-params, namespace: demo}\n\
         data: {deployment: \"spec: {replicas: 2}\"}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: demo}\n\
         spec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n  \
         infrastructure: {parametersRef: {group: \"\", kind: ConfigMap, name: waypoint-params}}\n",
    );
    api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ztunnel-1", "namespace": "istio-system"},
        "spec": {"serviceAccountName": "ztunnel", "nodeName": "node-1", "containers": [{"name": "ztunnel", "image": "ztunnel"}]},
        "status": {"phase": "Running", "podIP": "10.0.1.100"}
    }));
    api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "server-1", "namespace": "demo", "labels": {"app": "server"}},
        "spec": {"serviceAccountName": "server", "nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": "10.0.1.1", "conditions": [{"type": "Ready", "status": "True"}]}
    }));
    api
}

/// Whether the object an access names was there before istiod-lite first wrote it: only what
/// [`cluster`] seeded.
fn seeded(access: &Access) -> bool {
    let object = (
        access.resource.as_str(),
        access.namespace.as_deref(),
        access.name.as_deref(),
    );
    matches!(
        object,
        ("gateways", Some("demo"), Some("waypoint")) | ("configmaps", Some("demo"), Some("waypoint-params"))
    )
}

fn condition(object: Option<Value>, kind: &str) -> Option<String> {
    let conditions = object?["status"]["conditions"].as_array()?.clone();
    let found = conditions.into_iter().find(|c| c["type"] == kind)?;
    Some(found["status"].as_str()?.to_owned())
}

async fn until(api: &ApiServer, what: &str, condition: impl Fn(&ApiServer) -> bool) {
    assert!(api.wait_until(condition, WAIT).await, "never: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_rbac_grants_exactly_the_requests_istiod_lite_makes() {
    let Some(documents) = rendered("the_rendered_rbac_grants_exactly_the_requests_istiod_lite_makes") else {
        return;
    };
    let grants = Rbac::new(&documents).grants(NAMESPACE, ACCOUNT);
    let (args, env) = deployed_command_line(&documents);
    assert!(args.contains(&"--kubernetes".to_owned()), "{args:?}");

    let api = cluster().await;
    let scratch = Scratch::new("rbac");
    let kubeconfig = scratch.path("kubeconfig");
    api.write_kubeconfig(&kubeconfig, TOKEN).unwrap();
    let mut command_line = args.clone();
    command_line.extend(as_flags(&env));
    command_line.extend([
        format!("--kubeconfig={}", kubeconfig.display()),
        "--lease-duration=3s".to_owned(),
        "--lease-renew-deadline=2s".to_owned(),
        "--lease-retry-period=500ms".to_owned(),
    ]);
    let istiod = block_in_place(|| Istiod::spawn(&command_line));
    block_in_place(|| istiod.wait_ready(WAIT));

    // The leader deploys the waypoint and writes its status and the class's.
    until(&api, "the waypoint Gateway is programmed", |api| {
        let gateway = api.get("gateway.networking.k8s.io/v1", "Gateway", Some("demo"), "waypoint");
        condition(gateway, "Programmed").as_deref() == Some("True")
    })
    .await;
    until(&api, "the GatewayClass is created and accepted", |api| {
        let class = api.get("gateway.networking.k8s.io/v1", "GatewayClass", None, "istio-waypoint");
        condition(class, "Accepted").as_deref() == Some("True")
    })
    .await;
    until(&api, "the root certificate is in every namespace", |api| {
        ["istio-system", "demo"]
            .iter()
            .all(|ns| api.get("v1", "ConfigMap", Some(ns), "istio-ca-root-cert").is_some())
    })
    .await;
    let deployment = api.get("apps/v1", "Deployment", Some("demo"), "waypoint").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2, "the parameters ConfigMap was read");
    let image = &deployment["spec"]["template"]["spec"]["containers"][0]["image"];
    let waypoint_image = env.iter().find(|(k, _)| k == "WAYPOINT_IMAGE").map(|(_, v)| v.as_str());
    assert_eq!(image.as_str(), waypoint_image, "the deployed WAYPOINT_IMAGE");

    // A node agent's certificate request, authenticated by TokenReview.
    let secret = api
        .get("v1", "Secret", Some(NAMESPACE), "istio-ca-secret")
        .expect("the CA secret");
    let secret: Secret = serde_json::from_value(secret).unwrap();
    let root = String::from_utf8(secret.data.unwrap()["root-cert.pem"].0.clone()).unwrap();
    let uid = api.get("v1", "Pod", Some(NAMESPACE), "ztunnel-1").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = api.issue_service_account_token(
        NAMESPACE,
        "ztunnel",
        Some(("ztunnel-1", &uid)),
        Some("node-1"),
        &["istio-ca"],
    );
    let identity = SpiffeId::new("cluster.local", "demo", "server").unwrap();
    let signed = request_certificate(istiod.tls_channel(&root).await, &token, &identity, true, &root).await;
    assert_eq!(signed.unwrap().identity(), &identity);

    // Every watch open and the Lease renewed: given the time to use every grant (when a grant is
    // never used, the comparison below says which).
    let requests = |api: &ApiServer| requests_of(USER, &api.calls(), seeded);
    let used = |api: &ApiServer| grants.compare(&requests(api)).unused.is_empty();
    api.wait_until(used, Duration::from_secs(15)).await;
    let requests = requests(&api);
    assert!(
        requests.iter().any(|r| r.verb == "update" && r.resource == "leases"),
        "the Lease was renewed"
    );
    let comparison = grants.compare(&requests);
    let made: std::collections::BTreeSet<String> = requests.iter().map(ToString::to_string).collect();
    assert!(
        comparison.is_exact(),
        "deploy/kubernetes/controller/rbac.yaml does not match what istiod-lite does:\n{comparison}\n\
         istiod-lite's requests:\n  {}",
        made.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}
