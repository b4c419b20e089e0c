//! Istio's TCP metrics, with Istio's names and labels, so dashboards built for upstream ztunnel
//! work unchanged. Bytes are counted as they flow, so long-lived connections show up before they end.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use mesh_core::proto::workload::Workload;

/// Which end of the connection reports.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

/// Envoy's response flags, as ztunnel reports them.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    #[default]
    None,
    /// An authorization policy refused the connection.
    Denied,
    /// The next hop could not be reached.
    ConnectFailure,
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let text = match self {
            Self::None => "-",
            Self::Denied => "DENY",
            Self::ConnectFailure => "CONNECT",
        };
        EncodeLabelValue::encode(&text, encoder)
    }
}

/// `mutual_tls` over HBONE, `unknown` for plaintext (Istio's values).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    Unknown,
}

impl EncodeLabelValue for SecurityPolicy {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let text = match self {
            Self::MutualTls => "mutual_tls",
            Self::Unknown => "unknown",
        };
        EncodeLabelValue::encode(&text, encoder)
    }
}

/// The labels of one connection; `unknown` where a side is not a known workload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

const UNKNOWN: &str = "unknown";

fn or_unknown(value: &str) -> String {
    if value.is_empty() { UNKNOWN } else { value }.to_owned()
}

/// One side of a connection, as the labels describe it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer<'a> {
    pub workload: Option<&'a Workload>,
    /// `spiffe://…`; Istio's label drops nothing, so the full URI is kept.
    pub principal: Option<&'a str>,
}

/// The service a connection was addressed to, when it was a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServiceLabel<'a> {
    pub hostname: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

impl TcpLabels {
    pub fn new(
        reporter: Reporter,
        source: Peer<'_>,
        destination: Peer<'_>,
        service: Option<ServiceLabel<'_>>,
        security: SecurityPolicy,
    ) -> Self {
        let field = |peer: &Peer<'_>, get: fn(&Workload) -> &str| or_unknown(peer.workload.map(get).unwrap_or(""));
        fn workload_name(w: &Workload) -> &str {
            if w.workload_name.is_empty() {
                &w.name
            } else {
                &w.workload_name
            }
        }
        let service = service.unwrap_or_default();
        Self {
            reporter,
            source_workload: field(&source, workload_name),
            source_canonical_service: field(&source, |w| &w.canonical_name),
            source_canonical_revision: field(&source, |w| &w.canonical_revision),
            source_workload_namespace: field(&source, |w| &w.namespace),
            source_principal: or_unknown(source.principal.unwrap_or("")),
            source_cluster: field(&source, |w| &w.cluster_id),
            destination_service: or_unknown(service.hostname),
            destination_service_namespace: or_unknown(service.namespace),
            destination_service_name: or_unknown(service.name),
            destination_workload: field(&destination, workload_name),
            destination_canonical_service: field(&destination, |w| &w.canonical_name),
            destination_canonical_revision: field(&destination, |w| &w.canonical_revision),
            destination_workload_namespace: field(&destination, |w| &w.namespace),
            destination_principal: or_unknown(destination.principal.unwrap_or("")),
            destination_cluster: field(&destination, |w| &w.cluster_id),
            request_protocol: "tcp",
            response_flags: ResponseFlags::None,
            connection_security_policy: security,
        }
    }
}

/// The four TCP families.
#[derive(Clone, Debug, Default)]
pub struct TcpMetrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    /// Bytes toward the client (the response direction), as Istio defines "sent".
    pub sent: Family<TcpLabels, Counter>,
    /// Bytes from the client (the request direction).
    pub received: Family<TcpLabels, Counter>,
}

impl TcpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "istio_tcp_connections_opened",
            "Connections opened",
            metrics.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Connections closed",
            metrics.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent toward the client during a connection",
            metrics.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client during a connection",
            metrics.received.clone(),
        );
        metrics
    }
}
