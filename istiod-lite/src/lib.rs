//! istiod-lite: the controller and CA of the mesh. Configuration flows one way:
//! source (files | kube) → [`store`] → pure [`translate`] → [`xds`] server; the [`ca`] signs
//! workload certificates for the node agents that run them.

pub mod ca;
pub mod config;
pub mod controller;
pub mod grpc;
pub mod objects;
pub mod source;
pub mod store;
pub mod translate;
pub mod xds;

use std::sync::Arc;

use mesh_core::admin::{Readiness, Routes};
use mesh_core::lifecycle::{Lifecycle, Signals};
use mesh_core::telemetry::LogHandle;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

pub use config::Config;

/// Runs istiod-lite until SIGTERM, SIGINT or `/quitquitquit`, then drains.
pub async fn run(config: Arc<Config>, signals: Signals, log: LogHandle) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let mut registry = Registry::default();
    let readiness = Readiness::new();
    let mut lifecycle = Lifecycle::new();
    let xds_metrics = Arc::new(xds::Metrics::new(&mut registry));
    let config_errors = Counter::default();
    registry.register(
        "istiod_config_errors",
        "Configuration documents rejected",
        config_errors.clone(),
    );

    let (authority, origin) = ca::files::load_or_create(&config.ca_dir, &config.trust_domain)?;
    info!(dir = %config.ca_dir.display(), ?origin, trust_domain = %config.trust_domain, "CA ready");
    let authority = Arc::new(authority);
    let tokens = match &config.node_tokens_dir {
        Some(dir) => ca::NodeTokens::load(dir)?,
        None => {
            warn!("no --node-tokens-dir: the CA refuses every certificate request");
            ca::NodeTokens::default()
        }
    };
    info!(nodes = tokens.len(), "node tokens loaded");

    let store = Arc::new(store::Store::new());
    let publisher = Arc::new(xds::Publisher::new());
    match &config.config_dir {
        Some(dir) => {
            let watching = source::files::load(dir, store.clone(), config_errors.clone())
                .map_err(|e| anyhow::anyhow!("--config-dir {}: {e}", dir.display()))?;
            lifecycle.spawn(watching.run());
        }
        None => {
            anyhow::bail!("--kubernetes: the Kubernetes source is not available in this build yet; use --config-dir")
        }
    }
    lifecycle.spawn(controller::run(
        store.subscribe(),
        publisher.clone(),
        config.mesh(),
        readiness.register("config"),
    ));

    let lifetimes = ca::Lifetimes {
        default: config.cert_ttl,
        max: config.max_cert_ttl,
    };
    let ca = ca::CertificateService::new(
        authority.clone(),
        tokens,
        ca::PodPlacement(store.clone()),
        &config.trust_domain,
        lifetimes,
    );
    let xds = xds::Server::new(&publisher, xds_metrics);
    let plaintext = grpc::bind(config.xds_plaintext_addr, "xds-plaintext").await?;
    let tls = grpc::bind(config.xds_addr, "xds-tls").await?;
    let serving = Arc::new(grpc::serving_config(
        &authority,
        &config.trust_domain,
        &config.dns_names,
    )?);
    lifecycle.spawn(grpc::serve_plaintext(
        grpc::router(xds.clone(), ca.clone()),
        plaintext,
        lifecycle.watch(),
    ));
    lifecycle.spawn(grpc::serve_tls(grpc::router(xds, ca), tls, serving, lifecycle.watch()));

    lifecycle
        .serve_endpoints(&config.endpoints(), Routes::new(), log, registry, readiness)
        .await?;
    lifecycle.run(signals, config.drain_deadline).await;
    Ok(())
}
