//! ztunnel's configuration, from flags and environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::control::ControlArgs;
use mesh_core::lifecycle::Endpoints;
use mesh_core::telemetry::LogArgs;

use crate::redirect::{DEFAULT_MARK, RedirectMode};

/// The per-node agent of the ambient mesh: captures the TCP traffic of the ambient pods on this
/// node and carries it over HBONE (HTTP/2 CONNECT in mutual TLS, port 15008) with each pod's
/// own SPIFFE identity, enforcing L4 authorization where traffic arrives.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "ztunnel", version)]
pub struct Config {
    #[command(flatten)]
    pub log: LogArgs,
    /// This node's name: ztunnel serves the workloads scheduled here.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub hbone: mesh_core::hbone::LimitArgs,
    /// Network of this node's workloads (empty for a single network).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// SOCKS5 outbound listener (a local app names its destination instead of being redirected).
    #[arg(long, env = "ZTUNNEL_SOCKS5_ADDR")]
    pub socks5_addr: Option<SocketAddr>,
    /// How pods' traffic reaches ztunnel: `inpod` (the node agent hands each pod's network
    /// namespace over ZDS, capture rules in place; ztunnel listens inside it) or `shared` (pods
    /// live in ztunnel's own namespace; listeners on their addresses, capture arranged by whoever
    /// set them up).
    #[arg(long, env = "ZTUNNEL_REDIRECT", value_enum, default_value = "inpod")]
    pub redirect: RedirectMode,
    /// The node agent's ZDS socket (`inpod` mode), as Istio's ztunnel names it.
    #[arg(long, env = "INPOD_UDS", default_value = mesh_core::zds::DEFAULT_SOCKET)]
    pub zds_socket: PathBuf,
    /// The mesh's trust domain: the identity of a pod the agent hands over is
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// SO_MARK on ztunnel's own connections, so capture rules that skip this mark let them pass.
    /// Default: 1337 (Istio's) in `inpod` mode, none in `shared` mode. Needs CAP_NET_ADMIN.
    #[arg(long, env = "ZTUNNEL_SOCKET_MARK")]
    pub socket_mark: Option<u32>,
    /// Admin server (/config_dump, /logging, /quitquitquit). Keep it on localhost.
    #[arg(long, env = "ZTUNNEL_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics).
    #[arg(long, env = "ZTUNNEL_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness probe (/healthz/ready).
    #[arg(long, env = "ZTUNNEL_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Istio's ztunnel is started as `ztunnel proxy ztunnel`: those words are accepted so its
    /// chart can run this binary unchanged, and nothing else is.
    #[arg(hide = true, num_args = 0..=2, value_parser = ["proxy", "ztunnel"])]
    pub istio_command: Vec<String>,
    /// How long open connections may take to finish after SIGTERM (e.g. 30s, 1m).
    #[arg(long, env = "ZTUNNEL_DRAIN_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_deadline: Duration,
}

impl Config {
    /// The mark on ztunnel's own sockets.
    pub fn mark(&self) -> Option<u32> {
        match self.redirect {
            RedirectMode::Inpod => Some(self.socket_mark.unwrap_or(DEFAULT_MARK)),
            RedirectMode::Shared => self.socket_mark,
        }
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            admin: self.admin_addr,
            metrics: self.metrics_addr,
            readiness: self.readiness_addr,
        }
    }
}
