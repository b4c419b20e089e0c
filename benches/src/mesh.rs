//! The mesh as processes for end-to-end benchmarks: istiod-lite and a ztunnel per node (and
//! waypoints), each a process of its own (this binary re-run in a role), so their CPU time and
//! memory are measured apart from the load; pods are loopback addresses captured by nftables
//! rules. Call from a process already inside its own network namespace.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_lab::component::Process;
use mesh_tests::lab::{CAPTURE_MARK, capture_pods, http_get};

/// istiod-lite and two ztunnels (`node-1`, `node-2`); the directory goes with it.
#[derive(Debug)]
pub struct Mesh {
    pub ztunnels: [Process; 2],
    pub waypoints: Vec<Process>,
    _istiod: Process,
    base: u8,
    dir: PathBuf,
}

impl Mesh {
    /// Runs `manifests` on addresses 127.<base>.x.y (controller .0.1, node n at .n.100) and
    /// captures the traffic of `pods`.
    pub fn start(base: u8, manifests: &str, pods: &[&str]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("bench-mesh-{base}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["config", "ca", "tokens"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(dir.join("config/lab.yaml"), manifests)?;
        for node in ["node-1", "node-2"] {
            std::fs::write(dir.join("tokens").join(node), format!("token-of-{node}\n"))?;
        }
        let host = |node: u8| format!("127.{base}.{node}.100");
        let path = |p: &str| dir.join(p).display().to_string();
        let istiod = Process::spawn(
            "istiod-lite",
            &[
                format!("--config-dir={}", path("config")),
                format!("--ca-dir={}", path("ca")),
                format!("--node-tokens-dir={}", path("tokens")),
                format!("--xds-plaintext-addr=127.{base}.0.1:15010"),
                format!("--xds-addr=127.{base}.0.1:15012"),
                format!("--admin-addr=127.{base}.0.1:15000"),
                format!("--metrics-addr=127.{base}.0.1:15014"),
                format!("--readiness-addr=127.{base}.0.1:15021"),
                "--log-level=warn".into(),
            ],
            false,
        )?;
        ready(&format!("127.{base}.0.1:15021"))?;
        let ztunnel = |node: u8| -> anyhow::Result<Process> {
            let name = format!("node-{node}");
            Process::spawn(
                "ztunnel",
                &[
                    format!("--node-name={name}"),
                    format!("--xds-address=http://127.{base}.0.1:15010"),
                    format!("--root-cert={}", path("ca/root-cert.pem")),
                    format!("--token-file={}", path(&format!("tokens/{name}"))),
                    format!("--socket-mark={CAPTURE_MARK}"),
                    "--redirect=shared".into(),
                    format!("--admin-addr={}:15000", host(node)),
                    format!("--metrics-addr={}:15020", host(node)),
                    format!("--readiness-addr={}:15021", host(node)),
                ],
                false,
            )
        };
        let mesh = Self {
            ztunnels: [ztunnel(1)?, ztunnel(2)?],
            waypoints: Vec::new(),
            _istiod: istiod,
            base,
            dir: dir.clone(),
        };
        ready(&format!("{}:15021", host(1)))?;
        ready(&format!("{}:15021", host(2)))?;
        capture_pods(pods)?;
        Ok(mesh)
    }

    /// Starts the waypoint of Gateway `namespace/gateway` at `ip` on node 1 and waits for it.
    pub fn start_waypoint(&mut self, namespace: &str, gateway: &str, ip: &str) -> anyhow::Result<()> {
        let base = self.base;
        let path = |p: &str| self.dir.join(p).display().to_string();
        let waypoint = Process::spawn(
            "waypoint",
            &[
                "--node-name=node-1".into(),
                format!("--namespace={namespace}"),
                format!("--gateway={gateway}"),
                format!("--service-account={gateway}"),
                format!("--xds-address=http://127.{base}.0.1:15010"),
                format!("--root-cert={}", path("ca/root-cert.pem")),
                format!("--token-file={}", path("tokens/node-1")),
                format!("--hbone-addr={ip}:15008"),
                format!("--admin-addr={ip}:15000"),
                format!("--metrics-addr={ip}:15020"),
                format!("--readiness-addr={ip}:15021"),
                "--log-level=warn".into(),
            ],
            false,
        )?;
        self.waypoints.push(waypoint);
        ready(&format!("{ip}:15021"))
    }

    pub fn cpu_seconds(&self) -> anyhow::Result<[f64; 2]> {
        Ok([self.ztunnels[0].cpu_seconds()?, self.ztunnels[1].cpu_seconds()?])
    }

    pub fn rss_kib(&self) -> anyhow::Result<[f64; 2]> {
        Ok([self.ztunnels[0].rss_kib()?, self.ztunnels[1].rss_kib()?])
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for process in self.ztunnels.iter_mut().chain(&mut self.waypoints) {
            process.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits for a readiness endpoint to answer 200.
pub fn ready(address: &str) -> anyhow::Result<()> {
    let address: SocketAddr = address.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    runtime.block_on(async {
        loop {
            if let Ok((200, _)) = http_get(address, "/healthz/ready").await {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{address} not ready within 60s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}
