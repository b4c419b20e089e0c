//! ztunnel: the per-node proxy. xDS feeds [`state`]; [`certificates`] holds each local identity's
//! certificate; [`inpod`] takes the pods the node agent hands over ZDS and [`listeners`] serves
//! them; [`proxy`] carries connections both ways; [`socks5`] lets unredirected apps send outbound.

pub mod config;
pub mod config_dump;
pub mod inpod;
pub mod listeners;
pub mod proxy;
pub mod redirect;
pub mod socks5;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use mesh_core::admin::{Readiness, Routes, text};
use mesh_core::hbone::{Pool, PoolConfig};
use mesh_core::lifecycle::{Lifecycle, Signals};
use mesh_core::net::Connector;
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_core::telemetry::LogHandle;
use mesh_core::xds;
use prometheus_client::registry::Registry;
use tracing::info;

pub use config::Config;

use crate::proxy::Context;
use crate::proxy::metrics::TcpMetrics;
use crate::redirect::{PodSockets, RedirectMode};
use mesh_core::certificates::{CertificateManager, Retry};
use mesh_core::state::{State, StateHandler};

/// Runs ztunnel until SIGTERM, SIGINT or `/quitquitquit`, then drains.
pub async fn run(config: Arc<Config>, signals: Signals, log: LogHandle) -> anyhow::Result<()> {
    let control = config.control.connect()?;

    let mut registry = Registry::default();
    let readiness = Readiness::new();
    let mut lifecycle = Lifecycle::new();
    let state = Arc::new(RwLock::new(State::default()));
    let (handler, changes) = StateHandler::new(state.clone());

    let node = mesh_core::control::node("ztunnel", &config.node_name, &config.node_name);
    let client = xds::Client::new(
        control.xds,
        node,
        &[ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL],
        xds::Backoff::default(),
        handler,
    );
    lifecycle.spawn(client.run(Some(readiness.register("xds"))));

    let ca = control.ca;
    let mut context = Context::new(
        state,
        CertificateManager::new(ca, Retry::default()),
        &config.node_name,
        &config.network,
    );
    context.metrics = TcpMetrics::register(&mut registry);
    context.admission = Arc::new(mesh_core::hbone::Admission::new(config.hbone.limits()));
    context.admission.register(&mut registry);
    let pod_sockets = (config.redirect == RedirectMode::Inpod).then(|| Arc::new(PodSockets::new(config.mark())));
    context.sockets = match &pod_sockets {
        Some(pods) => pods.clone(),
        None => Connector { mark: config.mark() }.shared(),
    };
    let context = Arc::new(context);
    let watch = lifecycle.watch();
    let tracking = context.clone();
    lifecycle.spawn(async move { tracking.track_in_flight(watch).await });
    let pool = Pool::new(PoolConfig {
        sockets: context.sockets.clone(),
        ..PoolConfig::default()
    });
    let outbound = Arc::new(proxy::outbound::Outbound::new(context.clone(), pool));
    match pod_sockets {
        None => lifecycle.spawn(listeners::manage(
            context.clone(),
            outbound.clone(),
            changes,
            lifecycle.watch(),
            Some(readiness.register("certificates")),
        )),
        Some(sockets) => {
            let inpod = inpod::Inpod {
                context: context.clone(),
                outbound: outbound.clone(),
                sockets,
                socket: config.zds_socket.clone(),
                trust_domain: config.trust_domain.clone(),
            };
            lifecycle.spawn(inpod.run(lifecycle.watch(), Some(readiness.register("node-agent"))));
            lifecycle.spawn(listeners::follow_policies(context.clone(), changes));
        }
    }

    if let Some(address) = config.socks5_addr {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("--socks5-addr {address}"))?;
        info!(server = "socks5", address = %listener.local_addr()?, "listening");
        lifecycle.spawn(socks5::serve(listener, outbound));
    }

    let dump_context = context.clone();
    let admin = Routes::new().route("/config_dump", move |_| {
        let body = serde_json::to_string_pretty(&config_dump::dump(&dump_context)).unwrap_or_default();
        let mut response = text(http::StatusCode::OK, body + "\n");
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    });
    lifecycle
        .serve_endpoints(&config.endpoints(), admin, log, registry, readiness)
        .await?;
    info!(node = %config.node_name, xds = %config.control.xds_address, "ztunnel started");
    lifecycle.run(signals, config.drain_deadline.max(Duration::ZERO)).await;
    Ok(())
}
