//! Our ztunnel as a drop-in for Istio's: run with exactly the environment Istio's ztunnel chart
//! gives its container (and its `proxy ztunnel` arguments), the root certificate and projected
//! token where that chart mounts them (relative to the working directory, `/` in an image), and
//! nothing else. It must come up, reach the controller over TLS with the token, take pods from
//! the node agent's socket, and serve its admin, metrics and readiness ports. Runs in a network
//! namespace of its own, so the default ports are free.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::lab::{Lab, http_get, pod_yaml};
use mesh_tests::zds_peer::ZdsPeer;
use mesh_tests::{netns, workspace_binary};

const BASE: u8 = 75;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn istios_chart_environment_is_enough() {
    if !netns::privileged("istios_chart_environment_is_enough") {
        return;
    }
    netns::isolated(|| async {
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}\n{}",
            pod_yaml("server", "demo", "node-1", "10.75.0.2", "server")
        );
        let lab = Lab::controller(BASE, &yaml, &["node-1"]).await?;
        // The image's root: Istio's mount points, relative to the working directory.
        let root = lab.path().join("image-root");
        std::fs::create_dir_all(root.join("var/run/secrets/istio"))?;
        std::fs::create_dir_all(root.join("var/run/secrets/tokens"))?;
        std::fs::copy(lab.path().join("ca/root-cert.pem"), root.join("var/run/secrets/istio/root-cert.pem"))?;
        std::fs::write(root.join("var/run/secrets/tokens/istio-token"), "token-of-node-1\n")?;
        let socket = lab.path().join("ztunnel.sock");
        let mut agent = ZdsPeer::bind(&socket)?;

        let ztunnel = Command::new(workspace_binary("ztunnel")?)
            .args(["proxy", "ztunnel"])
            .current_dir(&root)
            .env_clear()
            .envs([
                ("XDS_ADDRESS", format!("https://127.{BASE}.0.1:15012")),
                ("CA_ADDRESS", format!("https://127.{BASE}.0.1:15012")),
                ("NODE_NAME", "node-1".to_owned()),
                ("CLUSTER_ID", "Kubernetes".to_owned()),
                ("ISTIO_META_CLUSTER_ID", "Kubernetes".to_owned()),
                ("POD_NAME", "ztunnel-x7k2p".to_owned()),
                ("POD_NAMESPACE", "istio-system".to_owned()),
                ("INSTANCE_IP", "10.75.0.100".to_owned()),
                ("SERVICE_ACCOUNT", "ztunnel".to_owned()),
                ("INPOD_ENABLED", "true".to_owned()),
                ("INPOD_UDS", socket.display().to_string()),
                ("TERMINATION_GRACE_PERIOD_SECONDS", "30".to_owned()),
                ("RUST_LOG", "info".to_owned()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let _ztunnel = Killed(ztunnel);

        // It connects to the agent: an empty snapshot, and it is ready.
        let session = tokio::time::timeout(Duration::from_secs(20), agent.accept()).await??;
        assert_eq!(session.snapshot_sent().await?, Ok(()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answer = http_get("127.0.0.1:15021".parse()?, "/healthz/ready").await;
            if matches!(answer, Ok((200, _))) {
                break;
            }
            assert!(Instant::now() < deadline, "not ready on Istio's readiness port 15021 within 20s: {answer:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // It holds the controller's state (xDS over TLS with the mounted root and token)...
        let (status, dump) = http_get("127.0.0.1:15000".parse()?, "/config_dump").await?;
        assert_eq!(status, 200);
        assert!(dump.contains("Kubernetes//Pod/demo/server"), "no workloads from the controller: {dump}");
        // ...and serves Istio's metrics port.
        let (status, metrics) = http_get("127.0.0.1:15020".parse()?, "/metrics").await?;
        assert_eq!(status, 200);
        assert!(metrics.contains("# EOF"), "{metrics}");
        Ok(())
    })
    .unwrap();
}
