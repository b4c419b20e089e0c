//! xDS server metrics.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, HTTP_ROUTE_TYPE_URL, L7_POLICY_TYPE_URL};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ResourceType {
    Address,
    Authorization,
    HttpRoute,
    L7Policy,
    Other,
}

impl ResourceType {
    pub fn of(type_url: &str) -> Self {
        match type_url {
            ADDRESS_TYPE_URL => Self::Address,
            AUTHORIZATION_TYPE_URL => Self::Authorization,
            HTTP_ROUTE_TYPE_URL => Self::HttpRoute,
            L7_POLICY_TYPE_URL => Self::L7Policy,
            _ => Self::Other,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub r#type: ResourceType,
}

#[derive(Debug)]
pub struct Metrics {
    pub pushes: Family<TypeLabels, Counter>,
    pub nacks: Family<TypeLabels, Counter>,
    pub clients: Gauge,
    pub push_latency: Histogram,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            pushes: Family::default(),
            nacks: Family::default(),
            clients: Gauge::default(),
            // 1 ms .. ~16 s
            push_latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        };
        let registry = registry.sub_registry_with_prefix("istiod_xds");
        registry.register(
            "pushes",
            "Delta xDS responses sent, by resource type",
            metrics.pushes.clone(),
        );
        registry.register(
            "nacks",
            "Delta xDS responses rejected by clients",
            metrics.nacks.clone(),
        );
        registry.register(
            "connected_clients",
            "Connected delta xDS clients",
            metrics.clients.clone(),
        );
        registry.register(
            "push_latency_seconds",
            "Time from a configuration change to its push to a client",
            metrics.push_latency.clone(),
        );
        metrics
    }
}
