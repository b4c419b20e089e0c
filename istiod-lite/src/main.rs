use std::sync::Arc;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let signals = mesh_core::lifecycle::Signals::install()?;
    let config = Arc::new(istiod_lite::Config::parse());
    let log = mesh_core::telemetry::init_logging(&config.log)?;
    istiod_lite::run(config, signals, log).await
}
