//! Workloads from Pods and WorkloadEntries: addresses, identity, health, HBONE enrolment, the
//! services that select them (with named target ports resolved per pod), their waypoint and the
//! selector policies that apply to them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::proto::workload::{Port, PortList, TunnelProtocol, Workload, WorkloadStatus, WorkloadType};

use super::authorization::Policies;
use super::services::{entry_port, hostname};
use super::waypoints::{GATEWAY_NAME_LABEL, Waypoints};
use super::{Mesh, Report, ip_bytes, label, selector_matches};
use crate::store::Objects;

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Set by Istio's CNI once it has redirected a pod: such a pod is enrolled whatever its labels.
const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Pods with an Istio sidecar are never captured by ztunnel.
const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// WorkloadEntries that speak HBONE say so with this label (`http` = HBONE).
const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";

/// Istio leaves the trust domain empty when it is the default, and ztunnel fills it in.
pub fn trust_domain(mesh: &Mesh) -> String {
    if mesh.trust_domain == "cluster.local" {
        String::new()
    } else {
        mesh.trust_domain.clone()
    }
}

/// Whether a pod's traffic is captured: the pod's `istio.io/dataplane-mode=ambient`, or its
/// namespace's unless the pod says `none`; never for host-network or sidecar pods.
pub fn enrolled(objects: &Objects, pod: &Pod) -> bool {
    let annotations = pod.metadata.annotations.as_ref();
    if label(annotations, SIDECAR_STATUS_ANNOTATION).is_some()
        || pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
    {
        return false;
    }
    if label(annotations, REDIRECTION_ANNOTATION) == Some("enabled") {
        return true;
    }
    match label(pod.metadata.labels.as_ref(), DATAPLANE_MODE) {
        Some(mode) => mode == "ambient",
        None => {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
            let namespace_labels = objects.namespace(namespace).and_then(|n| n.metadata.labels.as_ref());
            label(namespace_labels, DATAPLANE_MODE) == Some("ambient")
        }
    }
}

/// Whether peers send a pod HBONE: it is enrolled and, where the mesh requires it, its node
/// agent has reported the capture in place.
fn speaks_hbone(objects: &Objects, mesh: &Mesh, pod: &Pod) -> bool {
    enrolled(objects, pod)
        && (!mesh.require_redirection
            || label(pod.metadata.annotations.as_ref(), REDIRECTION_ANNOTATION) == Some("enabled"))
}

pub fn from_pods(
    objects: &Objects,
    mesh: &Mesh,
    waypoints: &Waypoints,
    policies: &Policies,
    reports: &mut Vec<Report>,
) -> Vec<Workload> {
    let mut workloads = Vec::new();
    for pod in objects.pods() {
        let status = pod.status.as_ref();
        if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
            continue;
        }
        let ips: Vec<&str> = match status.and_then(|s| s.pod_ips.as_ref()) {
            Some(ips) if !ips.is_empty() => ips.iter().map(|ip| ip.ip.as_str()).collect(),
            _ => status.and_then(|s| s.pod_ip.as_deref()).into_iter().collect(),
        };
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let object = format!("Pod/{namespace}/{name}");
        let addresses = parse_ips(&ips, &object, reports);
        if addresses.is_empty() {
            continue;
        }
        let labels = pod.metadata.labels.as_ref();
        let spec = pod.spec.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let healthy = ready && pod.metadata.deletion_timestamp.is_none();
        let workload_name = workload_name(pod);
        let waypoint = if label(labels, GATEWAY_NAME_LABEL).is_some() {
            None
        } else {
            waypoints
                .bound(objects, &namespace, labels, &object, reports)
                .filter(|w| w.serves.serves_workloads())
                .map(|w| w.address.clone())
        };
        let service_account = spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        workloads.push(Workload {
            uid: format!("{}//Pod/{namespace}/{name}", mesh.cluster_id),
            addresses,
            network: mesh.network.clone(),
            tunnel_protocol: if speaks_hbone(objects, mesh, pod) {
                TunnelProtocol::Hbone
            } else {
                TunnelProtocol::None
            } as i32,
            trust_domain: trust_domain(mesh),
            service_account: service_account.clone(),
            waypoint,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            canonical_name: canonical_name(labels, &workload_name),
            canonical_revision: canonical_revision(labels),
            workload_type: WorkloadType::Pod as i32,
            workload_name,
            services: pod_services(objects, mesh, pod),
            authorization_policies: policies.keys_for(&namespace, labels),
            status: if healthy {
                WorkloadStatus::Healthy
            } else {
                WorkloadStatus::Unhealthy
            } as i32,
            cluster_id: mesh.cluster_id.clone(),
            name,
            namespace,
            ..Default::default()
        });
    }
    workloads
}

pub fn from_workload_entries(
    objects: &Objects,
    mesh: &Mesh,
    waypoints: &Waypoints,
    policies: &Policies,
    reports: &mut Vec<Report>,
) -> Vec<Workload> {
    let mut workloads = Vec::new();
    for entry in objects.workload_entries() {
        let namespace = entry.metadata.namespace.clone().unwrap_or_default();
        let name = entry.metadata.name.clone().unwrap_or_default();
        let object = format!("WorkloadEntry/{namespace}/{name}");
        let spec = &entry.spec;
        // Labels of the entry itself select it into services, as a pod's labels do.
        let labels = if spec.labels.is_empty() {
            entry.metadata.labels.clone().unwrap_or_default()
        } else {
            spec.labels.clone()
        };
        let workload_name = label(Some(&labels), "service.istio.io/workload-name")
            .unwrap_or(&name)
            .to_owned();
        let (addresses, hostname) = match spec.address.parse::<IpAddr>() {
            Ok(ip) => (vec![ip_bytes(ip)], String::new()),
            Err(_) if !spec.address.is_empty() => (Vec::new(), spec.address.clone()),
            Err(_) => {
                reports.push(Report {
                    object,
                    message: "spec.address is empty; the entry is not a workload".into(),
                });
                continue;
            }
        };
        let tunnel = if label(Some(&labels), TUNNEL_LABEL).is_some_and(|t| t.contains("http")) {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        };
        let waypoint = waypoints
            .bound(objects, &namespace, Some(&labels), &object, reports)
            .filter(|w| w.serves.serves_workloads())
            .map(|w| w.address.clone());
        workloads.push(Workload {
            uid: format!(
                "{}/networking.istio.io/WorkloadEntry/{namespace}/{name}",
                mesh.cluster_id
            ),
            addresses,
            hostname,
            network: if spec.network.is_empty() {
                mesh.network.clone()
            } else {
                spec.network.clone()
            },
            tunnel_protocol: tunnel as i32,
            trust_domain: trust_domain(mesh),
            service_account: if spec.service_account.is_empty() {
                "default".into()
            } else {
                spec.service_account.clone()
            },
            waypoint,
            canonical_name: canonical_name(Some(&labels), &workload_name),
            canonical_revision: canonical_revision(Some(&labels)),
            workload_type: WorkloadType::Pod as i32,
            workload_name,
            services: entry_services(objects, mesh, &namespace, &labels, &spec.ports),
            authorization_policies: policies.keys_for(&namespace, Some(&labels)),
            status: WorkloadStatus::Healthy as i32,
            cluster_id: mesh.cluster_id.clone(),
            capacity: spec.weight,
            name,
            namespace,
            ..Default::default()
        });
    }
    workloads
}

fn parse_ips(ips: &[&str], object: &str, reports: &mut Vec<Report>) -> Vec<Vec<u8>> {
    ips.iter()
        .filter_map(|ip| match ip.parse::<IpAddr>() {
            Ok(ip) => Some(ip_bytes(ip)),
            Err(_) => {
                reports.push(Report {
                    object: object.to_owned(),
                    message: format!("pod IP {ip:?} is not an IP address; ignored"),
                });
                None
            }
        })
        .collect()
}
/// The services selecting a pod, keyed `<ns>/<hostname>`, with target ports resolved against the
/// pod's TCP container ports; a named port the pod lacks is left out for this pod.
fn pod_services(objects: &Objects, mesh: &Mesh, pod: &Pod) -> BTreeMap<String, PortList> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let labels = pod.metadata.labels.as_ref();
    let is_tcp = |protocol: Option<&str>| protocol.unwrap_or("TCP") == "TCP";
    let container_port = |name: &str| {
        pod.spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find_map(|p| {
                (p.name.as_deref() == Some(name) && is_tcp(p.protocol.as_deref())).then_some(p.container_port)
            })
    };
    let mut services = selecting_services(objects, mesh, namespace, labels, |port| {
        if !is_tcp(port.protocol.as_deref()) {
            return None;
        }
        match &port.target_port {
            None => Some(port.port),
            Some(IntOrString::Int(target)) => Some(*target),
            Some(IntOrString::String(name)) => container_port(name),
        }
    });
    services.extend(selected_by_entries(objects, namespace, labels, None));
    services
}

/// Services of a WorkloadEntry: Kubernetes Services and ServiceEntries whose selector matches it;
/// the entry's `ports` (by port name) override target ports.
fn entry_services(
    objects: &Objects,
    mesh: &Mesh,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    ports: &BTreeMap<String, u16>,
) -> BTreeMap<String, PortList> {
    let by_name = |name: &str| ports.get(name).map(|p| i32::from(*p));
    let mut services = selecting_services(objects, mesh, namespace, Some(labels), |port| {
        port.name.as_deref().and_then(by_name).or(match &port.target_port {
            None => Some(port.port),
            Some(IntOrString::Int(target)) => Some(*target),
            Some(IntOrString::String(name)) => by_name(name),
        })
    });
    services.extend(selected_by_entries(objects, namespace, Some(labels), Some(ports)));
    services
}

/// Kubernetes Services in `namespace` whose non-empty selector matches `labels`, keyed
/// `<ns>/<hostname>`, each port's target from `target` (a port it returns `None` for is left out).
/// ExternalName services are skipped: they are not translated, so a key to one would dangle.
fn selecting_services(
    objects: &Objects,
    mesh: &Mesh,
    namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
    target: impl Fn(&ServicePort) -> Option<i32>,
) -> BTreeMap<String, PortList> {
    let mut services = BTreeMap::new();
    for service in objects
        .services()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
    {
        let Some(spec) = &service.spec else { continue };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") || !selector_matches(selector, labels) {
            continue;
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|port| {
                Some(Port {
                    service_port: u32::try_from(port.port).ok()?,
                    target_port: u32::try_from(target(port)?).ok()?,
                    ..Default::default()
                })
            })
            .collect();
        let name = service.metadata.name.as_deref().unwrap_or_default();
        services.insert(
            format!("{namespace}/{}", hostname(name, namespace, mesh)),
            PortList { ports },
        );
    }
    services
}

/// ServiceEntries in `namespace` whose `workloadSelector` matches `labels`, one entry per host.
fn selected_by_entries(
    objects: &Objects,
    namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
    endpoint_ports: Option<&BTreeMap<String, u16>>,
) -> Vec<(String, PortList)> {
    objects
        .service_entries()
        .filter(|e| e.metadata.namespace.as_deref() == Some(namespace))
        .filter(|e| {
            e.spec
                .workload_selector
                .as_ref()
                .is_some_and(|s| !s.labels.is_empty() && selector_matches(&s.labels, labels))
        })
        .flat_map(|entry| {
            let ports = PortList {
                ports: entry.spec.ports.iter().map(|p| entry_port(p, endpoint_ports)).collect(),
            };
            entry
                .spec
                .hosts
                .iter()
                .map(move |host| (format!("{namespace}/{host}"), ports.clone()))
        })
        .collect()
}

/// `service.istio.io/workload-name`, else the controller owner (a ReplicaSet's Deployment), else the pod name.
fn workload_name(pod: &Pod) -> String {
    let labels = pod.metadata.labels.as_ref();
    if let Some(name) = label(labels, "service.istio.io/workload-name") {
        return name.to_owned();
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(owner) = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return name;
    };
    match (owner.kind.as_str(), label(labels, "pod-template-hash")) {
        ("ReplicaSet", Some(hash)) => owner
            .name
            .strip_suffix(&format!("-{hash}"))
            .unwrap_or(&owner.name)
            .to_owned(),
        _ => owner.name.clone(),
    }
}

fn canonical_name(labels: Option<&BTreeMap<String, String>>, workload_name: &str) -> String {
    ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|key| label(labels, key))
        .unwrap_or(workload_name)
        .to_owned()
}

fn canonical_revision(labels: Option<&BTreeMap<String, String>>) -> String {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|key| label(labels, key))
    .unwrap_or("latest")
    .to_owned()
}
