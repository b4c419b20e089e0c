//! The mesh end to end in one process: istiod-lite on a directory of YAML and two ztunnels on
//! loopback addresses. A client pod on node 1 reaches pods and a service on node 2 over HBONE
//! (certificates from the CA, state from xDS); a policy written to the directory takes effect.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mesh_tests::greeting_echo_app;
use mesh_tests::lab::{self, Lab, http_get};

fn demo(base: u8) -> String {
    let pod = |name: &str, node: &str, ip: &str, sa: &str, app: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {app}}}}}\nspec:\n  serviceAccountName: {sa}\n  nodeName: {node}\n  containers: [{{name: app, image: app, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus:\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
        )
    };
    let mut yaml =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n"
            .to_owned();
    yaml += &pod("client", "node-1", &format!("127.{base}.1.1"), "client", "client");
    yaml += &pod("server-1", "node-2", &format!("127.{base}.2.1"), "server", "server");
    yaml += &pod("server-2", "node-2", &format!("127.{base}.2.2"), "server", "server");
    yaml += &format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: demo}}\nspec:\n  selector: {{app: server}}\n  clusterIP: 127.{base}.99.1\n  ports: [{{port: 80, targetPort: http}}]\n"
    );
    yaml
}

async fn exchange(lab: &Lab, destination: SocketAddr, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let stream = lab.connect(1, &format!("127.{}.1.1", lab.base), destination).await?;
    lab::exchange(stream, data).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_and_services_across_nodes_over_hbone_and_a_policy_that_takes_effect() {
    let base = 61;
    let lab = Lab::start(base, &demo(base), &["node-1", "node-2"]).await.unwrap();
    let one = greeting_echo_app(&format!("127.{base}.2.1:8080"), "one").await;
    let _two = greeting_echo_app(&format!("127.{base}.2.2:8080"), "two").await;

    // Pod to pod, data intact both ways with half-close.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let received = exchange(&lab, format!("127.{base}.2.1:8080").parse().unwrap(), &data)
        .await
        .unwrap();
    assert_eq!(&received[..3], b"one");
    assert!(received[3..] == data[..], "echo intact");

    // Pod to service VIP: spread over both endpoints, named target port resolved.
    let mut greetings = Vec::new();
    for _ in 0..6 {
        let received = exchange(&lab, format!("127.{base}.99.1:80").parse().unwrap(), b"x")
            .await
            .unwrap();
        greetings.push(String::from_utf8_lossy(&received[..3]).into_owned());
    }
    assert_eq!(greetings.iter().filter(|g| *g == "one").count(), 3, "{greetings:?}");

    // ztunnel 1 shows what it learned and the certificate it holds for its pod.
    let (status, dump) = http_get(format!("{}:15000", lab.node_host(1)).parse().unwrap(), "/config_dump")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 3);
    assert_eq!(
        dump["certificates"][0]["identity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(dump["certificates"][0]["state"], "ready");

    // A policy that admits only `admin` to the servers: the client is refused before the app.
    lab.write_config(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: admin-only, namespace: demo}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/admin]}}]}]\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = one.load(Ordering::SeqCst);
        let received = exchange(&lab, format!("127.{base}.2.1:8080").parse().unwrap(), b"x")
            .await
            .unwrap_or_default();
        if received.is_empty() {
            assert_eq!(
                one.load(Ordering::SeqCst),
                before,
                "the app never saw the denied connection"
            );
            break;
        }
        assert!(Instant::now() < deadline, "policy not in effect within 10s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
