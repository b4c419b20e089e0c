//! `--kubernetes`: pods read from the API (the Kubernetes API test double), their uid checked
//! against `K8S_POD_UID`, and `ambient.istio.io/redirection: enabled` written once ztunnel holds
//! the pod, removed on DEL.

use kube_api_double::{ADMIN_TOKEN, ApiServer};
use serde_json::{Value, json};

use crate::support::{self, Agent, Invocation, PodNetns, TempDir, privileged};
use crate::ztunnel::Ztunnel;

fn annotation(api: &ApiServer, name: &str) -> Value {
    let pod = api.get("v1", "Pod", Some("demo"), name).expect("the pod");
    pod["metadata"]["annotations"]["ambient.istio.io/redirection"].clone()
}

#[tokio::test]
async fn the_pod_is_annotated_once_ztunnel_holds_it() {
    if !privileged("the_pod_is_annotated_once_ztunnel_holds_it") {
        return;
    }
    let api = ApiServer::start().await.unwrap();
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}}));
    api.apply(json!({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "client", "namespace": "demo", "uid": "uid-k8s-client"},
                     "spec": {"serviceAccountName": "client", "containers": [{"name": "c", "image": "i"}]}}));
    let dir = TempDir::new("kube");
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, ADMIN_TOKEN).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    let agent = Agent::start_in(dir, &["--kubernetes", "--kubeconfig", &kubeconfig]).await;
    let ztunnel = Ztunnel::connect(&agent.zds_socket).await;
    ztunnel.snapshot().await;
    let pod = PodNetns::new();

    // A pod of that name with another uid, or no such pod: errors naming what the API says.
    let stale = Invocation::pod("ADD", &pod.path, "demo", "client", "uid-stale", agent.netconf());
    stale
        .run()
        .await
        .assert_error(101, "K8S_POD_UID=uid-stale: pod demo/client has uid uid-k8s-client");
    let ghost = Invocation::pod("ADD", &pod.path, "demo", "ghost", "uid-ghost", agent.netconf());
    ghost
        .run()
        .await
        .assert_error(101, "K8S_POD_NAME=ghost: no Pod demo/ghost in the Kubernetes API");
    assert!(!pod.captured());
    assert_eq!(annotation(&api, "client"), Value::Null);

    let add = Invocation::pod("ADD", &pod.path, "demo", "client", "uid-k8s-client", agent.netconf());
    let plugin = add.spawn().await;
    let (uid, info, _) = ztunnel.expect_add().await;
    assert_eq!(
        (uid.as_str(), info.service_account.as_str()),
        ("uid-k8s-client", "client")
    );
    assert_eq!(annotation(&api, "client"), Value::Null, "not before ztunnel acked");
    ztunnel.ack(None).await;
    support::Ran::from(plugin.wait_with_output().await.unwrap()).assert_passed_through();
    assert_eq!(annotation(&api, "client"), "enabled");

    let del = add.clone().set("CNI_COMMAND", Some("DEL")).spawn().await;
    assert_eq!(ztunnel.expect_del().await, "uid-k8s-client");
    ztunnel.ack(None).await;
    assert_eq!(del.wait_with_output().await.unwrap().status.code(), Some(0));
    assert_eq!(annotation(&api, "client"), Value::Null, "removed on DEL");
    assert!(!pod.captured());

    // DEL after the pod is gone from the API succeeds as well.
    let plugin = add.spawn().await;
    ztunnel.expect_add().await;
    ztunnel.ack(None).await;
    support::Ran::from(plugin.wait_with_output().await.unwrap()).assert_passed_through();
    assert!(api.delete("v1", "Pod", Some("demo"), "client"));
    let del = add.set("CNI_COMMAND", Some("DEL")).spawn().await;
    ztunnel.expect_del().await;
    ztunnel.ack(None).await;
    assert_eq!(del.wait_with_output().await.unwrap().status.code(), Some(0));
}
