//! The waypoint's configuration, from flags and environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::control::ControlArgs;
use mesh_core::identity::SpiffeId;
use mesh_core::lifecycle::Endpoints;
use mesh_core::telemetry::LogArgs;

/// The optional per-namespace L7 proxy of the ambient mesh: receives HBONE for the services that
/// chose it, applies HTTPRoute routing and L7 authorization, and forwards over HBONE with its own
/// identity.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "waypoint", version)]
pub struct Config {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub control: ControlArgs,
    /// The node this waypoint runs on (the CA checks that its pod is there).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The waypoint's namespace (its Gateway's).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The waypoint's Gateway name.
    #[arg(long, env = "GATEWAY_NAME", default_value = "waypoint")]
    pub gateway: String,
    /// The waypoint pod's service account: its identity.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "waypoint")]
    pub service_account: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Network of the waypoint (empty for a single network).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// Where HBONE (mTLS HTTP/2 CONNECT) arrives.
    #[arg(long, env = "WAYPOINT_HBONE_ADDR", default_value = "0.0.0.0:15008")]
    pub hbone_addr: SocketAddr,
    /// Admin server (/logging, /quitquitquit). Keep it on localhost.
    #[arg(long, env = "WAYPOINT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics).
    #[arg(long, env = "WAYPOINT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness probe (/healthz/ready).
    #[arg(long, env = "WAYPOINT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// How long open connections may take to finish after SIGTERM (e.g. 30s, 1m).
    #[arg(long, env = "WAYPOINT_DRAIN_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_deadline: Duration,
}

impl Config {
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            admin: self.admin_addr,
            metrics: self.metrics_addr,
            readiness: self.readiness_addr,
        }
    }

    pub fn identity(&self) -> anyhow::Result<SpiffeId> {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account)
            .map_err(|e| anyhow::anyhow!("--trust-domain/--namespace/--service-account: {e}"))
    }
}
