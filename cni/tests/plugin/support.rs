//! What the scenarios share: a pod network namespace of the test's own (removed by a guard), the
//! node agent as a child process, the plugin run exactly as a container runtime runs it (env vars,
//! netconf on stdin, stdout and exit code read back). The ZDS client standing in for ztunnel is
//! in `ztunnel.rs`.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mesh_core::netns::NetNs;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// Whether this process may create namespaces. Without root the test is skipped with a message,
/// except in CI (`CI=true`), where that is a failure.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: needs root (network namespaces, nftables), and CI=true requires it to run"
    );
    eprintln!("SKIPPED {test}: needs root (network namespaces, nftables)");
    false
}

fn unique(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "mcni-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A directory removed with its contents when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(unique(label));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pod's network namespace, as a runtime makes one (`/var/run/netns/<name>`); deleted on drop.
#[derive(Debug)]
pub struct PodNetns {
    pub name: String,
    pub path: PathBuf,
}

impl PodNetns {
    pub fn new() -> Self {
        let name = unique("pod");
        let status = std::process::Command::new("ip").args(["netns", "add", &name]).status();
        assert!(status.is_ok_and(|s| s.success()), "ip netns add {name}");
        let path = PathBuf::from("/var/run/netns").join(&name);
        Self { name, path }
    }

    /// Whether the `inet ztunnel` table is there.
    pub fn captured(&self) -> bool {
        mesh_core::capture::installed(&NetNs::open(&self.path).expect("open the pod's netns"))
    }

    /// Whether `fd` is this namespace (same device and inode).
    pub fn is(&self, fd: OwnedFd) -> bool {
        let passed = std::fs::File::from(fd).metadata().expect("fstat");
        let own = std::fs::metadata(&self.path).expect("stat");
        (passed.dev(), passed.ino()) == (own.dev(), own.ino())
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The node agent, running; killed on drop (its log printed when the test failed).
#[derive(Debug)]
pub struct Agent {
    child: Child,
    args: Vec<String>,
    pub dir: TempDir,
    pub cni_socket: PathBuf,
    pub zds_socket: PathBuf,
}

impl Agent {
    /// Starts the agent with `manifests` in its --config-dir.
    pub async fn start(manifests: &str, args: &[&str]) -> Self {
        let dir = TempDir::new("agent");
        let config = dir.0.join("config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(config.join("pods.yaml"), manifests).unwrap();
        let config = config.display().to_string();
        Self::start_in(dir, &[&["--config-dir", &config], args].concat()).await
    }

    /// Starts the agent with `args` (a pod source among them), sockets and state file in `dir`.
    pub async fn start_in(dir: TempDir, args: &[&str]) -> Self {
        let cni_socket = dir.0.join("agent.sock");
        let zds_socket = dir.0.join("ztunnel.sock");
        let child = Self::spawn(&dir, &cni_socket, &zds_socket, args);
        let mut agent = Self {
            child,
            args: args.iter().map(|a| a.to_string()).collect(),
            dir,
            cni_socket,
            zds_socket,
        };
        agent.ready().await;
        agent
    }

    fn spawn(dir: &TempDir, cni_socket: &Path, zds_socket: &Path, args: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.0.join("agent.log"))
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_mesh-node-agent"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .args(["--cni-socket", &cni_socket.display().to_string()])
            .args(["--zds-socket", &zds_socket.display().to_string()])
            .args(["--state-file", &dir.0.join("pods.json").display().to_string()])
            .args(["--admin-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .args(["--readiness-addr", "127.0.0.1:0", "--log-level", "debug"])
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start mesh-node-agent")
    }

    /// Waits (20 s at most) until the CNI socket accepts connections.
    async fn ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.cni_socket).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("mesh-node-agent exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the agent's CNI socket within 20s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the agent again with the same flags, sockets and state file.
    pub async fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = Self::spawn(&self.dir, &self.cni_socket, &self.zds_socket, &args);
        self.ready().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("agent.log")).unwrap_or_default()
    }

    /// Kills the agent (SIGKILL: no chance to tidy up) and waits for it to be gone.
    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }

    /// A netconf pointing at this agent.
    pub fn netconf(&self) -> String {
        netconf(&self.cni_socket)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- mesh-node-agent log ---\n{}", self.log());
        }
    }
}

/// What the primary plugin of the chain returned.
pub fn prev_result() -> Value {
    json!({"cniVersion": "1.0.0",
           "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": "/var/run/netns/x"}],
           "ips": [{"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 0}],
           "dns": {}})
}

pub fn netconf(agent_socket: &Path) -> String {
    json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
           "agentSocket": agent_socket, "prevResult": prev_result()})
    .to_string()
}

/// One invocation of the plugin, as a runtime makes it.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub env: Vec<(String, String)>,
    pub stdin: String,
}

impl Invocation {
    /// `command` for pod `namespace/name` (uid `uid`) in `netns`.
    pub fn pod(command: &str, netns: &Path, namespace: &str, name: &str, uid: &str, stdin: String) -> Self {
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}");
        Self {
            env: [
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", &format!("sandbox-{uid}")),
                ("CNI_NETNS", &netns.display().to_string()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", &args),
                ("CNI_PATH", "/opt/cni/bin"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            stdin,
        }
    }

    pub fn set(mut self, key: &str, value: Option<&str>) -> Self {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_owned(), value.to_owned()));
        }
        self
    }

    pub async fn spawn(&self) -> Child {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run mesh-cni");
        let mut stdin = child.stdin.take().unwrap();
        // As runtimes do, a plugin that exits without reading its netconf is no error here.
        if let Err(error) = stdin.write_all(self.stdin.as_bytes()).await {
            assert_eq!(
                error.kind(),
                std::io::ErrorKind::BrokenPipe,
                "writing the netconf: {error}"
            );
        }
        drop(stdin);
        child
    }

    pub async fn run(&self) -> Ran {
        Ran::from(self.spawn().await.wait_with_output().await.unwrap())
    }
}

/// How an invocation ended.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(output: Output) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Ran {
    /// The success result of an ADD: `prevResult` unchanged, in the netconf's version.
    pub fn assert_passed_through(&self) {
        assert_eq!(self.code, 0, "{self:?}");
        let result: Value = serde_json::from_str(&self.stdout).expect("a JSON result");
        assert_eq!(result, prev_result(), "prevResult passed through unchanged");
    }

    /// A CNI error: exit 1, `code`, and a message containing `text`.
    pub fn assert_error(&self, code: u64, text: &str) {
        assert_eq!(self.code, 1, "{self:?}");
        let error: Value = serde_json::from_str(&self.stdout).expect("a JSON error");
        assert_eq!(error["code"], code, "{self:?}");
        let message = error["msg"].as_str().unwrap_or_default();
        assert!(message.contains(text), "{message:?} names {text:?}");
        assert!(error["cniVersion"].is_string(), "{error}");
    }
}

/// The lab's manifests: `demo` ambient (client, server, a waypoint labelled `none`), `legacy` not.
pub const MANIFESTS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec: {serviceAccountName: client, containers: [{name: c, image: mesh-lab/idle}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: demo}
spec: {serviceAccountName: server, containers: [{name: c, image: mesh-lab/echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {serviceAccountName: waypoint, containers: [{name: proxy, image: mesh-lab/waypoint}]}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {containers: [{name: c, image: mesh-lab/echo}]}
";
