//! Two istiod-lite replicas against one API (the `kube-api-double`): both serve xDS and sign from
//! the same root (the CA Secret the first one created); exactly one writes, the Lease holder;
//! killing it moves the Lease and the writes to the other within the lease duration; a ztunnel's
//! xDS client (mesh-core's, the one ztunnel runs) connected to the killed replica through a
//! Service-like forwarder reconnects to the other and keeps its state.

#[path = "support/process.rs"]
mod process;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube_api_double::{ApiCall, ApiServer};
use mesh_core::identity::SpiffeId;
use mesh_core::proto::ADDRESS_TYPE_URL;
use mesh_core::xds::{Backoff, Client, Handler, Rejection, Update};
use process::{Istiod, Scratch, request_certificate};
use serde_json::json;
use tokio::task::block_in_place;

const LEASE: &str = "istiod-lite-leader";
const LEASE_DURATION: Duration = Duration::from_secs(3);

/// Resource names, as a ztunnel holds them.
#[derive(Clone, Default)]
struct Names(Arc<Mutex<BTreeSet<String>>>);

impl Handler for Names {
    fn apply(&mut self, _type_url: &str, updates: Vec<Update>, removed: Vec<String>) -> Vec<Rejection> {
        let mut names = self.0.lock().unwrap();
        names.extend(updates.into_iter().map(|u| u.name));
        for name in removed {
            names.remove(&name);
        }
        Vec::new()
    }
}

impl Names {
    fn contains(&self, name: &str) -> bool {
        self.0.lock().unwrap().contains(name)
    }
}

/// A Service in front of the replicas: forwards every connection to whichever one it points at.
async fn forwarder(target: Arc<Mutex<SocketAddr>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let to = *target.lock().unwrap();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    address
}

fn replica(api: &ApiServer, scratch: &Scratch, name: &str) -> Istiod {
    let token = format!("{name}-token");
    api.add_user_token(&token, &format!("system:serviceaccount:istio-system:{name}"), &[]);
    let kubeconfig = scratch.path(&format!("{name}.kubeconfig"));
    api.write_kubeconfig(&kubeconfig, &token).unwrap();
    let istiod = block_in_place(|| {
        Istiod::spawn(&[
            "--kubernetes".to_owned(),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--pod-name={name}"),
            "--lease-duration=3s".to_owned(),
            "--lease-renew-deadline=2s".to_owned(),
            "--lease-retry-period=500ms".to_owned(),
        ])
    });
    block_in_place(|| istiod.wait_ready(Duration::from_secs(20)));
    istiod
}

fn holder(api: &ApiServer) -> Option<String> {
    let lease = api.get("coordination.k8s.io/v1", "Lease", Some("istio-system"), LEASE)?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
}

/// Writes by `user`, leaving out TokenReviews (every replica asks those for its callers).
fn writes_by(calls: &[ApiCall], user: &str) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.user.ends_with(user) && matches!(c.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .filter(|c| c.resource != "tokenreviews")
        .map(|c| format!("{} {}/{}", c.verb, c.resource, c.name.as_deref().unwrap_or("")))
        .collect()
}

fn waypoint(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    })
}

fn pod(name: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "labels": {"app": "server"}},
        "spec": {"serviceAccountName": "server", "nodeName": "node-1", "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_writes_and_the_other_takes_over_when_it_dies() {
    let api = ApiServer::start().await.unwrap();
    api.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    api.apply(pod("a", "10.0.1.1"));
    let workload_token = api.issue_service_account_token("demo", "server", None, None, &["istio-ca"]);
    let scratch = Scratch::new("replicas");
    let mut first = replica(&api, &scratch, "replica-a");
    assert!(
        api.wait_until(
            |api| holder(api).as_deref() == Some("replica-a"),
            Duration::from_secs(10)
        )
        .await,
        "replica-a never took the lease: {:?}",
        holder(&api)
    );
    let second = replica(&api, &scratch, "replica-b");

    // One root: the Secret replica-a created, which replica-b loaded.
    let secret: Secret = serde_json::from_value(
        api.get("v1", "Secret", Some("istio-system"), "istio-ca-secret")
            .unwrap(),
    )
    .unwrap();
    let root = String::from_utf8(secret.data.unwrap()["root-cert.pem"].0.clone()).unwrap();
    let own = SpiffeId::new("cluster.local", "demo", "server").unwrap();
    for istiod in [&first, &second] {
        let cert = request_certificate(istiod.tls_channel(&root).await, &workload_token, &own, false, &root)
            .await
            .unwrap();
        assert_eq!(cert.identity(), &own);
    }

    // Only the leader writes.
    api.apply(waypoint("waypoint"));
    assert!(
        api.wait_until(
            |api| api.get("apps/v1", "Deployment", Some("demo"), "waypoint").is_some(),
            Duration::from_secs(10)
        )
        .await,
        "no waypoint Deployment"
    );
    let calls = api.calls();
    assert!(
        writes_by(&calls, "replica-a")
            .iter()
            .any(|w| w.starts_with("patch deployments/waypoint"))
    );
    assert_eq!(
        writes_by(&calls, "replica-b"),
        Vec::<String>::new(),
        "the follower wrote"
    );

    // A ztunnel's xDS client reaches replica-a through the forwarder.
    let target = Arc::new(Mutex::new(first.servers["xds-tls"]));
    let service = forwarder(target.clone()).await;
    let names = Names::default();
    let server = mesh_core::xds::Server::tls(
        &service.to_string(),
        "istiod.istio-system.svc",
        &root,
        Some(workload_token.as_str().into()),
    )
    .unwrap();
    let node = mesh_core::control::node("ztunnel", "10.0.1.100", "node-1");
    let backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    };
    let client = tokio::spawn(Client::new(server, node, &[ADDRESS_TYPE_URL], backoff, names.clone()).run(None));
    let held = names.clone();
    assert!(
        api.wait_until(
            move |_| held.contains("Kubernetes//Pod/demo/a"),
            Duration::from_secs(10)
        )
        .await
    );

    // replica-a dies: the lease, the writes and the client move to replica-b.
    let killed = Instant::now();
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    *target.lock().unwrap() = second.servers["xds-tls"];
    assert!(
        api.wait_until(
            |api| holder(api).as_deref() == Some("replica-b"),
            Duration::from_secs(15)
        )
        .await,
        "replica-b never took the lease: {:?}",
        holder(&api)
    );
    let moved = killed.elapsed();
    println!("lease moved {moved:?} after the leader was killed (lease duration {LEASE_DURATION:?})");
    assert!(
        moved < LEASE_DURATION + Duration::from_secs(3),
        "the lease took {moved:?} to move"
    );
    api.apply(waypoint("second"));
    assert!(
        api.wait_until(
            |api| api.get("apps/v1", "Deployment", Some("demo"), "second").is_some(),
            Duration::from_secs(10)
        )
        .await,
        "the new leader did not deploy the second waypoint"
    );
    assert!(
        writes_by(&api.calls(), "replica-b")
            .iter()
            .any(|w| w.starts_with("patch deployments/second"))
    );

    api.apply(pod("e", "10.0.1.5"));
    let held = names.clone();
    assert!(
        api.wait_until(
            move |_| held.contains("Kubernetes//Pod/demo/e"),
            Duration::from_secs(10)
        )
        .await,
        "the client did not reach replica-b"
    );
    assert!(names.contains("Kubernetes//Pod/demo/a"), "the client lost its state");
    client.abort();
}
