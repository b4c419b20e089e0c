//! A mesh in one process on loopback addresses: istiod-lite reading a directory of YAML, and a
//! ztunnel per node, each serving the HBONE addresses of its pods and a SOCKS5 outbound listener.
//! Node `n` uses 127.<base>.<n>.100 for its own endpoints; pods use 127.<base>.<n>.<1..99>.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mesh_core::lifecycle::Signals;
use mesh_core::telemetry::{LogArgs, LogFormat, LogHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The running lab; everything stops when it is dropped.
#[derive(Debug)]
pub struct Lab {
    pub base: u8,
    pub dir: PathBuf,
    /// istiod-lite runs on a runtime of its own, so stopping it drops every connection at once,
    /// as a crash would.
    istiod: Option<tokio::runtime::Runtime>,
    istiod_config: Option<Arc<istiod_lite::Config>>,
    /// Each ztunnel too, so one can crash and restart.
    ztunnels: Vec<(Arc<ztunnel::Config>, Option<Running>)>,
    waypoints: Vec<tokio::runtime::Runtime>,
}

/// Logs of the in-process components: none, unless `MESH_TESTS_LOG` holds a filter (e.g.
/// `info` or `ztunnel=debug`), for a scenario being debugged.
/// istiod-lite's endpoints in the in-process lab.
const ISTIOD_ADMIN_PORT: u16 = 16000;
const ISTIOD_METRICS_PORT: u16 = 16014;
const ISTIOD_READINESS_PORT: u16 = 16021;

fn quiet_log() -> LogHandle {
    if let Ok(filter) = std::env::var("MESH_TESTS_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let args = LogArgs {
        log_format: LogFormat::Text,
        log_level: "warn".into(),
    };
    mesh_core::telemetry::subscriber(&args, std::io::sink).1
}

impl Lab {
    /// Starts istiod-lite on `yaml` (written to `config/lab.yaml`) and a ztunnel per node name.
    pub async fn start(base: u8, yaml: &str, nodes: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(base, yaml, nodes, &[]).await
    }

    /// As [`Lab::start`], with ztunnel marking its own sockets with [`CAPTURE_MARK`] so that
    /// [`Lab::capture`] rules skip them. Needs root (run it in [`crate::netns::isolated`]).
    pub async fn start_for_capture(base: u8, yaml: &str, nodes: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(base, yaml, nodes, &[format!("--socket-mark={CAPTURE_MARK}")]).await
    }

    /// As [`Lab::start`], with extra ztunnel flags.
    pub async fn start_with(base: u8, yaml: &str, nodes: &[&str], ztunnel_args: &[String]) -> anyhow::Result<Self> {
        let mut lab = Self::controller(base, yaml, nodes).await?;
        for node in nodes {
            lab.add_ztunnel(node, ztunnel_args)?;
        }
        for index in 1..=nodes.len() {
            lab.wait_ready(format!("{}:15021", lab.node_host(index)).parse()?)
                .await?;
        }
        Ok(lab)
    }

    /// istiod-lite alone (TLS on 127.<base>.0.1:15012), with a node token `token-of-<node>` for
    /// each of `nodes`, for scenarios that run their own ztunnels.
    pub async fn controller(base: u8, yaml: &str, nodes: &[&str]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("mesh-lab-{base}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["config", "ca", "tokens"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(dir.join("config/lab.yaml"), yaml)?;
        for node in nodes {
            std::fs::write(dir.join("tokens").join(node), format!("token-of-{node}\n"))?;
        }
        let mut lab = Self {
            base,
            dir,
            istiod: None,
            istiod_config: None,
            ztunnels: Vec::new(),
            waypoints: Vec::new(),
        };
        let istiod = lab.istiod_address();
        let config = istiod_lite::Config::try_parse_from([
            "istiod-lite".to_owned(),
            format!("--config-dir={}", lab.dir.join("config").display()),
            format!("--ca-dir={}", lab.dir.join("ca").display()),
            format!("--node-tokens-dir={}", lab.dir.join("tokens").display()),
            format!("--xds-plaintext-addr={istiod}"),
            format!("--xds-addr=127.{base}.0.1:15012"),
            format!("--dns-names=istiod.istio-system.svc,127.{base}.0.1"),
            // Not the usual ports: a scenario may run a ztunnel on its default (wildcard) ones.
            format!("--admin-addr=127.{base}.0.1:{ISTIOD_ADMIN_PORT}"),
            format!("--metrics-addr=127.{base}.0.1:{ISTIOD_METRICS_PORT}"),
            format!("--readiness-addr=127.{base}.0.1:{ISTIOD_READINESS_PORT}"),
        ])?;
        lab.istiod_config = Some(Arc::new(config));
        lab.start_istiod().await?;
        Ok(lab)
    }

    /// Starts (or restarts) istiod-lite and waits until it is ready. The CA directory keeps the
    /// root, so a restarted controller signs for the same mesh.
    pub async fn start_istiod(&mut self) -> anyhow::Result<()> {
        let config = self.istiod_config.clone().expect("set by start");
        let readiness: SocketAddr = format!("127.{}.0.1:{ISTIOD_READINESS_PORT}", self.base).parse()?;
        let (runtime, _) = on_own_runtime(1, "istiod-lite", move || {
            let config = config.clone();
            async move { istiod_lite::run(config, Signals::install()?, quiet_log()).await }
        })?;
        self.istiod = Some(runtime);
        self.wait_ready(readiness).await
    }

    /// Starts (or restarts) the ztunnel of node `index` (1-based) without waiting for it.
    pub fn start_ztunnel(&mut self, index: usize) -> anyhow::Result<()> {
        let (config, running) = &mut self.ztunnels[index - 1];
        let config = config.clone();
        *running = Some(on_own_runtime(2, "ztunnel", move || {
            let config = config.clone();
            async move { ztunnel::run(config, Signals::install()?, quiet_log()).await }
        })?);
        Ok(())
    }

    /// Adds a ztunnel for `node` (a second one for a node shows an upgrade) with its own
    /// endpoints, starts it without waiting, and returns its index.
    pub fn add_ztunnel(&mut self, node: &str, ztunnel_args: &[String]) -> anyhow::Result<usize> {
        let index = self.ztunnels.len() + 1;
        let host = self.node_host(index);
        let istiod = self.istiod_address();
        let own = |flag: &str| ztunnel_args.iter().any(|a| a.starts_with(flag));
        // Pods are loopback addresses in ztunnel's own namespace unless the scenario says otherwise.
        let redirect = (!own("--redirect")).then(|| "--redirect=shared".to_owned());
        let drain = (!own("--drain-deadline")).then(|| "--drain-deadline=1s".to_owned());
        let config = ztunnel::Config::try_parse_from(
            [
                "ztunnel".to_owned(),
                format!("--node-name={node}"),
                format!("--xds-address=http://{istiod}"),
                format!("--root-cert={}", self.dir.join("ca/root-cert.pem").display()),
                format!("--token-file={}", self.dir.join("tokens").join(node).display()),
                format!("--socks5-addr={host}:1080"),
                format!("--admin-addr={host}:15000"),
                format!("--metrics-addr={host}:15020"),
                format!("--readiness-addr={host}:15021"),
            ]
            .into_iter()
            .chain(redirect)
            .chain(drain)
            .chain(ztunnel_args.iter().cloned()),
        )?;
        self.ztunnels.push((Arc::new(config), None));
        self.start_ztunnel(index)?;
        Ok(index)
    }

    /// Whether the ztunnel at `index` has exited by itself (after a stop request).
    pub fn ztunnel_exited(&self, index: usize) -> bool {
        self.ztunnels[index - 1]
            .1
            .as_ref()
            .is_some_and(|(_, exited)| exited.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Stops the ztunnel of node `index` at once, as a crash would: no cleanup runs. Returns
    /// once its sockets are closed (a runtime's tasks are dropped on its own threads).
    pub fn crash_ztunnel(&mut self, index: usize) {
        if let Some((runtime, _)) = self.ztunnels[index - 1].1.take() {
            let stopping = std::thread::spawn(move || runtime.shutdown_timeout(Duration::from_secs(5)));
            let _ = stopping.join();
        }
    }

    /// Waits until the ztunnel of node `index` is ready.
    pub async fn wait_ztunnel(&self, index: usize) -> anyhow::Result<()> {
        self.wait_ready(format!("{}:15021", self.node_host(index)).parse()?)
            .await
    }

    /// Starts a waypoint for Gateway `namespace/gateway` on node `index` (1-based), serving HBONE
    /// on `ip` (its pod's address), and waits until it is ready.
    pub async fn start_waypoint(
        &mut self,
        index: usize,
        namespace: &str,
        gateway: &str,
        ip: &str,
    ) -> anyhow::Result<()> {
        let node = format!("node-{index}");
        let config = waypoint::Config::try_parse_from([
            "waypoint".to_owned(),
            format!("--node-name={node}"),
            format!("--namespace={namespace}"),
            format!("--gateway={gateway}"),
            format!("--service-account={gateway}"),
            format!("--xds-address=http://{}", self.istiod_address()),
            format!("--root-cert={}", self.dir.join("ca/root-cert.pem").display()),
            format!("--token-file={}", self.dir.join("tokens").join(&node).display()),
            format!("--hbone-addr={ip}:15008"),
            format!("--admin-addr={ip}:15000"),
            format!("--metrics-addr={ip}:15020"),
            format!("--readiness-addr={ip}:15021"),
            "--drain-deadline=1s".to_owned(),
        ])?;
        let config = Arc::new(config);
        self.waypoints.push(
            on_own_runtime(1, "waypoint", move || {
                let config = config.clone();
                async move { waypoint::run(config, Signals::install()?, quiet_log()).await }
            })?
            .0,
        );
        self.wait_ready(format!("{ip}:15021").parse()?).await
    }

    /// Stops istiod-lite at once: its connections drop, ztunnels keep their last state.
    pub fn stop_istiod(&mut self) {
        if let Some(runtime) = self.istiod.take() {
            runtime.shutdown_background();
        }
    }

    pub fn istiod_address(&self) -> String {
        format!("127.{}.0.1:15010", self.base)
    }

    /// The address node `index` (1-based) uses for its own listeners.
    pub fn node_host(&self, index: usize) -> String {
        format!("127.{}.{index}.100", self.base)
    }

    /// Replaces one file of the configuration (atomically, as tools do).
    pub fn write_config(&self, name: &str, yaml: &str) -> anyhow::Result<()> {
        let temporary = self.dir.join("config").join(format!(".{name}.tmp"));
        std::fs::write(&temporary, yaml)?;
        std::fs::rename(temporary, self.dir.join("config").join(name))?;
        Ok(())
    }

    async fn wait_ready(&self, readiness: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = http_get(readiness, "/healthz/ready").await {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{readiness} not ready within 20s");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Opens a connection from the pod at `pod_ip` to `destination`, through node `node`'s SOCKS5.
    pub async fn connect(&self, node: usize, pod_ip: &str, destination: SocketAddr) -> anyhow::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(format!("{pod_ip}:0").parse()?)?;
        let mut stream = socket
            .connect(format!("{}:1080", self.node_host(node)).parse()?)
            .await?;
        stream.write_all(&[5, 1, 0]).await?;
        let mut reply = [0u8; 2];
        stream.read_exact(&mut reply).await?;
        anyhow::ensure!(reply == [5, 0], "SOCKS5 greeting refused: {reply:?}");
        let SocketAddr::V4(destination) = destination else {
            anyhow::bail!("IPv4 only")
        };
        let mut request = vec![5, 1, 0, 1];
        request.extend(destination.ip().octets());
        request.extend(destination.port().to_be_bytes());
        stream.write_all(&request).await?;
        let mut reply = [0u8; 10];
        stream.read_exact(&mut reply).await?;
        anyhow::ensure!(reply[1] == 0, "SOCKS5 CONNECT refused with code {}", reply[1]);
        Ok(stream)
    }

    /// Captures the TCP traffic of `pods`: see [`capture_pods`].
    pub fn capture(&self, pods: &[&str]) -> anyhow::Result<()> {
        capture_pods(pods)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for index in 1..=self.ztunnels.len() {
            self.crash_ztunnel(index);
        }
        for runtime in self.waypoints.drain(..) {
            runtime.shutdown_background();
        }
        self.stop_istiod();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A ready pod manifest whose app label and service account are both `app`, serving 8080 as `http`.
pub fn pod_yaml(name: &str, namespace: &str, node: &str, ip: &str, app: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}\nspec:\n  serviceAccountName: {app}\n  nodeName: {node}\n  containers: [{{name: app, image: app, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus:\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n"
    )
}

/// The demo of the L4 scenarios: namespace `demo` (ambient) with a client on node-1 at
/// 127.<base>.1.1, two servers on node-2 at 127.<base>.2.{1,2}, and Service `server` at
/// 127.<base>.99.1:80 → `http` (8080).
pub fn demo_manifests(base: u8) -> String {
    let mut yaml =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n"
            .to_owned();
    yaml += &pod_yaml("client", "demo", "node-1", &format!("127.{base}.1.1"), "client");
    yaml += &pod_yaml("server-1", "demo", "node-2", &format!("127.{base}.2.1"), "server");
    yaml += &pod_yaml("server-2", "demo", "node-2", &format!("127.{base}.2.2"), "server");
    yaml += &format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: demo}}\nspec:\n  selector: {{app: server}}\n  clusterIP: 127.{base}.99.1\n  ports: [{{port: 80, targetPort: http}}]\n"
    );
    yaml
}

/// Captures the TCP traffic of `pods` (ambient pods on loopback) as the in-pod rules would:
/// their outbound connections go to their ztunnel's 15001 and connections to them (except
/// HBONE) to its 15006, both on the pod's own address. ztunnel's marked sockets pass.
pub fn capture_pods(pods: &[&str]) -> anyhow::Result<()> {
    let mut rules = format!(
        "table ip mesh_lab_capture {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    meta mark {CAPTURE_MARK} return\n"
    );
    let skip = "tcp dport != { 15001, 15006, 15008 }";
    for pod in pods {
        rules += &format!("    ip saddr {pod} {skip} dnat to {pod}:15001\n");
    }
    for pod in pods {
        rules += &format!("    ip daddr {pod} {skip} dnat to {pod}:15006\n");
    }
    rules += "  }\n}\n";
    crate::netns::run("nft", &["-f", "-"], Some(&rules))?;
    Ok(())
}

/// Connects from inside `pod` to `destination`, as an app in that pod would.
pub async fn connect_in(pod: &mesh_lab::topology::Namespace, destination: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = pod.run(move || {
        let stream = std::net::TcpStream::connect_timeout(&destination, Duration::from_secs(5))?;
        stream.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(stream)
    })??;
    Ok(TcpStream::from_std(stream)?)
}

/// A listener inside `pod` on `address`, for an app of that pod.
pub fn listen_in(pod: &mesh_lab::topology::Namespace, address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = pod.run(move || {
        let listener = std::net::TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(listener)
    })??;
    Ok(tokio::net::TcpListener::from_std(listener)?)
}

/// The mark ztunnel puts on its own sockets in captured labs (Istio's).
pub const CAPTURE_MARK: u32 = 1337;

/// Connects from `pod_ip` straight to `destination`, as an app in that pod would.
pub async fn connect_from(pod_ip: &str, destination: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{pod_ip}:0").parse()?)?;
    Ok(socket.connect(destination).await?)
}

/// Sends `data`, half-closes, returns everything received until the far side closed (empty
/// when the connection was refused).
pub async fn exchange(mut stream: TcpStream, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(data).await?;
        write.shutdown().await
    };
    let mut received = Vec::new();
    // A refused connection may fail the writes; what was received tells.
    let (_, got) = tokio::join!(send, read.read_to_end(&mut received));
    match got {
        Ok(_) => Ok(received),
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => Ok(received),
        Err(error) => Err(error.into()),
    }
}

/// Runs a component on a runtime of its own (so it can be stopped at once, as a crash would),
/// retrying for 10 s while it fails to start: a stopped predecessor's ports take a moment to free.
/// A component on a runtime of its own, and whether it has returned (a clean exit).
type Running = (tokio::runtime::Runtime, Arc<std::sync::atomic::AtomicBool>);

fn on_own_runtime<F, Fut>(threads: usize, what: &'static str, start: F) -> anyhow::Result<Running>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = exited.clone();
    runtime.spawn(async move {
        loop {
            match start().await {
                Ok(()) => return done.store(true, std::sync::atomic::Ordering::SeqCst),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(error) => panic!("{what}: {error:#}"),
            }
        }
    });
    Ok((runtime, exited))
}

/// A GET with `connection: close`: status and body.
pub async fn http_get(address: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(address).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: lab\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response.get(9..12).unwrap_or("0").parse()?;
    Ok((
        status,
        response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}
