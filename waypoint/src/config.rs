//! the waypoint's configuration, from flags and environment variables.

use std::net::SocketAddr;
use std::time::Duration;

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
}
