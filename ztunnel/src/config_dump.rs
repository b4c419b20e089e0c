//! `/config_dump`: what this ztunnel knows and holds, as JSON.

use std::sync::Arc;
use std::time::SystemTime;

use mesh_core::proto::workload::{TunnelProtocol, WorkloadStatus};
use serde_json::{Value, json};

use crate::proxy::{Context, identity_of};
use mesh_core::certificates::CertificateSource;
use mesh_core::state::ip_from_bytes;

pub fn dump<S: CertificateSource>(context: &Arc<Context<S>>) -> Value {
    let state = context.state.read().expect("not poisoned");
    let mut workloads: Vec<Value> = state
        .workloads()
        .map(|w| {
            json!({
                "uid": w.uid,
                "name": w.name,
                "namespace": w.namespace,
                "addresses": w.addresses.iter().filter_map(|a| ip_from_bytes(a)).map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "node": w.node,
                "identity": identity_of(w).map(|id| id.to_string()).unwrap_or_default(),
                "protocol": TunnelProtocol::try_from(w.tunnel_protocol).map(|p| p.as_str_name()).unwrap_or("UNKNOWN"),
                "status": WorkloadStatus::try_from(w.status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
                "services": w.services.keys().collect::<Vec<_>>(),
                "authorizationPolicies": w.authorization_policies,
            })
        })
        .collect();
    workloads.sort_by(|a, b| a["uid"].as_str().cmp(&b["uid"].as_str()));
    let mut services: Vec<Value> = state
        .services()
        .map(|s| {
            json!({
                "hostname": s.hostname,
                "namespace": s.namespace,
                "vips": s.addresses.iter().filter_map(|a| ip_from_bytes(&a.address)).map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "ports": s.ports.iter().map(|p| json!({"port": p.service_port, "targetPort": p.target_port})).collect::<Vec<_>>(),
                "endpoints": state.endpoints(s).map(|(w, _)| w.uid.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    services.sort_by(|a, b| a["hostname"].as_str().cmp(&b["hostname"].as_str()));
    let mut policies: Vec<String> = state
        .policies()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    policies.sort();
    drop(state);
    let certificates: Vec<Value> = context
        .certificates
        .held()
        .into_iter()
        .map(|(identity, certificate)| match certificate {
            Some(c) => json!({
                "identity": identity.to_string(),
                "state": "ready",
                "notAfter": unix_seconds(c.not_after()),
                "expiresInSeconds": c.not_after().duration_since(SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0),
            }),
            None => json!({ "identity": identity.to_string(), "state": "pending" }),
        })
        .collect();
    json!({ "node": context.node, "workloads": workloads, "services": services, "policies": policies, "certificates": certificates })
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
