//! istiod-lite as a process on a directory of YAML: it prints where it listens, becomes ready,
//! streams the full state over delta xDS, then only what a file change changed (a removed pod as a
//! removed resource), signs certificates over TLS for a node's pods, and drains on SIGTERM.

#[path = "support/process.rs"]
mod process;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_core::identity::SpiffeId;
use mesh_core::proto::ADDRESS_TYPE_URL;
use process::{BIN, Istiod, Scratch, Subscription, http_get, names, request_certificate, write_atomically};
use tonic::transport::Channel;

fn start(scratch: &Scratch) -> Istiod {
    let istiod = Istiod::spawn(&[
        format!("--config-dir={}", scratch.path("config").display()),
        format!("--ca-dir={}", scratch.path("ca").display()),
        format!("--node-tokens-dir={}", scratch.path("tokens").display()),
    ]);
    istiod.wait_ready(Duration::from_secs(10));
    istiod
}

fn pod(name: &str, ip: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{app: server, version: {version}}}\nspec:\n  serviceAccountName: server\n  nodeName: node-1\n  containers: [{{name: app, image: app}}]\nstatus:\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n---\n"
    )
}

fn write_config(dir: &Path, pods: &[String]) {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: demo}\nspec:\n  selector: {app: server}\n  clusterIP: 10.96.0.10\n  ports: [{port: 80, targetPort: 8080}]\n---\n",
    );
    yaml.extend(pods.iter().cloned());
    write_atomically(dir, "demo.yaml", &yaml);
}

#[tokio::test]
async fn serves_the_directory_over_delta_xds_and_signs_over_tls() {
    let scratch = Scratch::new("xds");
    write_config(
        &scratch.path("config"),
        &[pod("a", "10.0.1.1", "v1"), pod("b", "10.0.1.2", "v1")],
    );
    std::fs::write(scratch.path("tokens").join("node-1"), "secret-node-1\n").unwrap();
    let istiod = start(&scratch);

    let channel = Channel::from_shared(format!("http://{}", istiod.servers["xds-plaintext"]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut subscription = Subscription::open(channel, ADDRESS_TYPE_URL, None).await.unwrap();
    let full = subscription.next().await;
    assert_eq!(
        names(&full),
        [
            "Kubernetes//Pod/demo/a",
            "Kubernetes//Pod/demo/b",
            "demo/server.demo.svc.cluster.local"
        ]
    );

    // b changes: only b comes back.
    let written = Instant::now();
    write_config(
        &scratch.path("config"),
        &[pod("a", "10.0.1.1", "v1"), pod("b", "10.0.1.2", "v2")],
    );
    let delta = subscription.next().await;
    println!("file change to delta: {:?}", written.elapsed());
    assert_eq!(names(&delta), ["Kubernetes//Pod/demo/b"]);
    assert!(delta.removed_resources.is_empty());

    // a goes away: it arrives as a removed resource.
    write_config(&scratch.path("config"), &[pod("b", "10.0.1.2", "v2")]);
    let removal = subscription.next().await;
    assert!(removal.resources.is_empty(), "{:?}", removal.resources);
    assert_eq!(removal.removed_resources, ["Kubernetes//Pod/demo/a"]);

    // The CA over TLS, verified against the root it wrote to --ca-dir.
    let root = std::fs::read_to_string(scratch.path("ca").join("root-cert.pem")).unwrap();
    let identity = SpiffeId::new("cluster.local", "demo", "server").unwrap();
    let cert = request_certificate(istiod.tls_channel(&root).await, "secret-node-1", &identity, true, &root)
        .await
        .unwrap();
    assert_eq!(cert.identity(), &identity);

    // xDS on the TLS port wants a caller: the node token is one, no token is refused.
    let refused = Subscription::open(istiod.tls_channel(&root).await, ADDRESS_TYPE_URL, None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("missing `authorization"), "{refused:?}");
    let mut node = Subscription::open(istiod.tls_channel(&root).await, ADDRESS_TYPE_URL, Some("secret-node-1"))
        .await
        .unwrap();
    assert_eq!(
        names(&node.next().await),
        ["Kubernetes//Pod/demo/b", "demo/server.demo.svc.cluster.local"]
    );

    let (status, metrics) = http_get(istiod.servers["metrics"], "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("istiod_xds_pushes_total{type=\"Address\"} 4"),
        "{metrics}"
    );
    assert!(metrics.contains("istiod_xds_connected_clients 2"), "{metrics}");
}

#[tokio::test]
async fn exits_cleanly_on_sigterm_and_refuses_bad_flags() {
    let scratch = Scratch::new("sigterm");
    write_config(&scratch.path("config"), &[]);
    let mut istiod = start(&scratch);
    assert!(
        Command::new("kill")
            .args(["-TERM", &istiod.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = istiod.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit within 10s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");

    let output = Command::new(BIN)
        .args(["--config-dir", "/nonexistent", "--xds-plaintext-addr", "0.0.0.0:15010"])
        .output()
        .unwrap();
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(!output.status.success());
    assert!(error.contains("0.0.0.0:15010 is not a loopback address"), "{error}");
    let output = Command::new(BIN).output().unwrap();
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(error.contains("--config-dir"), "{error}");
}

fn scans(istiod: &Istiod) -> u64 {
    let (_, metrics) = http_get(istiod.servers["metrics"], "/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istiod_config_scans_total "))
        .unwrap_or_else(|| panic!("no scan counter in {metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The watcher once reacted to its own opens and reads and rescanned ~10 times a second forever.
#[test]
fn an_idle_directory_is_not_read_again() {
    let scratch = Scratch::new("idle");
    write_config(&scratch.path("config"), &[pod("a", "10.0.1.1", "v1")]);
    let istiod = start(&scratch);
    let before = scans(&istiod);
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(scans(&istiod), before, "the directory was read while nothing changed");

    write_config(&scratch.path("config"), &[pod("a", "10.0.1.1", "v2")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while scans(&istiod) == before {
        assert!(Instant::now() < deadline, "a real change was not read");
        std::thread::sleep(Duration::from_millis(20));
    }
}
