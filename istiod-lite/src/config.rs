//! istiod-lite's configuration, from flags and environment variables.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::lifecycle::Endpoints;
use mesh_core::telemetry::LogArgs;

/// The slim controller of the ambient mesh: watches Kubernetes (or a directory of the same YAML),
/// translates it into workloads, services and policies, streams them over delta xDS, and is the
/// CA that signs workload certificates.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "istiod-lite", version)]
pub struct Config {
    #[command(flatten)]
    pub log: LogArgs,
    /// Admin server (/logging, /quitquitquit). Keep it on localhost.
    #[arg(long, env = "ISTIOD_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics).
    #[arg(long, env = "ISTIOD_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    pub metrics_addr: SocketAddr,
    /// Readiness probe (/healthz/ready).
    #[arg(long, env = "ISTIOD_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// How long open streams may take to finish after SIGTERM (e.g. 30s, 1m).
    #[arg(long, env = "ISTIOD_DRAIN_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
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
