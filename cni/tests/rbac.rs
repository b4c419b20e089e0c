//! The RBAC of `deploy/kubernetes` is exactly what the node agent uses: `mesh-node-agent`, started
//! with the rendered DaemonSet's own arguments against the Kubernetes API test double as its
//! service account, enrols an ambient pod (ADD), passes a pod of a namespace that is not ambient
//! through, and releases the enrolled pod (DEL). Every request it made must be allowed by the
//! rendered ClusterRole bound to `istio-system/mesh-node-agent`, and every part of that rule must
//! have been needed by some request.

#[allow(dead_code)]
#[path = "../../deploy/validate/src/rbac.rs"]
mod rbac;
#[allow(dead_code)]
#[path = "plugin/support.rs"]
mod support;
#[allow(dead_code)]
#[path = "plugin/ztunnel.rs"]
mod ztunnel;

use kube_api_double::ApiServer;
use rbac::{Rbac, rendered, requests_of};
use serde_json::Value;
use support::{Agent, Invocation, PodNetns, TempDir, privileged};
use ztunnel::Ztunnel;

const NAMESPACE: &str = "istio-system";
const ACCOUNT: &str = "mesh-node-agent";
const USER: &str = "system:serviceaccount:istio-system:mesh-node-agent";
const TOKEN: &str = "mesh-node-agent-rbac-token";

/// The node agent container's arguments, as the DaemonSet gives them.
fn deployed_args(documents: &[Value]) -> Vec<String> {
    let daemon_set = documents
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "mesh-node-agent")
        .expect("the mesh-node-agent DaemonSet");
    let container = &daemon_set["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"].as_array().into_iter().flatten();
    args.map(|a| a.as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn the_rendered_rbac_grants_exactly_the_requests_the_node_agent_makes() {
    let test = "the_rendered_rbac_grants_exactly_the_requests_the_node_agent_makes";
    if !privileged(test) {
        return;
    }
    let Some(documents) = rendered(test) else {
        return;
    };
    let grants = Rbac::new(&documents).grants(NAMESPACE, ACCOUNT);
    let args = deployed_args(&documents);
    assert_eq!(args, ["--kubernetes"]);

    let api = ApiServer::start().await.unwrap();
    api.add_user_token(TOKEN, USER, &[]);
    api.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: demo, uid: uid-rbac-client}\n\
         spec: {serviceAccountName: client, containers: [{name: c, image: i}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: old, namespace: legacy, uid: uid-rbac-old}\n\
         spec: {containers: [{name: c, image: i}]}\n",
    );
    let dir = TempDir::new("rbac");
    let kubeconfig = dir.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, TOKEN).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    let mut agent_args: Vec<&str> = args.iter().map(String::as_str).collect();
    agent_args.extend(["--kubeconfig", &kubeconfig]);
    let agent = Agent::start_in(dir, &agent_args).await;
    let ztunnel = Ztunnel::connect(&agent.zds_socket).await;
    ztunnel.snapshot().await;

    // A pod of a namespace that is not ambient: read, passed through.
    let legacy = PodNetns::new();
    let passed = Invocation::pod("ADD", &legacy.path, "legacy", "old", "uid-rbac-old", agent.netconf());
    passed.run().await.assert_passed_through();
    assert!(!legacy.captured());

    // An ambient pod: read, enrolled, annotated; released and the annotation removed.
    let pod = PodNetns::new();
    let add = Invocation::pod("ADD", &pod.path, "demo", "client", "uid-rbac-client", agent.netconf());
    let plugin = add.spawn().await;
    ztunnel.expect_add().await;
    ztunnel.ack(None).await;
    support::Ran::from(plugin.wait_with_output().await.unwrap()).assert_passed_through();
    let annotated = api.get("v1", "Pod", Some("demo"), "client").unwrap();
    assert_eq!(
        annotated["metadata"]["annotations"]["ambient.istio.io/redirection"],
        "enabled"
    );
    let del = add.set("CNI_COMMAND", Some("DEL")).spawn().await;
    ztunnel.expect_del().await;
    ztunnel.ack(None).await;
    assert_eq!(del.wait_with_output().await.unwrap().status.code(), Some(0));

    let requests = requests_of(USER, &api.calls(), |_| true);
    let comparison = grants.compare(&requests);
    let made: std::collections::BTreeSet<String> = requests.iter().map(ToString::to_string).collect();
    assert!(
        comparison.is_exact(),
        "deploy/kubernetes/node/node-agent.yaml does not match what the node agent does:\n{comparison}\n\
         its requests:\n  {}",
        made.into_iter().collect::<Vec<_>>().join("\n  ")
    );
    assert!(made.contains("patch core/pods client in demo"), "{made:?}");
}
