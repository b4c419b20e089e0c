//! `mesh-node-agent`: answers the plugin on the CNI socket ([`server`]), enrols and releases
//! pods ([`enrol`]), learns about them from a [`source`], and serves ztunnel over ZDS ([`zds`]).
//!
//! The agent is its own process, not a ztunnel role: it outlives every ztunnel restart and
//! upgrade, holding each enrolled pod's network namespace (an open descriptor) so that whichever
//! ztunnel connects next gets them all in its snapshot. Pods are enrolled one at a time (the pod
//! table's lock is held from the choice of ztunnel to its acknowledgement, and while a new ztunnel
//! takes its snapshot), so every pod reaches the ztunnel that will serve it.

pub mod enrol;
pub mod server;
pub mod source;
pub mod state;
pub mod zds;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use mesh_core::admin::{Readiness, Routes};
use mesh_core::lifecycle::{Lifecycle, Signals};
use mesh_core::netns::NetNs;
use mesh_core::telemetry::LogHandle;
use mesh_core::zds::WorkloadInfo;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Mutex;
use tracing::info;

use crate::Config;
use source::Source;
use zds::Ztunnels;

/// A pod the agent enrolled: ztunnel was given it and acknowledged.
#[derive(Debug)]
pub struct HeldPod {
    /// The uid ztunnel knows it by (`K8S_POD_UID`, as Istio's agent sends).
    pub uid: String,
    /// The sandbox whose ADD enrolled it (`CNI_CONTAINERID`).
    pub container_id: String,
    pub netns: Arc<NetNs>,
    pub info: WorkloadInfo,
}

/// Held pods by uid.
pub type Pods = BTreeMap<String, HeldPod>;

impl Agent {
    /// Records a change of the held pods: the gauge and the state file.
    pub async fn held_changed(&self, pods: &Pods) {
        self.metrics.pods.set(pods.len() as i64);
        state::save(&self.config.state_file, pods).await;
    }
}

/// The running agent.
#[derive(Debug)]
pub struct Agent {
    pub config: Arc<Config>,
    pub source: Source,
    pub pods: Mutex<Pods>,
    pub ztunnels: Ztunnels,
    pub metrics: Metrics,
}

/// What the agent counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connected ztunnels.
    pub ztunnels: Gauge,
    /// Pods held.
    pub pods: Gauge,
    /// Plugin requests by command and outcome.
    pub requests: Family<RequestLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub command: Command,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Command {
    Add,
    Del,
    Check,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    Captured,
    Skipped,
    Released,
    Failed,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix("mesh_cni");
        registry.register(
            "ztunnel_connections",
            "ztunnels connected over ZDS",
            metrics.ztunnels.clone(),
        );
        registry.register(
            "pods_enrolled",
            "pods whose network namespace the agent holds",
            metrics.pods.clone(),
        );
        registry.register("requests", "requests of the mesh-cni plugin", metrics.requests.clone());
        metrics
    }
}

/// Runs the agent until SIGTERM, SIGINT or `/quitquitquit`. The capture rules stay in the pods
/// when it stops: without an agent or ztunnel their connections are refused, never let through.
pub async fn run(config: Arc<Config>, signals: Signals, log: LogHandle) -> anyhow::Result<()> {
    let source = match &config.config_dir {
        Some(dir) => Source::Files(source::files::Files::new(dir)),
        None => Source::Kubernetes(
            source::kubernetes::Kubernetes::connect(config.kubeconfig.as_deref())
                .await
                .context("--kubernetes: no Kubernetes client")?,
        ),
    };
    let held = {
        let (path, mark) = (config.state_file.clone(), config.mark);
        tokio::task::spawn_blocking(move || state::load(&path, mark)).await?
    };
    info!(pods = held.len(), file = %config.state_file.display(), "held pods of the previous run");
    let mut registry = Registry::default();
    let readiness = Readiness::new();
    let listening = readiness.register("sockets");
    let mut lifecycle = Lifecycle::new();
    let agent = Arc::new(Agent {
        source,
        pods: Mutex::new(held),
        ztunnels: Ztunnels::new(config.zds_socket.clone(), config.ack_timeout),
        metrics: Metrics::register(&mut registry),
        config: config.clone(),
    });
    agent.metrics.pods.set(agent.pods.lock().await.len() as i64);

    let zds_listener = mesh_core::zds::Listener::bind(&config.zds_socket).context("--zds-socket")?;
    info!(server = "zds", socket = %config.zds_socket.display(), "listening");
    lifecycle.spawn(zds::serve(zds_listener, agent.clone(), lifecycle.watch()));
    let cni_listener = server::bind(&config.cni_socket).context("--cni-socket")?;
    info!(server = "cni", socket = %config.cni_socket.display(), "listening");
    lifecycle.spawn(server::serve(cni_listener, agent.clone(), lifecycle.watch()));
    drop(listening);

    lifecycle
        .serve_endpoints(&config.endpoints(), Routes::new(), log, registry, readiness)
        .await?;
    info!(
        source = if config.kubernetes { "kubernetes" } else { "config-dir" },
        "mesh-node-agent started"
    );
    lifecycle.run(signals, Duration::from_secs(5)).await;
    Ok(())
}
