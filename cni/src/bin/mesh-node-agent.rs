//! The node agent: see `mesh_cni::agent`.

use std::sync::Arc;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let signals = mesh_core::lifecycle::Signals::install()?;
    let config = Arc::new(mesh_cni::Config::parse());
    config.validate()?;
    let log = mesh_core::telemetry::init_logging(&config.log)?;
    mesh_cni::agent::run(config, signals, log).await
}
