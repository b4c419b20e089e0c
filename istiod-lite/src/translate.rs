//! Pure translation from a snapshot of objects to the resources ztunnel consumes, following Istio
//! ambient: workloads and services (`istio.workload.Address`) and L4 policies
//! (`istio.security.Authorization`). No I/O: every rule is tested with plain fixtures.

pub mod authorization;
pub mod l7;
pub mod routes;
pub mod services;
pub mod waypoints;
pub mod workloads;

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::proto::workload::{Address, Service, Workload, address};
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, HTTP_ROUTE_TYPE_URL, L7_POLICY_TYPE_URL};

use crate::store::Objects;
use crate::xds::Resource;

/// Mesh-wide settings the translation needs.
#[derive(Clone, Debug)]
pub struct Mesh {
    /// Prefix of workload uids (`<cluster>//Pod/<ns>/<name>`); Istio's default is `Kubernetes`.
    pub cluster_id: String,
    pub trust_domain: String,
    /// Service hostnames are `<name>.<ns>.svc.<domain_suffix>`.
    pub domain_suffix: String,
    /// Policies here without a selector apply mesh-wide.
    pub root_namespace: String,
    pub network: String,
    /// A pod speaks HBONE only once its node agent has annotated it
    /// `ambient.istio.io/redirection: enabled` (on Kubernetes, where that agent runs): no peer
    /// ever tunnels to a pod whose capture is not in place yet.
    pub require_redirection: bool,
}

impl Default for Mesh {
    fn default() -> Self {
        Self {
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            network: String::new(),
            require_redirection: false,
        }
    }
}

/// Something a user should know about how an object was translated (a policy partly applied,
/// a waypoint that does not exist, a value that was ignored).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Report {
    /// `Kind/namespace/name` of the object.
    pub object: String,
    pub message: String,
}

/// Everything translated from one snapshot.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub authorizations: Vec<mesh_core::proto::security::Authorization>,
    /// HTTPRoutes attached to services, for waypoints.
    pub http_routes: Vec<mesh_core::proto::waypoint::HttpRoute>,
    /// AuthorizationPolicies with targetRefs, for waypoints.
    pub l7_policies: Vec<mesh_core::proto::waypoint::L7Policy>,
    pub reports: Vec<Report>,
}

impl Translation {
    /// The xDS resources, by type URL, with Istio's resource names: a workload's uid,
    /// `<ns>/<hostname>` for a service, `<ns>/<name>` for a policy.
    pub fn resources(&self) -> Vec<(String, Vec<Resource>)> {
        let workloads = self.workloads.iter().map(|w| {
            let address = Address {
                r#type: Some(address::Type::Workload(w.clone())),
            };
            Resource::new(ADDRESS_TYPE_URL, w.uid.clone(), &address)
        });
        let services = self.services.iter().map(|s| {
            let address = Address {
                r#type: Some(address::Type::Service(s.clone())),
            };
            Resource::new(ADDRESS_TYPE_URL, format!("{}/{}", s.namespace, s.hostname), &address)
        });
        let authorizations = self
            .authorizations
            .iter()
            .map(|a| Resource::new(AUTHORIZATION_TYPE_URL, format!("{}/{}", a.namespace, a.name), a))
            .collect();
        let http_routes = self
            .http_routes
            .iter()
            .map(|r| Resource::new(HTTP_ROUTE_TYPE_URL, format!("{}/{}", r.namespace, r.name), r))
            .collect();
        let l7_policies = self
            .l7_policies
            .iter()
            .map(|p| Resource::new(L7_POLICY_TYPE_URL, format!("{}/{}", p.namespace, p.name), p))
            .collect();
        vec![
            (ADDRESS_TYPE_URL.to_owned(), workloads.chain(services).collect()),
            (AUTHORIZATION_TYPE_URL.to_owned(), authorizations),
            (HTTP_ROUTE_TYPE_URL.to_owned(), http_routes),
            (L7_POLICY_TYPE_URL.to_owned(), l7_policies),
        ]
    }
}

/// Translates a whole snapshot.
pub fn translate(objects: &Objects, mesh: &Mesh) -> Translation {
    let mut reports = Vec::new();
    let waypoints = waypoints::Waypoints::index(objects, mesh);
    let policies = authorization::translate(objects, mesh, &mut reports);
    let mut services = services::from_kubernetes(objects, mesh, &waypoints, &mut reports);
    let (entry_services, entry_workloads) = services::from_service_entries(objects, mesh, &mut reports);
    services.extend(entry_services);
    let mut workloads = workloads::from_pods(objects, mesh, &waypoints, &policies, &mut reports);
    workloads.extend(workloads::from_workload_entries(
        objects,
        mesh,
        &waypoints,
        &policies,
        &mut reports,
    ));
    workloads.extend(entry_workloads);
    let http_routes = routes::translate(objects, mesh, &mut reports);
    let l7_policies = l7::translate(objects, &mut reports);
    reports.sort();
    reports.dedup();
    Translation {
        workloads,
        services,
        authorizations: policies.resources,
        http_routes,
        l7_policies,
        reports,
    }
}

/// Whether every label of `selector` is on `labels` (an empty selector matches everything).
pub(crate) fn selector_matches(selector: &BTreeMap<String, String>, labels: Option<&BTreeMap<String, String>>) -> bool {
    selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// An IP address as the raw bytes the protos carry (4 or 16).
pub(crate) fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub(crate) fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.and_then(|l| l.get(key)).map(String::as_str)
}
