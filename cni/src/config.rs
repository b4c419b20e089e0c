//! The node agent's configuration, from flags and environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::lifecycle::Endpoints;
use mesh_core::telemetry::LogArgs;

use crate::protocol::DEFAULT_AGENT_SOCKET;

/// The ambient mesh's node agent: enrols each ambient pod of this node at sandbox creation. The
/// `mesh-cni` plugin asks it (over --cni-socket) when the container runtime creates a pod; it
/// installs the pod's nftables capture table (outbound → 15001, inbound → 15006) in the pod's
/// network namespace, hands the namespace to ztunnel over ZDS (--zds-socket, Istio's protocol)
/// and answers once ztunnel acknowledged. It holds every enrolled pod's namespace across ztunnel
/// restarts and upgrades: a ztunnel that connects gets them all in its snapshot, and while none
/// is connected captured connections are refused (fail closed).
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "mesh-node-agent", version)]
#[command(group(clap::ArgGroup::new("pods").required(true).args(["config_dir", "kubernetes"])))]
pub struct Config {
    #[command(flatten)]
    pub log: LogArgs,
    /// Unix socket the mesh-cni plugin connects to (the netconf's `agentSocket`). A stale socket
    /// file is replaced.
    #[arg(long, env = "NODE_AGENT_CNI_SOCKET", default_value = DEFAULT_AGENT_SOCKET)]
    pub cni_socket: PathBuf,
    /// Unix SOCK_SEQPACKET socket ztunnel connects to for ZDS (ztunnel's `INPOD_UDS`).
    #[arg(long, env = "NODE_AGENT_ZDS_SOCKET", default_value = mesh_core::zds::DEFAULT_SOCKET)]
    pub zds_socket: PathBuf,
    /// Packet mark of ztunnel's own sockets, which the capture rules let pass (ztunnel's
    /// --socket-mark must match).
    #[arg(long, env = "NODE_AGENT_MARK", default_value_t = mesh_core::capture::DEFAULT_MARK)]
    pub mark: u32,
    /// Where the held pods are kept across agent restarts (on a tmpfs: a reboot ends the pods too).
    #[arg(long, env = "NODE_AGENT_STATE_FILE", default_value = "/var/run/mesh-cni/pods.json")]
    pub state_file: PathBuf,
    /// Pods and Namespaces from a directory of Kubernetes YAML (the lab; read at each request).
    #[arg(long, env = "NODE_AGENT_CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Pods and Namespaces from the Kubernetes API: each pod is read (its uid checked against
    /// K8S_POD_UID) and annotated `ambient.istio.io/redirection: enabled` once ztunnel holds it.
    #[arg(long, env = "NODE_AGENT_KUBERNETES", conflicts_with = "config_dir")]
    pub kubernetes: bool,
    /// Kubeconfig for --kubernetes (default: in-cluster, else $KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "KUBECONFIG", value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces whose pods are never captured (comma-separated).
    #[arg(
        long,
        env = "NODE_AGENT_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,istio-system"
    )]
    pub exclude_namespaces: Vec<String>,
    /// How long ztunnel may take to acknowledge a ZDS request (e.g. 5s). A ztunnel that does not
    /// answer in time is disconnected; it reconnects and gets a snapshot.
    #[arg(long, env = "NODE_AGENT_ACK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ack_timeout: Duration,
    /// Admin server (/logging, /quitquitquit). Keep it on localhost.
    #[arg(long, env = "NODE_AGENT_ADMIN_ADDR", default_value = "127.0.0.1:15180")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics).
    #[arg(long, env = "NODE_AGENT_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    pub metrics_addr: SocketAddr,
    /// Readiness probe (/healthz/ready): ready once the CNI and ZDS sockets listen.
    #[arg(long, env = "NODE_AGENT_READINESS_ADDR", default_value = "0.0.0.0:8000")]
    pub readiness_addr: SocketAddr,
}

impl Config {
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            admin: self.admin_addr,
            metrics: self.metrics_addr,
            readiness: self.readiness_addr,
        }
    }

    /// Checks what clap cannot: a start with a clear message, not a failure at the first pod.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(dir) = &self.config_dir {
            anyhow::ensure!(dir.is_dir(), "--config-dir {}: not a directory", dir.display());
        }
        anyhow::ensure!(
            !self.ack_timeout.is_zero(),
            "--ack-timeout 0s: ztunnel needs some time to answer"
        );
        let paths = [
            ("--cni-socket", &self.cni_socket),
            ("--zds-socket", &self.zds_socket),
            ("--state-file", &self.state_file),
        ];
        for (flag, path) in paths {
            anyhow::ensure!(path.is_absolute(), "{flag} {}: not an absolute path", path.display());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn a_pod_source_is_required_and_exclusive() {
        assert!(Config::try_parse_from(["mesh-node-agent"]).is_err());
        assert!(Config::try_parse_from(["mesh-node-agent", "--config-dir", "/tmp", "--kubernetes"]).is_err());
        let config = Config::try_parse_from(["mesh-node-agent", "--kubernetes"]).unwrap();
        assert_eq!(config.exclude_namespaces, ["kube-system", "istio-system"]);
        assert_eq!(config.ack_timeout, Duration::from_secs(5));
        assert_eq!(config.zds_socket, PathBuf::from(mesh_core::zds::DEFAULT_SOCKET));
        assert_eq!(config.mark, 1337);
    }
}
