//! istiod-lite: the controller and CA of the mesh. Configuration flows one way:
//! source (files | kube) → [`store`] → pure [`translate`] → [`xds`] server; the [`ca`] signs
//! workload certificates for the node agents that run them.

pub mod auth;
pub mod ca;
pub mod config;
pub mod controller;
pub mod deployment;
pub mod grpc;
pub mod leader;
pub mod objects;
pub mod root_cert;
pub mod source;
pub mod store;
pub mod translate;
pub mod xds;

use std::sync::Arc;

use mesh_core::admin::{Readiness, Routes};
use mesh_core::lifecycle::{Lifecycle, Signals};
use mesh_core::telemetry::LogHandle;
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
    let files_metrics = source::files::Metrics::new(&mut registry);

    let kube = match config.kubernetes {
        true => {
            Some(source::kubernetes::client(config.kubeconfig.as_deref()).await.map_err(
                |e| match &config.kubeconfig {
                    Some(path) => anyhow::anyhow!("--kubeconfig {}: {e}", path.display()),
                    None => anyhow::anyhow!("--kubernetes: no in-cluster config and no usable kubeconfig: {e}"),
                },
            )?)
        }
        false => None,
    };

    let authority = Arc::new(load_authority(&config, kube.clone()).await?);
    let mut authenticators: Vec<Arc<dyn auth::Authenticator>> = Vec::new();
    if let Some(dir) = &config.node_tokens_dir {
        let tokens = auth::NodeTokens::load(dir)?;
        info!(nodes = tokens.len(), "node tokens loaded");
        authenticators.push(Arc::new(tokens));
    }
    if let Some(client) = &kube {
        info!(audiences = ?config.token_audiences, "service-account tokens checked with TokenReview");
        authenticators.push(Arc::new(auth::TokenReviewer::new(
            client.clone(),
            config.token_audiences.clone(),
        )));
    }
    if authenticators.is_empty() {
        warn!("neither --node-tokens-dir nor --kubernetes: the CA and xDS on the TLS port refuse every caller");
    }
    let authenticators = auth::Authenticators::new(authenticators);

    let store = Arc::new(store::Store::new());
    let publisher = Arc::new(xds::Publisher::new());
    if let Some(dir) = &config.config_dir {
        let watching = source::files::load(dir, store.clone(), files_metrics)
            .map_err(|e| anyhow::anyhow!("--config-dir {}: {e}", dir.display()))?;
        lifecycle.spawn(watching.run());
    }
    let (synced, kubernetes_synced) = tokio::sync::oneshot::channel();
    match &kube {
        Some(client) => lifecycle.spawn(source::kubernetes::run(client.clone(), store.clone(), synced)),
        None => drop(synced.send(())),
    }
    let translating = readiness.register("config");
    let (objects, mesh) = (store.subscribe(), config.mesh());
    let translator = publisher.clone();
    lifecycle.spawn(async move {
        // The first publication waits for every source, so no client ever sees half a cluster.
        if kubernetes_synced.await.is_ok() {
            controller::run(objects, translator, mesh, translating).await;
        }
    });
    if let Some(client) = &kube {
        let (leading, elected) = tokio::sync::watch::channel(false);
        lifecycle.spawn(leader::run(client.clone(), config.lease(), leading));
        let root = authority.pem().root_cert.clone();
        lifecycle.spawn(root_cert::run(
            client.clone(),
            root,
            config.deployment().field_manager,
            elected.clone(),
        ));
        lifecycle.spawn(deployment::run(client.clone(), config.deployment(), elected));
    }

    let lifetimes = ca::Lifetimes {
        default: config.cert_ttl,
        max: config.max_cert_ttl,
    };
    let ca = ca::CertificateService::new(
        authority.clone(),
        authenticators.clone(),
        ca::PodPlacement(store.clone()),
        &config.trust_domain,
        lifetimes,
    )
    .with_trusted_node_accounts(config.trusted_node_accounts.clone());
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
    lifecycle.spawn(grpc::serve_tls(
        grpc::router(xds.authenticated(authenticators), ca),
        tls,
        serving,
        lifecycle.watch(),
    ));

    lifecycle
        .serve_endpoints(&config.endpoints(), Routes::new(), log, registry, readiness)
        .await?;
    lifecycle.run(signals, config.drain_deadline).await;
    Ok(())
}

/// The CA from --ca-dir, or (with --kubernetes and no --ca-dir) from the system namespace's Secrets.
async fn load_authority(config: &Config, kube: Option<kube::Client>) -> anyhow::Result<mesh_core::identity::Authority> {
    if let Some(dir) = config.ca_dir() {
        let (authority, origin) = ca::files::load_or_create(&dir, &config.trust_domain)?;
        info!(dir = %dir.display(), ?origin, trust_domain = %config.trust_domain, "CA ready");
        return Ok(authority);
    }
    let client = kube.expect("ca_dir() is None only with --kubernetes");
    let (authority, origin, secret) =
        ca::secret::load_or_create(client, &config.system_namespace, &config.trust_domain).await?;
    info!(secret = %format!("{}/{secret}", config.system_namespace), ?origin, trust_domain = %config.trust_domain, "CA ready");
    Ok(authority)
}
