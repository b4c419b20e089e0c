use std::sync::Arc;

use clap::Parser;

/// The waypoint: without a subcommand it runs the proxy (see the options); `apply`, `list`,
/// `status` and `delete` manage waypoints in a configuration directory.
#[derive(Debug, Parser)]
#[command(
    name = "waypoint",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<waypoint::cli::Command>,
    #[command(flatten)]
    proxy: waypoint::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(command) = args.command {
        print!("{}", waypoint::cli::run(command).await?);
        return Ok(());
    }
    let signals = mesh_core::lifecycle::Signals::install()?;
    let config = Arc::new(args.proxy);
    let log = mesh_core::telemetry::init_logging(&config.log)?;
    waypoint::run(config, signals, log).await
}
