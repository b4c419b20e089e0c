//! The lab as a container runtime: each pod gets a sandbox (a network namespace wired to its node)
//! and the `mesh-cni` plugin is run on it exactly as a runtime runs a chained plugin after the
//! primary one (the lab's own wiring, see [`crate::topology::attach`]): the `CNI_*` environment
//! variables, the netconf with `prevResult` on stdin, the result or the error JSON on stdout and
//! the exit code read back. Only after ADD succeeded does the lab start the pod's processes; on
//! the way out it runs DEL before the namespace goes.
//!
//! The plugin and the node agent are the `mesh-cni` crate's programs, not roles of the lab's
//! binary: they are found beside the lab's own executable ([`Binaries::find`]).

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::topology::NETNS_DIR;

/// The chained CNI plugin.
pub const PLUGIN: &str = "mesh-cni";
/// The node agent the plugin asks.
pub const AGENT: &str = "mesh-node-agent";
/// The netconf's network name.
pub const NETWORK: &str = "mesh-lab";

/// Where the `mesh-cni` crate's programs are.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The directory holding them (the netconf's `CNI_PATH`).
    pub dir: PathBuf,
    pub plugin: PathBuf,
    pub agent: PathBuf,
}

impl Binaries {
    /// The programs beside the running executable: see [`Binaries::beside`].
    pub fn find() -> anyhow::Result<Self> {
        Self::beside(&std::env::current_exe().context("the lab's own executable")?)
    }

    /// The programs beside `exe`: in its directory (`target/<profile>/` for the lab's binary),
    /// or the one above for a test binary (in `target/<profile>/deps/`). A missing one is named,
    /// with the command that builds it.
    pub fn beside(exe: &Path) -> anyhow::Result<Self> {
        let mut dir = exe.parent().context("the lab's executable has no directory")?;
        if dir.file_name().is_some_and(|d| d == "deps") {
            dir = dir.parent().unwrap_or(dir);
        }
        let release = if dir.file_name().is_some_and(|d| d == "release") {
            " --release"
        } else {
            ""
        };
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            if !path.is_file() {
                bail!(
                    "{name} not found at {}: the lab runs the mesh-cni crate's programs ({PLUGIN}, {AGENT}) from \
                     beside its own executable ({}); build them with `cargo build{release} -p mesh-cni`",
                    path.display(),
                    exe.display()
                );
            }
            Ok(path)
        };
        Ok(Self {
            plugin: find(PLUGIN)?,
            agent: find(AGENT)?,
            dir: dir.to_owned(),
        })
    }
}

/// One pod sandbox, as the runtime knows it: enough to run DEL also after a crash (it is kept in
/// the lab's state file from before ADD until DEL).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// `CNI_CONTAINERID`: unique per sandbox (a restarted pod gets a new one).
    pub container_id: String,
    /// The network namespace's name under `/var/run/netns`.
    pub netns: String,
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`.
    pub uid: String,
    pub ip: Ipv4Addr,
    /// The node agent's socket (the netconf's `agentSocket`).
    pub agent_socket: PathBuf,
}

/// A CNI command the lab runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
}

impl CniCommand {
    fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
        }
    }
}

impl Sandbox {
    /// `CNI_NETNS`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// `namespace/name`, for messages.
    pub fn pod(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The environment a runtime sets for `command` (`CNI_PATH` is the plugin's directory).
    pub fn env(&self, command: CniCommand, cni_path: &Path) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.as_str().to_owned()),
            ("CNI_CONTAINERID", self.container_id.clone()),
            ("CNI_NETNS", self.netns_path().display().to_string()),
            ("CNI_IFNAME", "eth0".to_owned()),
            (
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                    self.namespace, self.name, self.uid
                ),
            ),
            ("CNI_PATH", cni_path.display().to_string()),
        ]
    }

    /// The netconf on stdin: the chain's `prevResult` is what the lab's wiring gave the pod.
    pub fn netconf(&self) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": PLUGIN,
            "agentSocket": self.agent_socket,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": self.netns_path()}],
                "ips": [{"address": format!("{}/32", self.ip), "interface": 0}],
            },
        })
        .to_string()
    }
}

/// What a successful run printed: the result (ADD) and the plugin's notes (stderr).
#[derive(Clone, Debug, Default)]
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
}

/// Runs the plugin at `binaries` for `command` on `sandbox`, as a runtime does. Exit 1 is the
/// plugin's CNI error, reported with its code and message; anything else that is not exit 0
/// (killed, no error JSON) is named as such.
pub fn run(binaries: &Binaries, command: CniCommand, sandbox: &Sandbox) -> anyhow::Result<Ran> {
    let what = format!("{PLUGIN} {} for pod {}", command.as_str(), sandbox.pod());
    let mut child = Command::new(&binaries.plugin)
        .env_clear()
        .envs(sandbox.env(command, &binaries.dir))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: cannot run {}", binaries.plugin.display()))?;
    let netconf = sandbox.netconf();
    let mut stdin = child.stdin.take().expect("piped");
    // A plugin may exit without reading its netconf (a broken pipe is no error of the runtime's).
    if let Err(error) = stdin.write_all(netconf.as_bytes())
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(error).with_context(|| format!("{what}: writing the netconf"));
    }
    drop(stdin);
    let output = child
        .wait_with_output()
        .with_context(|| format!("{what}: waiting for it"))?;
    let ran = Ran {
        stdout: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    };
    match output.status.code() {
        Some(0) => Ok(ran),
        Some(1) => match serde_json::from_str::<serde_json::Value>(&ran.stdout) {
            Ok(error) => bail!(
                "{what} failed with CNI error {}: {}",
                error["code"],
                error["msg"].as_str().unwrap_or("(no msg)")
            ),
            Err(_) => bail!(
                "{what} exited 1 without an error result; stdout {:?}, stderr {:?}",
                ran.stdout,
                ran.stderr
            ),
        },
        _ => bail!("{what} ended with {}; stderr {:?}", output.status, ran.stderr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> Sandbox {
        Sandbox {
            container_id: "lab-demo-client-1".into(),
            netns: "mlab-pod-demo-client".into(),
            namespace: "demo".into(),
            name: "client".into(),
            uid: "demo-client-1".into(),
            ip: Ipv4Addr::new(10, 11, 1, 10),
            agent_socket: "/var/run/mesh-lab/nodes/node-1/agent.sock".into(),
        }
    }

    #[test]
    fn the_plugin_is_called_as_a_runtime_calls_it() {
        let env = sandbox().env(CniCommand::Add, Path::new("/opt/cni/bin"));
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            env,
            [
                "CNI_COMMAND=ADD",
                "CNI_CONTAINERID=lab-demo-client-1",
                "CNI_NETNS=/var/run/netns/mlab-pod-demo-client",
                "CNI_IFNAME=eth0",
                "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client;K8S_POD_UID=demo-client-1",
                "CNI_PATH=/opt/cni/bin",
            ]
        );
        let netconf: serde_json::Value = serde_json::from_str(&sandbox().netconf()).unwrap();
        assert_eq!(
            netconf,
            serde_json::json!({
                "cniVersion": "1.0.0", "name": "mesh-lab", "type": "mesh-cni",
                "agentSocket": "/var/run/mesh-lab/nodes/node-1/agent.sock",
                "prevResult": {"cniVersion": "1.0.0",
                    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/mlab-pod-demo-client"}],
                    "ips": [{"address": "10.11.1.10/32", "interface": 0}]}
            })
        );
    }

    #[test]
    fn a_missing_program_is_named_with_the_command_that_builds_it() {
        let dir = std::env::temp_dir().join(format!("mesh-lab-binaries-{}", std::process::id()));
        let deps = dir.join("debug").join("deps");
        std::fs::create_dir_all(&deps).unwrap();
        std::fs::write(dir.join("debug").join(PLUGIN), "").unwrap();
        let error = Binaries::beside(&deps.join("lab-0123")).unwrap_err().to_string();
        std::fs::create_dir_all(dir.join("release")).unwrap();
        let release = Binaries::beside(&dir.join("release").join("mesh-lab"))
            .unwrap_err()
            .to_string();
        std::fs::write(dir.join("debug").join(AGENT), "").unwrap();
        let found = Binaries::beside(&deps.join("lab-0123")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let agent = dir.join("debug").join(AGENT);
        assert!(
            error.starts_with(&format!("mesh-node-agent not found at {}: ", agent.display())),
            "{error}"
        );
        assert!(error.ends_with("build them with `cargo build -p mesh-cni`"), "{error}");
        assert!(release.starts_with("mesh-cni not found at "), "{release}");
        assert!(
            release.ends_with("build them with `cargo build --release -p mesh-cni`"),
            "{release}"
        );
        assert_eq!(found.plugin, dir.join("debug").join(PLUGIN));
        assert_eq!(found.dir, dir.join("debug"));
    }

    #[test]
    fn a_plugin_error_is_reported_with_its_code_and_message() {
        let dir = std::env::temp_dir().join(format!("mesh-lab-cni-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plugin = dir.join(PLUGIN);
        std::fs::write(
            &plugin,
            "#!/bin/sh\ncat >/dev/null\necho '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"ztunnel is not connected\"}'\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let binaries = Binaries {
            dir: dir.clone(),
            plugin,
            agent: dir.join(AGENT),
        };
        let error = run(&binaries, CniCommand::Add, &sandbox()).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            error.to_string(),
            "mesh-cni ADD for pod demo/client failed with CNI error 11: ztunnel is not connected"
        );
    }
}
