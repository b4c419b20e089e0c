//! AuthorizationPolicies with `targetRefs` (a waypoint's Gateway, or a Service) become L7
//! policies for waypoints: principals, namespaces, hosts, methods, paths and `when` conditions
//! on request headers and the source. What a waypoint cannot enforce is reported, and the rule
//! holding it is dropped from an ALLOW policy (never admit more than written) and kept in a DENY
//! policy without the part (deny at least what was written).

use mesh_core::proto::waypoint::{L7Condition, L7Operation, L7Policy, L7Rule, L7Source, l7_policy};

use super::Report;
use crate::objects::istio::{AuthorizationAction, AuthorizationPolicy};
use crate::store::Objects;

const SUPPORTED_KEYS: [&str; 2] = ["source.principal", "source.namespace"];

/// Every targeted AuthorizationPolicy that a waypoint enforces.
pub fn translate(objects: &Objects, reports: &mut Vec<Report>) -> Vec<L7Policy> {
    objects
        .authorization_policies()
        .filter_map(|policy| convert(policy, reports))
        .collect()
}

fn convert(policy: &AuthorizationPolicy, reports: &mut Vec<Report>) -> Option<L7Policy> {
    let spec = &policy.spec;
    let namespace = policy.metadata.namespace.clone().unwrap_or_default();
    let name = policy.metadata.name.clone().unwrap_or_default();
    let object = format!("AuthorizationPolicy/{namespace}/{name}");
    let references: Vec<_> = spec.target_ref.iter().chain(&spec.target_refs).collect();
    if references.is_empty() {
        return None;
    }
    let mut report = |message: String| {
        reports.push(Report {
            object: object.clone(),
            message,
        })
    };
    // As for L4: an invalid policy (from the API; files never pass one) fails closed.
    let invalid = spec.validate().err();
    if let Some(invalid) = &invalid {
        report(format!("invalid, enforced fail-closed until fixed: {invalid}"));
    }
    let mut targets = Vec::new();
    for (index, target) in references.iter().enumerate() {
        let target_namespace = target.namespace.clone().unwrap_or_else(|| namespace.clone());
        match (target.group.as_str(), target.kind.as_str()) {
            ("gateway.networking.k8s.io", "Gateway") => {
                targets.push(format!("Gateway/{target_namespace}/{}", target.name))
            }
            ("" | "core", "Service") => targets.push(format!("Service/{target_namespace}/{}", target.name)),
            (group, kind) => report(format!(
                "spec.targetRefs[{index}]: {group}/{kind} is not a Gateway or a Service"
            )),
        }
    }
    let action = match spec.action {
        AuthorizationAction::Allow => l7_policy::Action::Allow,
        AuthorizationAction::Deny => l7_policy::Action::Deny,
        other => {
            report(format!("waypoints do not enforce the {other:?} action; policy ignored"));
            return None;
        }
    };
    if invalid.is_some() {
        let rules = match action {
            l7_policy::Action::Allow => Vec::new(),
            _ => vec![L7Rule::default()],
        };
        return Some(L7Policy {
            name,
            namespace,
            targets,
            action: action as i32,
            rules,
        });
    }
    let mut rules = Vec::new();
    for (index, rule) in spec.rules.iter().flatten().enumerate() {
        let mut dropped = Vec::new();
        let when: Vec<L7Condition> = rule
            .when
            .iter()
            .filter(|c| {
                let supported = c.key.starts_with("request.headers[") || SUPPORTED_KEYS.contains(&c.key.as_str());
                if !supported {
                    dropped.push(format!("when key {:?}", c.key));
                }
                supported
            })
            .map(|c| L7Condition {
                key: c.key.clone(),
                values: c.values.clone(),
                not_values: c.not_values.clone(),
            })
            .collect();
        let from = rule
            .from
            .iter()
            .map(|f| {
                if !f.source.ip_blocks.is_empty() || !f.source.request_principals.is_empty() {
                    dropped.push("from.source ipBlocks/requestPrincipals".into());
                }
                L7Source {
                    principals: f.source.principals.clone(),
                    not_principals: f.source.not_principals.clone(),
                    namespaces: f.source.namespaces.clone(),
                    not_namespaces: f.source.not_namespaces.clone(),
                }
            })
            .collect();
        let to = rule
            .to
            .iter()
            .map(|t| {
                if !t.operation.ports.is_empty() || !t.operation.not_ports.is_empty() {
                    dropped.push("to.operation ports".into());
                }
                L7Operation {
                    hosts: t.operation.hosts.clone(),
                    not_hosts: t.operation.not_hosts.clone(),
                    methods: t.operation.methods.clone(),
                    not_methods: t.operation.not_methods.clone(),
                    paths: t.operation.paths.clone(),
                    not_paths: t.operation.not_paths.clone(),
                }
            })
            .collect();
        if !dropped.is_empty() {
            let consequence = if action == l7_policy::Action::Allow {
                "rule dropped (an ALLOW never admits more than written)"
            } else {
                "left out of the rule"
            };
            report(format!(
                "spec.rules[{index}]: {} not enforced by waypoints; {consequence}",
                dropped.join(", ")
            ));
            if action == l7_policy::Action::Allow {
                continue;
            }
        }
        rules.push(L7Rule { from, to, when });
    }
    Some(L7Policy {
        name,
        namespace,
        targets,
        action: action as i32,
        rules,
    })
}
