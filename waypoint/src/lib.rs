//! waypoint: the per-namespace L7 proxy. It follows the mesh over xDS ([`mesh_core::state`]),
//! holds a certificate for its own identity, serves HBONE, and runs each CONNECT stream through
//! [`proxy`]: HTTP requests are routed by [`route`] (HTTPRoute) and sent over HBONE to an
//! endpoint; other bytes are carried as TCP. Request metrics in [`metrics`].

pub mod authz;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod route;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use mesh_core::admin::{Readiness, Routes};
use mesh_core::certificates::{CertificateManager, CertificateSource, Retry};
use mesh_core::hbone::{Server, ServerCertificates};
use mesh_core::identity::{SpiffeId, tls};
use mesh_core::lifecycle::{Lifecycle, Signals};
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, HTTP_ROUTE_TYPE_URL, L7_POLICY_TYPE_URL};
use mesh_core::state::{State, StateHandler};
use mesh_core::telemetry::LogHandle;
use mesh_core::xds::{self, Handler, Rejection, Update};
use prometheus_client::registry::Registry;
use tracing::info;

pub use config::Config;

use crate::authz::PolicyStore;
use crate::metrics::RequestMetrics;
use crate::proxy::Waypoint;
use crate::route::config::RouteStore;

/// What xDS delivers: workloads, services and L4 policies into the state, HttpRoutes into the
/// route tables.
struct ConfigHandler {
    state: StateHandler,
    routes: RouteStore,
    policies: PolicyStore,
}

impl Handler for ConfigHandler {
    fn apply(&mut self, type_url: &str, updates: Vec<Update>, removed: Vec<String>) -> Vec<Rejection> {
        match type_url {
            HTTP_ROUTE_TYPE_URL => self.routes.apply(updates, removed),
            L7_POLICY_TYPE_URL => self.policies.apply(updates, removed),
            _ => self.state.apply(type_url, updates, removed),
        }
    }
}

/// The waypoint's own certificate for every HBONE connection.
struct OwnCertificate<S> {
    certificates: Arc<CertificateManager<S>>,
    identity: SpiffeId,
}

impl<S: CertificateSource> ServerCertificates for OwnCertificate<S> {
    async fn server_config(
        &self,
        _local: SocketAddr,
    ) -> Result<Arc<rustls::ServerConfig>, Box<dyn std::error::Error + Send + Sync>> {
        let certificate = self.certificates.get(&self.identity).await?;
        Ok(Arc::new(tls::server_config(&certificate)?))
    }
}

/// Runs the waypoint until SIGTERM, SIGINT or `/quitquitquit`, then drains.
pub async fn run(config: Arc<Config>, signals: Signals, log: LogHandle) -> anyhow::Result<()> {
    let identity = config.identity()?;
    let control = config.control.connect()?;
    let mut registry = Registry::default();
    let readiness = Readiness::new();
    let mut lifecycle = Lifecycle::new();

    let state = Arc::new(RwLock::new(State::default()));
    let (state_handler, _changes) = StateHandler::new(state.clone());
    let tables = route::config::Tables::default();
    let policies = authz::Policies::default();
    let handler = ConfigHandler {
        state: state_handler,
        routes: RouteStore::new(tables.clone()),
        policies: PolicyStore::new(policies.clone()),
    };
    let node = mesh_core::control::node(
        "waypoint",
        &format!("{}.{}", config.gateway, config.namespace),
        &config.node_name,
    );
    let client = xds::Client::new(
        control.xds,
        node,
        &[
            ADDRESS_TYPE_URL,
            AUTHORIZATION_TYPE_URL,
            HTTP_ROUTE_TYPE_URL,
            L7_POLICY_TYPE_URL,
        ],
        xds::Backoff::default(),
        handler,
    );
    lifecycle.spawn(client.run(Some(readiness.register("xds"))));

    let certificates = CertificateManager::new(control.ca, Retry::default());
    let certificate_ready = readiness.register("certificate");
    let (prefetch, own) = (certificates.clone(), identity.clone());
    lifecycle.spawn(async move {
        if prefetch.get(&own).await.is_ok() {
            drop(certificate_ready);
        }
        prefetch.prefetch(&own);
    });

    let metrics = RequestMetrics::register(&mut registry);
    let gateway = format!("Gateway/{}/{}", config.namespace, config.gateway);
    let waypoint = Arc::new(Waypoint::new(
        state,
        (tables, policies),
        gateway,
        certificates.clone(),
        identity.clone(),
        &config.network,
        metrics,
    ));
    let listener = tokio::net::TcpListener::bind(config.hbone_addr)
        .await
        .map_err(|e| anyhow::anyhow!("--hbone-addr {}: {e}", config.hbone_addr))?;
    info!(server = "hbone", address = %listener.local_addr()?, %identity, "listening");
    let server = Server::new(OwnCertificate { certificates, identity });
    let handler = move |request| waypoint.clone().handle(request);
    lifecycle.spawn(server.serve(listener, handler, lifecycle.watch()));

    lifecycle
        .serve_endpoints(&config.endpoints(), Routes::new(), log, registry, readiness)
        .await?;
    lifecycle.run(signals, config.drain_deadline).await;
    Ok(())
}
