//! Brings the lab up and down. `lab-net` holds the cluster network (a bridge the nodes hang
//! off), each node and each pod is a namespace of its own, istiod-lite runs in `lab-net` on the
//! manifests; each node runs the node agent (`mesh-node-agent`) and then ztunnel (in-pod mode, a
//! ZDS client of that agent). Each pod starts as on a Kubernetes node: its sandbox (namespace and
//! wiring), then the `mesh-cni` plugin run as a runtime runs it ([`crate::cni`]), and only once
//! ADD succeeded the pod's apps. Everything created is written to a state file first, so `down`
//! removes all of it (DEL for each pod first), also after a crash.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde::{Deserialize, Serialize};

use crate::cni::{self, Binaries, CniCommand, Sandbox};
use crate::component::Process;
use crate::plan::{App, Pod, Topology};
use crate::topology::{self, Namespace};

/// The node agent's admin (localhost), metrics and readiness ports in each node's namespace.
pub const AGENT_ADMIN_PORT: u16 = 15180;
pub const AGENT_METRICS_PORT: u16 = 15014;
pub const AGENT_READINESS_PORT: u16 = 8000;

/// Every namespace the lab makes starts with its prefix, so `down` can find leftovers by name.
pub const DEFAULT_PREFIX: &str = "mlab-";
/// Where the lab keeps its state, logs, CA and configuration by default.
pub const DEFAULT_DIR: &str = "/var/run/mesh-lab";

/// The names of a lab's namespaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    /// The namespace of the cluster network (the bridge, istiod-lite).
    pub fn network(&self) -> String {
        format!("{}net", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}{node}", self.prefix)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> String {
        format!("{}pod-{namespace}-{name}", self.prefix)
    }
}

/// What `down` must undo.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct State {
    prefix: String,
    namespaces: Vec<String>,
    pids: Vec<u32>,
    /// Pod sandboxes from before their ADD until their DEL: `down` runs DEL for each.
    #[serde(default)]
    pub(crate) sandboxes: Vec<Sandbox>,
}

impl State {
    fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub(crate) fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(dir);
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(temporary, path)?;
        Ok(())
    }

    fn load(dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(Self::path(dir)).ok()?).ok()
    }
}

/// Where the lab's files are and what it runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub topology: PathBuf,
    pub manifests: PathBuf,
    pub dir: PathBuf,
    pub names: Names,
}

/// The lab while it runs.
#[derive(Debug)]
pub struct Lab {
    pub dir: PathBuf,
    pub names: Names,
    pub topology: Topology,
    pub pods: Vec<Pod>,
    /// The `mesh-cni` plugin and node agent it runs.
    pub binaries: Binaries,
    pub(crate) state: State,
    pub(crate) processes: Vec<Running>,
    /// Sandboxes made so far: numbers each one's container id, uid and node-side link.
    pub(crate) sandboxes_made: u32,
    /// Waypoints the lab deployed for Gateways that had no pod: (namespace, gateway) → pod name.
    pub(crate) deployed: std::collections::BTreeMap<(String, String), String>,
    /// What the last ADD of each pod (`namespace/name`) answered: captured, or why not.
    pub enrolment: std::collections::BTreeMap<String, String>,
}

/// A process of the lab: a component (`istiod-lite`, `agent-<node>`, `ztunnel-<node>`) or one
/// of a pod's apps (its pod named).
#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) name: String,
    pub(crate) pod: Option<(String, String)>,
    pub(crate) process: Process,
}

/// Root is needed for namespaces, links and nftables; say so plainly.
pub fn require_root() -> anyhow::Result<()> {
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the lab creates network namespaces, links and nftables rules: run it as root (sudo)"
    );
    Ok(())
}

impl Lab {
    /// Builds the network, starts istiod-lite, each node's agent and ztunnel, then each pod (its
    /// sandbox, the plugin's ADD, its apps), and waits until every waypoint is ready. Whatever was
    /// left of an earlier lab is removed first.
    pub fn up(options: &Options) -> anyhow::Result<Self> {
        require_root()?;
        let topology = Topology::load(&options.topology)?;
        let pods = topology.pods(&options.manifests)?;
        let binaries = Binaries::find()?;
        down(&options.dir, &options.names)?;
        for sub in ["config", "ca", "tokens", "logs"] {
            std::fs::create_dir_all(options.dir.join(sub))?;
        }
        for entry in std::fs::read_dir(&options.manifests)?.flatten() {
            std::fs::copy(entry.path(), options.dir.join("config").join(entry.file_name()))?;
        }
        let mut lab = Self {
            dir: options.dir.clone(),
            names: options.names.clone(),
            topology,
            pods,
            binaries,
            state: State {
                prefix: options.names.prefix.clone(),
                ..State::default()
            },
            processes: Vec::new(),
            sandboxes_made: 0,
            deployed: Default::default(),
            enrolment: Default::default(),
        };
        let result = lab
            .build()
            .and_then(|()| lab.start())
            .and_then(|()| lab.reconcile_waypoints().map(drop));
        if let Err(error) = result {
            let _ = lab.down();
            return Err(error);
        }
        Ok(lab)
    }

    /// Records a namespace in the state file, then creates it.
    pub(crate) fn create_namespace(&mut self, name: &str) -> anyhow::Result<Namespace> {
        if !self.state.namespaces.iter().any(|n| n == name) {
            self.state.namespaces.push(name.to_owned());
            self.state.save(&self.dir)?;
        }
        Ok(Namespace::create(name)?.keep())
    }

    /// Deletes a namespace, then forgets it in the state file.
    pub(crate) fn delete_namespace(&mut self, name: &str) -> anyhow::Result<()> {
        Namespace::delete(name);
        self.state.namespaces.retain(|n| n != name);
        self.state.save(&self.dir)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let network = self.create_namespace(&self.names.network())?;
        let bridge_cidr = self.topology.bridge.clone();
        let (bridge, prefix) = bridge_cidr.split_once('/').context("bridge is a.b.c.d/len")?;
        network.ip(&["link", "add", "br0", "type", "bridge"])?;
        network.ip(&["addr", "add", &format!("{bridge}/{prefix}"), "dev", "br0"])?;
        network.ip(&[
            "addr",
            "add",
            &format!("{}/{prefix}", self.topology.controller),
            "dev",
            "br0",
        ])?;
        network.ip(&["link", "set", "br0", "up"])?;
        let topology = self.topology.clone();
        for (index, node) in topology.nodes.iter().enumerate() {
            let namespace = self.create_namespace(&self.names.node(&node.name))?;
            let link = format!("n{}", index + 1);
            topology::veth(Some(&network), &link, &namespace)?;
            network.ip(&["link", "set", &link, "master", "br0", "up"])?;
            namespace.ip(&["addr", "add", &format!("{}/{prefix}", node.address), "dev", "eth0"])?;
            namespace.ip(&["link", "set", "eth0", "up"])?;
            topology::enable_forwarding(Some(&namespace))?;
            // The cluster network reaches each node's pods through that node.
            network.ip(&["route", "add", &node.pod_cidr, "via", &node.address.to_string()])?;
            for other in topology.nodes.iter().filter(|o| o.name != node.name) {
                namespace.ip(&["route", "add", &other.pod_cidr, "via", &other.address.to_string()])?;
            }
        }
        Ok(())
    }

    /// Starts `role` of the lab's own binary with `flags` inside `namespace`, its output in
    /// `logs/<name>.log`; `pod` is the pod it belongs to, if any.
    pub(crate) fn spawn(
        &mut self,
        name: &str,
        namespace: &str,
        role: &str,
        flags: &[String],
        pod: Option<&Pod>,
    ) -> anyhow::Result<()> {
        let mut args = vec![crate::component::ROLE_FLAG.to_owned(), role.to_owned()];
        args.extend_from_slice(flags);
        self.spawn_program(name, namespace, &std::env::current_exe()?, &args, pod)
    }

    /// Starts `program args` inside `namespace`, its output in `logs/<name>.log`.
    fn spawn_program(
        &mut self,
        name: &str,
        namespace: &str,
        program: &Path,
        args: &[String],
        pod: Option<&Pod>,
    ) -> anyhow::Result<()> {
        // Appended to: a restarted component keeps its predecessor's lines.
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{name}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", namespace])
            .arg(program)
            .args(args)
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name} ({})", program.display()))?;
        let process = Process { child };
        self.state.pids.push(process.id());
        self.state.save(&self.dir)?;
        self.processes.push(Running {
            name: name.to_owned(),
            pod: pod.map(|p| (p.namespace.clone(), p.name.clone())),
            process,
        });
        Ok(())
    }

    fn path(&self, sub: &str) -> String {
        self.dir.join(sub).display().to_string()
    }

    fn start(&mut self) -> anyhow::Result<()> {
        for node in &self.topology.nodes {
            std::fs::write(
                self.dir.join("tokens").join(&node.name),
                format!("lab-token-{}\n", node.name),
            )?;
        }
        let controller = self.topology.controller;
        let flags = [
            format!("--config-dir={}", self.path("config")),
            format!("--ca-dir={}", self.path("ca")),
            format!("--node-tokens-dir={}", self.path("tokens")),
            "--xds-plaintext-addr=127.0.0.1:15010".into(),
            format!("--xds-addr={controller}:15012"),
            format!("--dns-names={controller}"),
            "--admin-addr=127.0.0.1:15000".into(),
            format!("--metrics-addr={controller}:15014"),
            format!("--readiness-addr={controller}:15021"),
        ];
        let network = self.names.network();
        self.spawn("istiod-lite", &network, "istiod-lite", &flags, None)?;
        wait_ready(&network, SocketAddr::from((controller, 15021)), "istiod-lite")?;
        for node in self.topology.nodes.clone() {
            self.start_agent(&node)?;
        }
        for node in self.topology.nodes.clone() {
            self.start_ztunnel(&node)?;
        }
        // ztunnel is ready once it has the agent's first snapshot: from then on ADD reaches it.
        for node in &self.topology.nodes {
            let readiness = SocketAddr::from((node.address, 15021));
            wait_ready(&network, readiness, &format!("ztunnel on {}", node.name))?;
        }
        for pod in self.pods.clone() {
            self.start_pod(&pod)?;
        }
        for pod in self.pods.iter().filter(|p| p.apps.contains(&App::Waypoint)) {
            let readiness = SocketAddr::from((pod.ip, 15021));
            wait_ready(&network, readiness, &format!("waypoint {}/{}", pod.namespace, pod.name))?;
        }
        Ok(())
    }

    /// Starts the waypoint process of `pod` in its namespace.
    pub(crate) fn spawn_waypoint(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let controller = self.topology.controller;
        let flags = [
            format!("--node-name={}", pod.node),
            format!("--namespace={}", pod.namespace),
            format!("--gateway={}", pod.gateway.clone().unwrap_or_default()),
            format!("--service-account={}", pod.service_account),
            format!("--xds-address=https://{controller}:15012"),
            format!("--root-cert={}", self.path("ca/root-cert.pem")),
            format!("--token-file={}", self.path(&format!("tokens/{}", pod.node))),
            format!("--metrics-addr={}:15020", pod.ip),
            format!("--readiness-addr={}:15021", pod.ip),
        ];
        let namespace = self.names.pod(&pod.namespace, &pod.name);
        self.spawn(
            &format!("waypoint-{}-{}", pod.namespace, pod.name),
            &namespace,
            "waypoint",
            &flags,
            Some(pod),
        )
    }

    /// Stops the process called `name`, if it runs.
    pub(crate) fn stop_process(&mut self, name: &str) {
        if let Some(at) = self.processes.iter().position(|r| r.name == name) {
            let mut running = self.processes.remove(at);
            running.process.stop();
        }
    }

    /// Where a node's agent and ztunnel keep their sockets and the agent its held pods.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    /// Starts the node agent of `node` in the node's namespace and waits until it is ready (its
    /// CNI and ZDS sockets listen). It reads the pods from the lab's configuration directory.
    fn start_agent(&mut self, node: &crate::plan::Node) -> anyhow::Result<()> {
        let dir = self.node_dir(&node.name);
        std::fs::create_dir_all(&dir)?;
        let at = |file: &str| dir.join(file).display().to_string();
        let args = [
            format!("--config-dir={}", self.path("config")),
            format!("--cni-socket={}", at("agent.sock")),
            format!("--zds-socket={}", at("ztunnel.sock")),
            format!("--state-file={}", at("pods.json")),
            format!("--admin-addr=127.0.0.1:{AGENT_ADMIN_PORT}"),
            format!("--metrics-addr={}:{AGENT_METRICS_PORT}", node.address),
            format!("--readiness-addr={}:{AGENT_READINESS_PORT}", node.address),
        ];
        let agent = self.binaries.agent.clone();
        self.spawn_program(
            &format!("agent-{}", node.name),
            &self.names.node(&node.name),
            &agent,
            &args,
            None,
        )?;
        wait_ready(
            &self.names.network(),
            SocketAddr::from((node.address, AGENT_READINESS_PORT)),
            &format!("node agent on {}", node.name),
        )
    }

    pub(crate) fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }

    fn start_ztunnel(&mut self, node: &crate::plan::Node) -> anyhow::Result<()> {
        let controller = self.topology.controller;
        let flags = [
            format!("--node-name={}", node.name),
            format!("--xds-address=https://{controller}:15012"),
            format!("--root-cert={}", self.path("ca/root-cert.pem")),
            format!("--token-file={}", self.path(&format!("tokens/{}", node.name))),
            "--redirect=inpod".into(),
            format!(
                "--zds-socket={}",
                self.node_dir(&node.name).join("ztunnel.sock").display()
            ),
            "--admin-addr=127.0.0.1:15000".into(),
            format!("--metrics-addr={}:15020", node.address),
            format!("--readiness-addr={}:15021", node.address),
            "--drain-deadline=2s".into(),
        ];
        self.spawn(
            &format!("ztunnel-{}", node.name),
            &self.names.node(&node.name),
            "ztunnel",
            &flags,
            None,
        )?;
        Ok(())
    }

    /// The pod called `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.namespace == namespace && p.name == name)
    }

    /// Takes everything down as a node would: the pods' apps stop, DEL runs for each pod, the
    /// ztunnels and agents stop gently (SIGTERM), the rest goes, then every namespace.
    pub fn down(mut self) -> anyhow::Result<()> {
        for mut running in self.processes.extract_if(.., |r| r.pod.is_some()).collect::<Vec<_>>() {
            running.process.stop();
        }
        for sandbox in self.state.sandboxes.clone().into_iter().rev() {
            let ran = cni::run(&self.binaries, CniCommand::Del, &sandbox);
            self.log_cni(CniCommand::Del, &sandbox, &ran);
            match ran {
                Ok(_) => {
                    self.state.sandboxes.retain(|s| s.container_id != sandbox.container_id);
                    self.state.save(&self.dir)?;
                }
                Err(error) => eprintln!("{error:#}"),
            }
        }
        for component in ["ztunnel-", "agent-"] {
            let stopping = |r: &Running| r.name.starts_with(component);
            for running in self.processes.iter().filter(|r| stopping(r)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(running.process.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            for running in self.processes.iter_mut().filter(|r| stopping(r)) {
                while Instant::now() < deadline && running.process.child.try_wait().ok().flatten().is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        self.processes.clear();
        down(&self.dir, &self.names).map(drop)
    }

    /// Stops the ztunnel of `node` the hard way (SIGKILL, as a crash): the agent keeps its pods
    /// (and their rules), so their connections are refused until a ztunnel takes them again.
    pub fn crash_ztunnel(&mut self, node: &str) -> anyhow::Result<()> {
        let name = format!("ztunnel-{node}");
        anyhow::ensure!(self.processes.iter().any(|r| r.name == name), "no ztunnel on {node}");
        self.stop_process(&name);
        Ok(())
    }

    /// Starts the ztunnel of `node` again and waits until it is ready (it has the agent's
    /// snapshot: every pod the agent holds).
    pub fn restart_ztunnel(&mut self, node: &str) -> anyhow::Result<()> {
        let node = self
            .topology
            .node(node)
            .cloned()
            .with_context(|| format!("no node {node}"))?;
        self.start_ztunnel(&node)?;
        wait_ready(
            &self.names.network(),
            SocketAddr::from((node.address, 15021)),
            &format!("ztunnel on {}", node.name),
        )
    }
}

/// Removes what the state file in `dir` lists (DEL first for each pod sandbox still there, while
/// its agent may still run), then any namespace named like the lab's, then the directory. What it
/// removed, for the record.
pub fn down(dir: &Path, names: &Names) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let state = State::load(dir).unwrap_or_default();
    if !state.sandboxes.is_empty() {
        match Binaries::find() {
            Ok(binaries) => {
                for sandbox in state.sandboxes.iter().rev() {
                    match cni::run(&binaries, CniCommand::Del, sandbox) {
                        Ok(_) => removed.push(format!("pod {} (CNI DEL)", sandbox.pod())),
                        Err(error) => eprintln!("{error:#}"),
                    }
                }
            }
            Err(error) => eprintln!("no CNI DEL for the lab's pods (their namespaces go anyway): {error:#}"),
        }
    }
    for pid in &state.pids {
        let pid = nix::unistd::Pid::from_raw(*pid as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
            removed.push(format!("process {pid}"));
        }
    }
    let prefixes = [names.prefix.clone(), state.prefix]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>();
    // Pods before nodes before the network: a veth goes with the namespace at either end.
    let mut names: Vec<String> = state
        .namespaces
        .into_iter()
        .chain(
            Namespace::list()
                .into_iter()
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str()))),
        )
        .collect();
    // Pods first, the network last.
    names.sort_by_key(|n| (!n.contains("-pod-"), n.ends_with("net"), n.clone()));
    names.dedup();
    for name in names {
        if Namespace::list().contains(&name) {
            Namespace::delete(&name);
            removed.push(format!("namespace {name}"));
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    Ok(removed)
}

/// A GET from inside `namespace` (blocking): status and body.
pub fn http_get(namespace: &str, address: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    Namespace::existing(namespace).run(move || -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: lab\r\nconnection: close\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response.get(9..12).unwrap_or("0").parse()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })?
}

pub(crate) fn wait_ready(namespace: &str, address: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match http_get(namespace, address, "/healthz/ready") {
            Ok((200, _)) => return Ok(()),
            Ok((_, body)) if Instant::now() >= deadline => {
                anyhow::bail!("{what} not ready within 60s: {}", body.trim())
            }
            Err(error) if Instant::now() >= deadline => anyhow::bail!("{what} not ready within 60s: {error:#}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Connects from inside a pod's namespace, sends `data`, half-closes and reads the answer to its
/// end (blocking). An empty answer means the connection was refused or closed.
pub fn exchange(pod_namespace: &str, destination: SocketAddr, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    talk(pod_namespace, destination, data, true)
}

/// Like [`exchange`] for an HTTP request that asks for `connection: close`: no half-close (an
/// HTTP server may take one as an abort); the server's close ends the answer.
pub fn http_request(pod_namespace: &str, destination: SocketAddr, request: &[u8]) -> anyhow::Result<Vec<u8>> {
    talk(pod_namespace, destination, request, false)
}

fn talk(pod_namespace: &str, destination: SocketAddr, data: &[u8], half_close: bool) -> anyhow::Result<Vec<u8>> {
    let data = data.to_vec();
    Namespace::existing(pod_namespace).run(move || -> anyhow::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&destination, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        // A refusal may reset the connection under our writes: what was read tells.
        let _ = stream.write_all(&data);
        if half_close {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        Ok(answer)
    })?
}

/// The echo app: greets with `name`, then echoes, on `listen` (one thread per connection).
pub fn serve_echo(listen: SocketAddr, name: String) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(listen).with_context(|| format!("--listen {listen}"))?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = stream.write_all(format!("{name}: ").as_bytes());
            let mut buffer = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = stream.read(&mut buffer) {
                if stream.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
        });
    }
    Ok(())
}
