//! The istiod-lite binary with `--kubernetes`, against the Kubernetes API test double
//! (`kube-api-double`) through a kubeconfig, as it runs on a cluster: objects created, changed and
//! deleted through the API reach xDS; a watch answered 410 Gone relists without losing or
//! duplicating anything; the API going away and coming back loses nothing; the CA and xDS on
//! 15012 accept callers by TokenReview; the CA key lives in a Secret; bad kubeconfigs, missing RBAC
//! and missing CRDs each say so in one line.

#[path = "support/process.rs"]
mod process;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube_api_double::ApiServer;
use mesh_core::identity::SpiffeId;
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use process::{BIN, Istiod, Scratch, Subscription, names, request_certificate};
use serde_json::{Value, json};
use tokio::task::block_in_place;

/// istiod-lite's own credentials towards the API.
const ISTIOD_TOKEN: &str = "istiod-lite-api-token";
const ZTUNNEL_POD_UID: &str = "0b8c6a1e-ztunnel-node-1";

fn pod(name: &str, ip: &str, node: &str, service_account: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "labels": {"app": "server"}},
        "spec": {"serviceAccountName": service_account, "nodeName": node, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

/// A cluster with the ambient namespace `demo`, its server pods and Service, and a ztunnel pod on
/// node-1.
async fn cluster() -> ApiServer {
    let api = ApiServer::start().await.unwrap();
    api.add_user_token(ISTIOD_TOKEN, "system:serviceaccount:istio-system:istiod-lite", &[]);
    api.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: demo}\n\
         spec: {selector: {app: server}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}\n",
    );
    api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ztunnel-1", "namespace": "istio-system", "uid": ZTUNNEL_POD_UID},
        "spec": {"serviceAccountName": "ztunnel", "nodeName": "node-1", "containers": [{"name": "ztunnel", "image": "ztunnel"}]},
        "status": {"phase": "Running", "podIP": "10.0.1.100"}
    }));
    api.apply(pod("a", "10.0.1.1", "node-1", "server"));
    api
}

fn ztunnel_token(api: &ApiServer) -> String {
    let uid = api.get("v1", "Pod", Some("istio-system"), "ztunnel-1").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    api.issue_service_account_token(
        "istio-system",
        "ztunnel",
        Some(("ztunnel-1", &uid)),
        Some("node-1"),
        &["istio-ca"],
    )
}

fn start(api: &ApiServer, scratch: &Scratch, extra: &[&str]) -> Istiod {
    let kubeconfig = scratch.path("kubeconfig");
    api.write_kubeconfig(&kubeconfig, ISTIOD_TOKEN).unwrap();
    let mut args = vec![
        "--kubernetes".to_owned(),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--lease-duration=3s".to_owned(),
        "--lease-renew-deadline=2s".to_owned(),
        "--lease-retry-period=500ms".to_owned(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    block_in_place(|| Istiod::spawn(&args))
}

/// The root the CA keeps in its Secret.
fn root_of(api: &ApiServer) -> String {
    let secret = api
        .get("v1", "Secret", Some("istio-system"), "istio-ca-secret")
        .expect("the CA secret");
    let secret: Secret = serde_json::from_value(secret).unwrap();
    String::from_utf8(secret.data.unwrap()["root-cert.pem"].0.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_follows_the_api_through_relists_and_outages() {
    let mut api = cluster().await;
    api.apply_yaml(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-client, namespace: demo}\n\
         spec: {selector: {matchLabels: {app: server}}, action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]}\n",
    );
    let scratch = Scratch::new("kube-follow");
    let istiod = start(&api, &scratch, &[]);
    block_in_place(|| istiod.wait_ready(Duration::from_secs(20)));
    let root = root_of(&api);
    let token = ztunnel_token(&api);

    let mut addresses = Subscription::open(istiod.tls_channel(&root).await, ADDRESS_TYPE_URL, Some(&token))
        .await
        .unwrap();
    assert_eq!(
        names(&addresses.next().await),
        [
            "Kubernetes//Pod/demo/a",
            "Kubernetes//Pod/istio-system/ztunnel-1",
            "demo/server.demo.svc.cluster.local"
        ]
    );
    // The leader publishes the root to every namespace, and puts it back when it goes.
    let root_in = |api: &ApiServer, namespace: &str| {
        api.get("v1", "ConfigMap", Some(namespace), "istio-ca-root-cert")
            .and_then(|c| c["data"]["root-cert.pem"].as_str().map(str::to_owned))
    };
    assert!(
        api.wait_until(
            |api| root_in(api, "demo").as_deref() == Some(root.as_str()),
            Duration::from_secs(10)
        )
        .await,
        "no istio-ca-root-cert in demo"
    );
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late"}}));
    assert!(api.delete("v1", "ConfigMap", Some("demo"), "istio-ca-root-cert"));
    for namespace in ["late", "demo"] {
        assert!(
            api.wait_until(
                |api| root_in(api, namespace).as_deref() == Some(root.as_str()),
                Duration::from_secs(10)
            )
            .await,
            "the root was not (re)published in {namespace}"
        );
    }

    let mut policies = Subscription::open(istiod.tls_channel(&root).await, AUTHORIZATION_TYPE_URL, Some(&token))
        .await
        .unwrap();
    assert_eq!(names(&policies.next().await), ["demo/allow-client"]);

    // Created, changed and deleted through the API.
    api.apply(pod("b", "10.0.1.2", "node-1", "server"));
    assert_eq!(names(&addresses.next().await), ["Kubernetes//Pod/demo/b"]);
    assert!(api.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        Some("demo"),
        "allow-client"
    ));
    assert_eq!(policies.next().await.removed_resources, ["demo/allow-client"]);
    // The selected workloads no longer name the policy.
    assert_eq!(
        names(&addresses.next().await),
        ["Kubernetes//Pod/demo/a", "Kubernetes//Pod/demo/b"]
    );
    assert!(api.delete("v1", "Pod", Some("demo"), "a"));
    assert_eq!(addresses.next().await.removed_resources, ["Kubernetes//Pod/demo/a"]);

    // 410 Gone: every watch relists; the next change arrives alone, nothing removed or re-sent.
    let relists_before = istiod.log_lines_with("initial list synced");
    api.compact();
    block_in_place(|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while istiod.log_lines_with("initial list synced") < relists_before * 2 {
            assert!(std::time::Instant::now() < deadline, "no relist after 410 Gone");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    api.apply(pod("c", "10.0.1.3", "node-1", "server"));
    let after_relist = addresses.next().await;
    assert_eq!(names(&after_relist), ["Kubernetes//Pod/demo/c"]);
    assert!(after_relist.removed_resources.is_empty(), "{after_relist:?}");

    // The API goes away: nothing is withdrawn meanwhile; changes made while it was down arrive
    // once it is back.
    api.stop().await;
    api.apply(pod("d", "10.0.1.4", "node-1", "server"));
    assert!(api.delete("v1", "Pod", Some("demo"), "b"));
    let during = addresses.quiet_for(Duration::from_secs(2)).await;
    assert!(during.is_none(), "istiod pushed while the API was away: {during:?}");
    api.restart().await.unwrap();
    let mut added = Vec::new();
    let mut removed = Vec::new();
    while added.is_empty() || removed.is_empty() {
        let response = addresses.next().await;
        added.extend(names(&response));
        removed.extend(response.removed_resources);
    }
    assert_eq!(added, ["Kubernetes//Pod/demo/d"]);
    assert_eq!(removed, ["Kubernetes//Pod/demo/b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_and_xds_authenticate_callers_with_token_review() {
    let api = cluster().await;
    api.apply(pod("elsewhere", "10.0.2.1", "node-2", "other"));
    api.apply(pod("client", "10.0.1.9", "node-1", "client"));
    let scratch = Scratch::new("kube-ca");
    // A directory of YAML beside the API: both sources feed one configuration.
    std::fs::write(
        scratch.path("config").join("extra.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: from-file, namespace: demo}\nspec: {nodeName: node-1, containers: []}\nstatus: {podIP: 10.0.1.50}\n",
    )
    .unwrap();
    let config_dir = format!("--config-dir={}", scratch.path("config").display());
    let istiod = start(&api, &scratch, &[&config_dir]);
    block_in_place(|| istiod.wait_ready(Duration::from_secs(20)));
    let root = root_of(&api);
    let id = |sa: &str| SpiffeId::new("cluster.local", "demo", sa).unwrap();
    let ask = async |token: String, identity: SpiffeId, impersonate: bool| {
        request_certificate(istiod.tls_channel(&root).await, &token, &identity, impersonate, &root).await
    };

    // The node agent on node-1 gets the identity of a pod on node-1.
    let granted = ask(ztunnel_token(&api), id("server"), true).await.unwrap();
    assert_eq!(granted.identity(), &id("server"));

    let client_uid = api.get("v1", "Pod", Some("demo"), "client").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let client_token = api.issue_service_account_token(
        "demo",
        "client",
        Some(("client", &client_uid)),
        Some("node-1"),
        &["istio-ca"],
    );
    // Any workload gets its own identity.
    let own = ask(client_token.clone(), id("client"), false).await.unwrap();
    assert_eq!(own.identity(), &id("client"));

    let expired = ztunnel_token(&api);
    api.expire_token(&expired);
    let wrong_audience = api.issue_service_account_token(
        "istio-system",
        "ztunnel",
        Some(("ztunnel-1", ZTUNNEL_POD_UID)),
        Some("node-1"),
        &["vault"],
    );
    let refusals = [
        (
            "pods only on other nodes",
            ztunnel_token(&api),
            id("other"),
            "node node-1 runs no pod with service account demo/other",
        ),
        (
            "an untrusted caller",
            client_token,
            id("server"),
            "caller demo/client is not a trusted node agent",
        ),
        (
            "an expired token",
            expired,
            id("server"),
            "did not authenticate the token",
        ),
        (
            "an unknown token",
            "made-up".to_owned(),
            id("server"),
            "did not authenticate the token",
        ),
        (
            "a wrong audience",
            wrong_audience,
            id("server"),
            "did not authenticate the token",
        ),
    ];
    for (case, token, identity, message) in refusals {
        let status = ask(token, identity, true).await.expect_err(case);
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{case}: {status:?}");
        assert!(
            status.message().contains(message),
            "{case}: {:?} lacks {message:?}",
            status.message()
        );
    }

    // xDS on 15012: anonymous and bad tokens refused, a valid one served.
    let anonymous = Subscription::open(istiod.tls_channel(&root).await, ADDRESS_TYPE_URL, None)
        .await
        .err()
        .expect("anonymous xDS is refused");
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated, "{anonymous:?}");
    let unknown = Subscription::open(istiod.tls_channel(&root).await, ADDRESS_TYPE_URL, Some("made-up"))
        .await
        .err()
        .expect("an unknown token is refused");
    assert_eq!(unknown.code(), tonic::Code::Unauthenticated, "{unknown:?}");
    let mut served = Subscription::open(
        istiod.tls_channel(&root).await,
        ADDRESS_TYPE_URL,
        Some(&ztunnel_token(&api)),
    )
    .await
    .unwrap();
    let served = names(&served.next().await);
    for name in ["Kubernetes//Pod/demo/a", "Kubernetes//Pod/demo/from-file"] {
        assert!(served.contains(&name.to_owned()), "{name} not served: {served:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_rbac_and_crds_and_bad_kubeconfigs_say_what_is_missing() {
    let api = cluster().await;
    api.uninstall("networking.istio.io", "serviceentries");
    api.forbid("list", "", "services");
    let scratch = Scratch::new("kube-errors");
    let istiod = start(&api, &scratch, &[]);
    let crd = block_in_place(|| {
        istiod.wait_for_log(
            &["does not serve serviceentries.networking.istio.io"],
            Duration::from_secs(20),
        )
    });
    assert!(crd.contains("is its CRD installed?"), "{crd}");
    let rbac = block_in_place(|| istiod.wait_for_log(&["forbids reading services"], Duration::from_secs(20)));
    assert!(
        rbac.contains("cannot list resource \\\"services\\\"")
            && rbac.contains("grant istiod-lite list and watch on services"),
        "{rbac}"
    );
    // Readiness waits for the list it may not read; the missing CRD does not hold it up.
    assert!(!istiod.is_ready(), "ready without the services list");

    let missing = scratch.path("no-such-kubeconfig");
    let output = std::process::Command::new(BIN)
        .arg("--kubernetes")
        .arg(format!("--kubeconfig={}", missing.display()))
        .args(process::LOOPBACK_PORTS)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("--kubeconfig {}", missing.display())),
        "{stderr}"
    );

    let help = std::process::Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--kubernetes",
        "--kubeconfig",
        "--token-audiences",
        "--trusted-node-accounts",
        "--lease-duration",
        "--lease-renew-deadline",
        "--lease-retry-period",
        "--waypoint-image",
        "--system-namespace",
        "[env: CA_TRUSTED_NODE_ACCOUNTS=]",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}
