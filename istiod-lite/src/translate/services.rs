//! Services from Kubernetes Services (cluster IPs, ports, waypoint) and from ServiceEntries (one
//! per host, with the workloads of their inline endpoints).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::proto::workload::{
    IpFamilies, LoadBalancing, NetworkAddress, Port, PortList, Service, Workload, WorkloadStatus, load_balancing,
};

use super::waypoints::Waypoints;
use super::{Mesh, Report, ip_bytes};
use crate::objects::istio::{ServiceEntry, ServiceEntryPort};
use crate::store::Objects;

/// `<name>.<namespace>.svc.<suffix>`
pub fn hostname(name: &str, namespace: &str, mesh: &Mesh) -> String {
    format!("{name}.{namespace}.svc.{}", mesh.domain_suffix)
}

/// Services from Kubernetes Services (ExternalName services have no address and are skipped).
pub fn from_kubernetes(
    objects: &Objects,
    mesh: &Mesh,
    waypoints: &Waypoints,
    reports: &mut Vec<Report>,
) -> Vec<Service> {
    let mut services = Vec::new();
    for service in objects.services() {
        let Some(spec) = &service.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        let name = service.metadata.name.clone().unwrap_or_default();
        let object = format!("Service/{namespace}/{name}");
        let cluster_ips = spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default();
        let mut addresses = Vec::new();
        for ip in cluster_ips.iter().filter(|ip| !ip.is_empty() && *ip != "None") {
            match ip.parse::<IpAddr>() {
                Ok(ip) => addresses.push(NetworkAddress {
                    network: mesh.network.clone(),
                    address: ip_bytes(ip),
                }),
                Err(_) => reports.push(Report {
                    object: object.clone(),
                    message: format!("clusterIP {ip:?} is not an IP address; ignored"),
                }),
            }
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .map(|p| Port {
                service_port: u32::try_from(p.port).unwrap_or_default(),
                // A named target port is resolved per workload; the service carries 0.
                target_port: match &p.target_port {
                    None => u32::try_from(p.port).unwrap_or_default(),
                    Some(IntOrString::Int(port)) => u32::try_from(*port).unwrap_or_default(),
                    Some(IntOrString::String(_)) => 0,
                },
                ..Default::default()
            })
            .collect();
        let waypoint = if waypoints.is_waypoint_service(&namespace, &name) {
            None
        } else {
            waypoints
                .bound(objects, &namespace, service.metadata.labels.as_ref(), &object, reports)
                .filter(|w| w.serves.serves_services())
                .map(|w| w.address.clone())
        };
        services.push(Service {
            hostname: hostname(&name, &namespace, mesh),
            name,
            namespace,
            addresses,
            ports,
            waypoint,
            load_balancing: load_balancing(spec),
            ip_families: ip_families(spec.ip_families.as_deref().unwrap_or_default()) as i32,
            ..Default::default()
        });
    }
    services
}

fn load_balancing(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Option<LoadBalancing> {
    use load_balancing::{HealthPolicy, Mode, Scope};
    let mut lb = LoadBalancing::default();
    if spec.traffic_distribution.as_deref() == Some("PreferClose") {
        lb.routing_preference = [Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone]
            .map(|s| s as i32)
            .to_vec();
        lb.mode = Mode::Failover as i32;
    }
    if spec.internal_traffic_policy.as_deref() == Some("Local") {
        lb.routing_preference = vec![Scope::Node as i32];
        lb.mode = Mode::Strict as i32;
    }
    if spec.publish_not_ready_addresses == Some(true) {
        lb.health_policy = HealthPolicy::AllowAll as i32;
    }
    (lb != LoadBalancing::default()).then_some(lb)
}

fn ip_families(families: &[String]) -> IpFamilies {
    match families {
        [_, _, ..] => IpFamilies::Dual,
        [one] if one == "IPv6" => IpFamilies::Ipv6Only,
        [_] => IpFamilies::Ipv4Only,
        [] => IpFamilies::Automatic,
    }
}

/// Services (one per host) and the workloads of inline endpoints, from ServiceEntries.
pub fn from_service_entries(
    objects: &Objects,
    mesh: &Mesh,
    reports: &mut Vec<Report>,
) -> (Vec<Service>, Vec<Workload>) {
    let (mut services, mut workloads) = (Vec::new(), Vec::new());
    for entry in objects.service_entries() {
        let namespace = entry.metadata.namespace.clone().unwrap_or_default();
        let name = entry.metadata.name.clone().unwrap_or_default();
        let object = format!("ServiceEntry/{namespace}/{name}");
        let Some(addresses) = entry_addresses(entry, mesh, &object, reports) else {
            continue;
        };
        let ports: Vec<Port> = entry.spec.ports.iter().map(|p| entry_port(p, None)).collect();
        for host in &entry.spec.hosts {
            services.push(Service {
                name: name.clone(),
                namespace: namespace.clone(),
                hostname: host.clone(),
                addresses: addresses.clone(),
                ports: ports.clone(),
                subject_alt_names: entry.spec.subject_alt_names.clone(),
                ..Default::default()
            });
        }
        for endpoint in &entry.spec.endpoints {
            let mut workload = Workload {
                uid: format!(
                    "{}/networking.istio.io/ServiceEntry/{namespace}/{name}/{}",
                    mesh.cluster_id, endpoint.address
                ),
                name: name.clone(),
                namespace: namespace.clone(),
                network: if endpoint.network.is_empty() {
                    mesh.network.clone()
                } else {
                    endpoint.network.clone()
                },
                service_account: if endpoint.service_account.is_empty() {
                    "default".into()
                } else {
                    endpoint.service_account.clone()
                },
                trust_domain: super::workloads::trust_domain(mesh),
                canonical_name: name.clone(),
                canonical_revision: "latest".into(),
                workload_name: name.clone(),
                status: WorkloadStatus::Healthy as i32,
                cluster_id: mesh.cluster_id.clone(),
                capacity: endpoint.weight,
                ..Default::default()
            };
            match endpoint.address.parse::<IpAddr>() {
                Ok(ip) => workload.addresses = vec![ip_bytes(ip)],
                Err(_) => workload.hostname = endpoint.address.clone(),
            }
            let port_list = PortList {
                ports: entry
                    .spec
                    .ports
                    .iter()
                    .map(|p| entry_port(p, Some(&endpoint.ports)))
                    .collect(),
            };
            workload.services = entry
                .spec
                .hosts
                .iter()
                .map(|host| (format!("{namespace}/{host}"), port_list.clone()))
                .collect();
            workloads.push(workload);
        }
    }
    (services, workloads)
}

/// The entry's addresses: IPs or single-address CIDRs. A wider range cannot be a service VIP,
/// so such an entry is skipped whole and reported.
fn entry_addresses(
    entry: &ServiceEntry,
    mesh: &Mesh,
    object: &str,
    reports: &mut Vec<Report>,
) -> Option<Vec<NetworkAddress>> {
    let mut addresses = Vec::new();
    for address in &entry.spec.addresses {
        let (ip, prefix) = address
            .split_once('/')
            .map_or((address.as_str(), None), |(ip, p)| (ip, Some(p)));
        let parsed = ip.parse::<IpAddr>().ok().filter(|ip| {
            let full = if ip.is_ipv4() { "32" } else { "128" };
            prefix.is_none_or(|p| p == full)
        });
        match parsed {
            Some(ip) => addresses.push(NetworkAddress {
                network: mesh.network.clone(),
                address: ip_bytes(ip),
            }),
            None => {
                reports.push(Report {
                    object: object.to_owned(),
                    message: format!(
                        "address {address:?} is not an IP or a single-address CIDR; the ServiceEntry is not applied"
                    ),
                });
                return None;
            }
        }
    }
    Some(addresses)
}

/// A ServiceEntry port; an endpoint's `ports` map (by port name) overrides the target port.
pub(crate) fn entry_port(port: &ServiceEntryPort, endpoint_ports: Option<&BTreeMap<String, u16>>) -> Port {
    let target = endpoint_ports
        .and_then(|ports| ports.get(&port.name))
        .copied()
        .or(port.target_port)
        .unwrap_or(port.number);
    Port {
        service_port: u32::from(port.number),
        target_port: u32::from(target),
        ..Default::default()
    }
}
