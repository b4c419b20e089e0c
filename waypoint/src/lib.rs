//! waypoint: the per-namespace L7 proxy. So far it runs the shared lifecycle (admin, metrics, readiness,
//! graceful drain) and has its routing engine ([`route`]: HTTPRoute matching, backends by weight,
//! filters); the L7 path (HBONE listener, L7 authorization, upstream) follows.

pub mod config;
pub mod route;

use std::sync::Arc;

use mesh_core::admin::{Readiness, Routes};
use mesh_core::lifecycle::{Lifecycle, Signals};
use mesh_core::telemetry::LogHandle;
use prometheus_client::registry::Registry;

pub use config::Config;

/// Runs the waypoint until SIGTERM, SIGINT or `/quitquitquit`, then drains.
pub async fn run(config: Arc<Config>, signals: Signals, log: LogHandle) -> anyhow::Result<()> {
    let registry = Registry::default();
    let readiness = Readiness::new();
    let mut lifecycle = Lifecycle::new();
    lifecycle
        .serve_endpoints(&config.endpoints(), Routes::new(), log, registry, readiness)
        .await?;
    lifecycle.run(signals, config.drain_deadline).await;
    Ok(())
}
