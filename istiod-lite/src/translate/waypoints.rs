//! Waypoints: a Gateway of class `istio-waypoint` is one; `istio.io/use-waypoint` on a pod or
//! service (else on its namespace) binds traffic to it, `none` opts out; `istio.io/waypoint-for`
//! on the Gateway says whether it serves services, workloads, both or neither.

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::proto::workload::{GatewayAddress, NamespacedHostname, NetworkAddress, gateway_address};

use super::{Mesh, Report, ip_bytes, label};
use crate::store::Objects;

pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// On a waypoint's own pods: they never go through a waypoint themselves.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Waypoints are reached over HBONE on this port.
pub const HBONE_PORT: u32 = 15008;

/// What traffic a waypoint handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("service") {
            "service" => Ok(Self::Service),
            "workload" => Ok(Self::Workload),
            "all" => Ok(Self::All),
            "none" => Ok(Self::None),
            other => Err(format!(
                "{WAYPOINT_FOR}={other:?} is not one of service, workload, all, none; using service"
            )),
        }
    }

    pub fn serves_services(self) -> bool {
        matches!(self, Self::Service | Self::All)
    }

    pub fn serves_workloads(self) -> bool {
        matches!(self, Self::Workload | Self::All)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Waypoint {
    pub address: GatewayAddress,
    pub serves: WaypointFor,
}

/// Every waypoint, by namespace and name.
#[derive(Clone, Debug, Default)]
pub struct Waypoints {
    by_name: BTreeMap<(String, String), Waypoint>,
}

impl Waypoints {
    pub fn index(objects: &Objects, mesh: &Mesh) -> Self {
        let by_name = objects
            .gateways()
            .filter(|gateway| gateway.spec.gateway_class_name == WAYPOINT_CLASS)
            .map(|gateway| {
                let namespace = gateway.metadata.namespace.clone().unwrap_or_default();
                let name = gateway.metadata.name.clone().unwrap_or_default();
                let serves = WaypointFor::parse(label(gateway.metadata.labels.as_ref(), WAYPOINT_FOR))
                    .unwrap_or(WaypointFor::Service);
                let status = gateway
                    .status
                    .as_ref()
                    .map(|s| s.addresses.as_slice())
                    .unwrap_or_default();
                let address = address(status, &namespace, &name, mesh);
                ((namespace, name), Waypoint { address, serves })
            })
            .collect();
        Self { by_name }
    }

    /// Reports `istio.io/waypoint-for` values that are not understood.
    pub fn check(objects: &Objects, reports: &mut Vec<Report>) {
        for gateway in objects
            .gateways()
            .filter(|g| g.spec.gateway_class_name == WAYPOINT_CLASS)
        {
            if let Err(message) = WaypointFor::parse(label(gateway.metadata.labels.as_ref(), WAYPOINT_FOR)) {
                let meta = &gateway.metadata;
                reports.push(Report {
                    object: format!(
                        "Gateway/{}/{}",
                        meta.namespace.as_deref().unwrap_or_default(),
                        meta.name.as_deref().unwrap_or_default()
                    ),
                    message,
                });
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The waypoint an object binds to: its own `use-waypoint` label wins, else its namespace's.
    /// `none` opts out; a name with no such waypoint binds to nothing (no fallback) and is reported.
    pub fn bound(
        &self,
        objects: &Objects,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
        object: &str,
        reports: &mut Vec<Report>,
    ) -> Option<&Waypoint> {
        let (source, labels) = match label(labels, USE_WAYPOINT) {
            Some(_) => (object.to_owned(), labels),
            None => {
                let namespace_labels = objects.namespace(namespace)?.metadata.labels.as_ref();
                label(namespace_labels, USE_WAYPOINT)?;
                (format!("Namespace/{namespace}"), namespace_labels)
            }
        };
        let name = label(labels, USE_WAYPOINT)?;
        if name == "none" {
            return None;
        }
        let waypoint_namespace = label(labels, USE_WAYPOINT_NAMESPACE).unwrap_or(namespace);
        let found = self.by_name.get(&(waypoint_namespace.to_owned(), name.to_owned()));
        if found.is_none() {
            reports.push(Report {
                object: source,
                message: format!("{USE_WAYPOINT}={name}: no Gateway of class {WAYPOINT_CLASS} named {waypoint_namespace}/{name}; traffic is not sent to a waypoint"),
            });
        }
        found
    }

    /// Whether a Service is a waypoint's own (such a service never goes through a waypoint).
    pub fn is_waypoint_service(&self, namespace: &str, name: &str) -> bool {
        self.by_name.contains_key(&(namespace.to_owned(), name.to_owned()))
    }
}

/// The address ztunnels send a waypoint's traffic to: the Gateway's status address when it has
/// one, else the Service a waypoint deployment gets (`<name>.<ns>.svc.<suffix>`), port 15008.
fn address(
    status: &[crate::objects::gateway::GatewayAddress],
    namespace: &str,
    name: &str,
    mesh: &Mesh,
) -> GatewayAddress {
    let hostname = |hostname: String| {
        gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: namespace.to_owned(),
            hostname,
        })
    };
    let from_status = status.iter().find_map(|a| match a.kind.as_deref() {
        Some("Hostname") => Some(hostname(a.value.clone())),
        None | Some("IPAddress") => a.value.parse::<IpAddr>().ok().map(|ip| {
            gateway_address::Destination::Address(NetworkAddress {
                network: mesh.network.clone(),
                address: ip_bytes(ip),
            })
        }),
        _ => None,
    });
    let destination = from_status.unwrap_or_else(|| hostname(format!("{name}.{namespace}.svc.{}", mesh.domain_suffix)));
    GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: HBONE_PORT,
    }
}
