//! istiod-lite as a process on a directory of YAML: it prints where it listens, becomes ready,
//! streams the full state over delta xDS, then only what a file change changed (a removed pod as a
//! removed resource), signs certificates over TLS for a node's pods, and drains on SIGTERM.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_core::identity::{CertificateRequest, SpiffeId, WorkloadCertificate};
use mesh_core::proto::ADDRESS_TYPE_URL;
use mesh_core::proto::ca::IstioCertificateRequest;
use mesh_core::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_core::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_core::proto::envoy::config::core::v3::Node;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const BIN: &str = env!("CARGO_BIN_EXE_istiod-lite");

/// A scratch directory removed at the end, also when the test fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("istiod-bin-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        for dir in ["config", "ca", "tokens"] {
            std::fs::create_dir_all(path.join(dir)).unwrap();
        }
        Self(path)
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.0.join(sub)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The process, killed if the test fails before it exits.
struct Istiod {
    child: Child,
    servers: HashMap<String, SocketAddr>,
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Istiod {
    fn start(scratch: &Scratch) -> Self {
        let mut child = Command::new(BIN)
            .arg("--config-dir")
            .arg(scratch.path("config"))
            .arg("--ca-dir")
            .arg(scratch.path("ca"))
            .arg("--node-tokens-dir")
            .arg(scratch.path("tokens"))
            .args(["--xds-plaintext-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0"])
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--readiness-addr",
                "127.0.0.1:0",
            ])
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut servers = HashMap::new();
        while servers.len() < 5 {
            let line = lines.next().expect("istiod-lite exited before listening").unwrap();
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            if event["message"] == "listening" {
                servers.insert(
                    event["server"].as_str().unwrap().to_owned(),
                    event["address"].as_str().unwrap().parse().unwrap(),
                );
            }
        }
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let istiod = Self { child, servers };
        istiod.wait_ready();
        istiod
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_get(self.servers["readiness"], "/healthz/ready").0 != 200 {
            assert!(Instant::now() < deadline, "not ready within 10s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    (
        response[9..12].parse().unwrap(),
        response.split_once("\r\n\r\n").unwrap().1.to_owned(),
    )
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
    // Write then rename, as config management tools do, so the watcher never sees half a file.
    let temporary = dir.join(".demo.yaml.tmp");
    std::fs::write(&temporary, yaml).unwrap();
    std::fs::rename(temporary, dir.join("demo.yaml")).unwrap();
}

async fn next(responses: &mut tonic::Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(10), responses.next())
        .await
        .expect("a response")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn serves_the_directory_over_delta_xds_and_signs_over_tls() {
    let scratch = Scratch::new("xds");
    write_config(
        &scratch.path("config"),
        &[pod("a", "10.0.1.1", "v1"), pod("b", "10.0.1.2", "v1")],
    );
    std::fs::write(scratch.path("tokens").join("node-1"), "secret-node-1\n").unwrap();
    let istiod = Istiod::start(&scratch);

    let channel = Channel::from_shared(format!("http://{}", istiod.servers["xds-plaintext"]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (requests, queue) = mpsc::channel(4);
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(queue))
        .await
        .unwrap()
        .into_inner();
    let subscribe = DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~127.0.0.1~test".into(),
            ..Default::default()
        }),
        type_url: ADDRESS_TYPE_URL.into(),
        ..Default::default()
    };
    requests.send(subscribe).await.unwrap();
    let full = next(&mut responses).await;
    let mut names: Vec<&str> = full.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "Kubernetes//Pod/demo/a",
            "Kubernetes//Pod/demo/b",
            "demo/server.demo.svc.cluster.local"
        ]
    );
    let ack = |r: &DeltaDiscoveryResponse| DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    };
    requests.send(ack(&full)).await.unwrap();

    // b changes: only b comes back.
    let written = Instant::now();
    write_config(
        &scratch.path("config"),
        &[pod("a", "10.0.1.1", "v1"), pod("b", "10.0.1.2", "v2")],
    );
    let delta = next(&mut responses).await;
    println!("file change to delta: {:?}", written.elapsed());
    let names: Vec<&str> = delta.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["Kubernetes//Pod/demo/b"]);
    assert!(delta.removed_resources.is_empty());
    requests.send(ack(&delta)).await.unwrap();

    // a goes away: it arrives as a removed resource.
    write_config(&scratch.path("config"), &[pod("b", "10.0.1.2", "v2")]);
    let removal = next(&mut responses).await;
    assert!(removal.resources.is_empty(), "{:?}", removal.resources);
    assert_eq!(removal.removed_resources, ["Kubernetes//Pod/demo/a"]);

    // The CA over TLS, verified against the root it wrote to --ca-dir.
    let root = std::fs::read_to_string(scratch.path("ca").join("root-cert.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&root))
        .domain_name("istiod.istio-system.svc");
    let channel = Channel::from_shared(format!("https://{}", istiod.servers["xds-tls"]))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let identity = SpiffeId::new("cluster.local", "demo", "server").unwrap();
    let csr = CertificateRequest::new(&identity).unwrap();
    let metadata = prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
            },
        )]
        .into(),
    };
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr.csr_pem.clone(),
        validity_duration: 3600,
        metadata: Some(metadata),
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer secret-node-1".parse().unwrap());
    let chain = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    let roots = mesh_core::identity::certificate::parse_certificates("root", &root).unwrap();
    let roots = std::sync::Arc::new(mesh_core::identity::certificate::root_store(&roots).unwrap());
    let cert: WorkloadCertificate = csr.into_certificate(&chain, roots).unwrap();
    assert_eq!(cert.identity(), &identity);

    let (status, metrics) = http_get(istiod.servers["metrics"], "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("istiod_xds_pushes_total{type=\"Address\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("istiod_xds_connected_clients 1"), "{metrics}");
}

#[tokio::test]
async fn exits_cleanly_on_sigterm_and_refuses_bad_flags() {
    let scratch = Scratch::new("sigterm");
    write_config(&scratch.path("config"), &[]);
    let mut istiod = Istiod::start(&scratch);
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
