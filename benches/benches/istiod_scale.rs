//! istiod-lite at scale: generated YAML for 10,000 pods, 1,000 services and 500 policies.
//! Measures, against the istiod-lite process (this binary re-run in server mode):
//! time to the first full push to one client, peak RSS, the time from one pod's change on disk
//! to the client's delta, and 100 clients subscribing at once.
//!
//! `cargo bench -p benches --bench istiod_scale [-- --pods N --services N --policies N]`

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use benches::{Report, arg};
use mesh_core::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_lab::component::{self as process, Process};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const NAMESPACES: usize = 10;
const NODES: usize = 10;

fn main() -> anyhow::Result<()> {
    if let Some(result) = process::run_role_if_asked() {
        return result;
    }
    let pods: usize = arg("--pods").map(|v| v.parse()).transpose()?.unwrap_or(10_000);
    let services: usize = arg("--services").map(|v| v.parse()).transpose()?.unwrap_or(1_000);
    let policies: usize = arg("--policies").map(|v| v.parse()).transpose()?.unwrap_or(500);
    let clients: usize = arg("--clients").map(|v| v.parse()).transpose()?.unwrap_or(100);
    let mut report = Report::new("istiod_scale");
    report
        .setup("pods", pods as u64)
        .setup("services", services as u64)
        .setup("policies", policies as u64)
        .setup("namespaces", NAMESPACES as u64)
        .setup("concurrent_clients", clients as u64)
        .setup(
            "transport",
            "delta ADS over plaintext gRPC on loopback, one HTTP/2 connection per client",
        );
    report.print_setup();

    let dir = std::env::temp_dir().join(format!("istiod-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cleanup = Cleanup(dir.clone());
    let scenario = Scenario {
        pods,
        services,
        policies,
    };
    for namespace in 0..NAMESPACES {
        std::fs::write(
            dir.join(format!("ns-{namespace}.yaml")),
            scenario.namespace_yaml(namespace, None),
        )?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut server = Server::start(&dir)?;
    runtime.block_on(async {
        let endpoint = Channel::from_shared(format!("http://{}", server.xds))?
            .initial_connection_window_size(16 << 20)
            .initial_stream_window_size(4 << 20);
        let channel = endpoint.connect().await?;
        let subscribed = Instant::now();
        let mut client = Client::subscribe(channel.clone()).await?;
        let full = client.next().await?;
        let (to_push, since_subscribe) = (started.elapsed(), subscribed.elapsed());
        anyhow::ensure!(
            full.resources.len() == pods + services,
            "full push carried {} resources",
            full.resources.len()
        );
        client.ack(&full).await?;
        report
            .result("start_to_first_full_push_ms", ms(to_push), "ms")
            .result("subscribe_to_full_push_ms", ms(since_subscribe), "ms")
            .result("full_push_resources", full.resources.len() as f64, "resources")
            .result(
                "full_push_bytes",
                full.resources
                    .iter()
                    .map(|r| r.resource.as_ref().map_or(0, |a| a.value.len()))
                    .sum::<usize>() as f64,
                "bytes",
            )
            .result("peak_rss_after_first_push_mib", server.peak_rss_mib()?, "MiB");

        // One pod changes on disk: time until the client holds the delta.
        let changed_at = Instant::now();
        std::fs::write(dir.join("ns-0.yaml"), scenario.namespace_yaml(0, Some(0)))?;
        let delta = client.next().await?;
        let delta_time = changed_at.elapsed();
        anyhow::ensure!(
            delta.resources.len() == 1,
            "delta carried {} resources",
            delta.resources.len()
        );
        report.result("one_pod_change_to_delta_ms", ms(delta_time), "ms");

        // Many clients at once.
        let connected = Instant::now();
        let mut waiting = Vec::new();
        for _ in 0..clients {
            // Each client on its own connection, as each ztunnel has.
            let endpoint = endpoint.clone();
            waiting.push(tokio::spawn(async move {
                let mut client = Client::subscribe(endpoint.connect().await?).await?;
                let full = client.next().await?;
                anyhow::Ok((full.resources.len(), client))
            }));
        }
        let mut held = Vec::new();
        for client in waiting {
            let (received, client) = client.await??;
            anyhow::ensure!(received == pods + services, "a client got {received} resources");
            held.push(client);
        }
        report
            .result("clients_all_full_state_ms", ms(connected.elapsed()), "ms")
            .result("peak_rss_with_clients_mib", server.peak_rss_mib()?, "MiB")
            .result("rss_with_clients_mib", server.rss_mib()?, "MiB");
        drop(held);
        anyhow::Ok(())
    })?;
    server.stop();
    report.write()?;
    drop(cleanup);
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Server {
    process: Process,
    xds: SocketAddr,
}

impl Server {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let flags: Vec<String> = [
            "--config-dir".to_owned(),
            dir.display().to_string(),
            "--ca-dir".to_owned(),
            dir.join("ca").display().to_string(),
        ]
        .into_iter()
        .chain(
            [
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
                "--log-level",
                "info",
                "--log-format",
                "json",
            ]
            .map(str::to_owned),
        )
        .collect();
        let mut process = Process::spawn("istiod-lite", &flags, true)?;
        let child = &mut process.child;
        // A reader thread keeps draining the child's output; the addresses come back over a channel.
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let (found, listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["message"] == "listening" {
                    let _ = found.send((
                        event["server"].as_str().unwrap_or_default().to_owned(),
                        event["address"].as_str().unwrap_or_default().to_owned(),
                    ));
                }
            }
        });
        let mut servers = HashMap::new();
        while !servers.contains_key("xds-plaintext") {
            let (server, address) = listening
                .recv_timeout(Duration::from_secs(60))
                .map_err(|_| anyhow::anyhow!("istiod-lite did not listen within 60s"))?;
            servers.insert(server, address);
        }
        Ok(Self {
            xds: servers["xds-plaintext"].parse()?,
            process,
        })
    }

    fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        Ok(self.process.peak_rss_kib()? / 1024.0)
    }

    fn rss_mib(&self) -> anyhow::Result<f64> {
        Ok(self.process.rss_kib()? / 1024.0)
    }

    fn stop(&mut self) {
        self.process.stop();
    }
}

struct Client {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    async fn subscribe(channel: Channel) -> anyhow::Result<Self> {
        let (requests, queue) = mpsc::channel(4);
        requests
            .send(DeltaDiscoveryRequest {
                type_url: ADDRESS_TYPE_URL.into(),
                ..Default::default()
            })
            .await?;
        requests
            .send(DeltaDiscoveryRequest {
                type_url: AUTHORIZATION_TYPE_URL.into(),
                ..Default::default()
            })
            .await?;
        let responses = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .delta_aggregated_resources(ReceiverStream::new(queue))
            .await?
            .into_inner();
        Ok(Self { requests, responses })
    }

    /// The next Address response (Authorization responses are acknowledged and skipped).
    async fn next(&mut self) -> anyhow::Result<DeltaDiscoveryResponse> {
        loop {
            let response = tokio::time::timeout(Duration::from_secs(60), self.responses.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("stream closed"))??;
            if response.type_url == ADDRESS_TYPE_URL {
                return Ok(response);
            }
            self.ack(&response).await?;
        }
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) -> anyhow::Result<()> {
        let ack = DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        };
        Ok(self.requests.send(ack).await?)
    }
}

/// The generated mesh: pods, services and policies spread evenly over the namespaces.
struct Scenario {
    pods: usize,
    services: usize,
    policies: usize,
}

impl Scenario {
    /// One namespace's YAML; `changed` marks that pod index with a new label.
    fn namespace_yaml(&self, namespace: usize, changed: Option<usize>) -> String {
        let ns = format!("bench-{namespace}");
        let mut yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
        );
        let services = self.services / NAMESPACES;
        for s in 0..services {
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: {ns}}}\nspec:\n  selector: {{app: svc-{s}}}\n  clusterIP: 10.{}.{}.{}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n",
                96 + namespace,
                s / 250,
                s % 250 + 1
            );
        }
        let pods = self.pods / NAMESPACES;
        for p in 0..pods {
            let version = if changed == Some(p) { "v2" } else { "v1" };
            let global = namespace * pods + p;
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{p}\n  namespace: {ns}\n  labels: {{app: svc-{}, version: {version}}}\nspec:\n  serviceAccountName: sa-{}\n  nodeName: node-{}\n  containers: [{{name: app, image: app, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus:\n  podIP: 10.{}.{}.{}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
                p % services.max(1),
                p % services.max(1),
                global % NODES,
                global / 62500 + 1,
                global / 250 % 250,
                global % 250 + 1
            );
        }
        for i in 0..self.policies / NAMESPACES {
            let selector = if i % 2 == 0 {
                format!("  selector: {{matchLabels: {{app: svc-{}}}}}\n", i % services.max(1))
            } else {
                String::new()
            };
            let _ = write!(
                yaml,
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: policy-{i}, namespace: {ns}}}\nspec:\n{selector}  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/{ns}/sa/sa-{i}\"], namespaces: [{ns}]}}}}]\n    to: [{{operation: {{ports: [\"8080\"]}}}}]\n"
            );
        }
        yaml
    }
}
