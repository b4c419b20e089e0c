//! ztunnel: the node agent. So far it runs the shared lifecycle (admin, metrics, readiness,
//! graceful drain); the data path (xDS state, HBONE inbound/outbound, redirection) follows.

pub mod certificates;
pub mod config;
pub mod proxy;
pub mod state;

use std::sync::Arc;

use mesh_core::admin::{Readiness, Routes};
use mesh_core::lifecycle::{Lifecycle, Signals};
use mesh_core::telemetry::LogHandle;
use prometheus_client::registry::Registry;

pub use config::Config;

/// Runs ztunnel until SIGTERM, SIGINT or `/quitquitquit`, then drains.
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
