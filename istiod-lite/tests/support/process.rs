//! The istiod-lite binary as a test runs it: a child process on loopback ports, its listening
//! addresses read from its JSON log, killed when the test ends (also when it fails), with delta
//! xDS and CA clients as ztunnel would use them.

// Each test binary uses a part of this.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::identity::{CertificateRequest, SpiffeId, WorkloadCertificate};
use mesh_core::proto::ca::IstioCertificateRequest;
use mesh_core::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_core::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_core::proto::envoy::config::core::v3::Node;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

pub const BIN: &str = env!("CARGO_BIN_EXE_istiod-lite");

/// Loopback ports picked by the OS for every server istiod-lite opens.
pub const LOOPBACK_PORTS: [&str; 10] = [
    "--xds-plaintext-addr",
    "127.0.0.1:0",
    "--xds-addr",
    "127.0.0.1:0",
    "--admin-addr",
    "127.0.0.1:0",
    "--metrics-addr",
    "127.0.0.1:0",
    "--readiness-addr",
    "127.0.0.1:0",
];

/// A scratch directory removed at the end, also when the test fails.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("istiod-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        for dir in ["config", "ca", "tokens"] {
            std::fs::create_dir_all(path.join(dir)).unwrap();
        }
        Self(path)
    }

    pub fn path(&self, sub: &str) -> PathBuf {
        self.0.join(sub)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The process, killed if the test ends before it exits; its log lines are kept for assertions.
pub struct Istiod {
    pub child: Child,
    pub servers: HashMap<String, SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Istiod {
    /// Starts the binary with `args` (plus [`LOOPBACK_PORTS`]) and waits until it listens.
    pub fn spawn(args: &[String]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .args(LOOPBACK_PORTS)
            .env("LOG_FORMAT", "json")
            .env_remove("KUBECONFIG")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut servers = HashMap::new();
        while servers.len() < 5 {
            let line = lines.next().expect("istiod-lite exited before listening").unwrap();
            log.lock().unwrap().push(line.clone());
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            if event["message"] == "listening" {
                servers.insert(
                    event["server"].as_str().unwrap().to_owned(),
                    event["address"].as_str().unwrap().parse().unwrap(),
                );
            }
        }
        // Keep reading its output so it never blocks on a full pipe.
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Self { child, servers, log }
    }

    pub fn is_ready(&self) -> bool {
        http_get(self.servers["readiness"], "/healthz/ready").0 == 200
    }

    pub fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.is_ready() {
            assert!(Instant::now() < deadline, "not ready within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a log line contains every one of `parts`; returns it.
    pub fn wait_for_log(&self, parts: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?} within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_lines_with(&self, part: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(part)).count()
    }

    /// The xDS+CA TLS port, verified against `root_pem`.
    pub async fn tls_channel(&self, root_pem: &str) -> Channel {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root_pem))
            .domain_name("istiod.istio-system.svc");
        Channel::from_shared(format!("https://{}", self.servers["xds-tls"]))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

pub fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    (
        response[9..12].parse().unwrap(),
        response.split_once("\r\n\r\n").unwrap().1.to_owned(),
    )
}

/// A delta xDS subscription to one type, as ztunnel makes it.
pub struct Subscription {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Subscription {
    pub async fn open(channel: Channel, type_url: &str, token: Option<&str>) -> Result<Self, tonic::Status> {
        let (requests, queue) = mpsc::channel(4);
        requests
            .send(DeltaDiscoveryRequest {
                node: Some(Node {
                    id: "ztunnel~127.0.0.1~test".into(),
                    ..Default::default()
                }),
                type_url: type_url.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut request = tonic::Request::new(ReceiverStream::new(queue));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let responses = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        Ok(Self { requests, responses })
    }

    /// The next response, acknowledged.
    pub async fn next(&mut self) -> DeltaDiscoveryResponse {
        let response = tokio::time::timeout(Duration::from_secs(10), self.responses.next())
            .await
            .expect("a response within 10s")
            .expect("the stream is open")
            .expect("a response, not an error");
        self.requests
            .send(DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        response
    }

    /// Whether a response arrives within `within`.
    pub async fn quiet_for(&mut self, within: Duration) -> Option<DeltaDiscoveryResponse> {
        match tokio::time::timeout(within, self.responses.next()).await {
            Ok(Some(Ok(response))) => Some(response),
            _ => None,
        }
    }
}

/// Resource names of a response, sorted.
pub fn names(response: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut names: Vec<String> = response.resources.iter().map(|r| r.name.clone()).collect();
    names.sort();
    names
}

/// Asks the CA for `identity` (through `ImpersonatedIdentity` when `impersonate`) with `token`.
pub async fn request_certificate(
    channel: Channel,
    token: &str,
    identity: &SpiffeId,
    impersonate: bool,
    root_pem: &str,
) -> Result<WorkloadCertificate, tonic::Status> {
    let csr = CertificateRequest::new(identity).unwrap();
    let metadata = impersonate.then(|| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
            },
        )]
        .into(),
    });
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr.csr_pem.clone(),
        validity_duration: 3600,
        metadata,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let chain = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await?
        .into_inner()
        .cert_chain;
    let roots = mesh_core::identity::certificate::parse_certificates("root", root_pem).unwrap();
    let roots = Arc::new(mesh_core::identity::certificate::root_store(&roots).unwrap());
    Ok(csr.into_certificate(&chain, roots).unwrap())
}

/// Writes `yaml` to `dir/name` through a rename, as config management tools do.
pub fn write_atomically(dir: &Path, name: &str, yaml: &str) {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, yaml).unwrap();
    std::fs::rename(temporary, dir.join(name)).unwrap();
}
