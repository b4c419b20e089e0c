//! L4 authorization, as Istio ambient converts it for ztunnel: AuthorizationPolicy (ALLOW/DENY;
//! global, namespace or workload-selector scope) and PeerAuthentication STRICT (a DENY of
//! plaintext, port by port where asked). What ztunnel cannot enforce fails closed: an ALLOW rule
//! that needs HTTP attributes (or holds a value that cannot be enforced) is dropped, a DENY rule
//! loses those parts and so denies more; both are reported as partly applied. A policy that
//! fails validation (an empty source, say) admits nothing (ALLOW) or denies everything (DENY).

mod peer;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use mesh_core::proto::security::{self, Action, Authorization, Clause, Match, Scope, StringMatch, string_match};

use super::{Mesh, Report, label, selector_matches};
use crate::objects::istio::{AuthorizationAction, AuthorizationPolicy, Condition, Operation, Rule, Source};
use crate::store::Objects;

pub use peer::STATIC_STRICT_POLICY;

/// Converted policies, and what each workload must list in `authorization_policies`.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    pub resources: Vec<Authorization>,
    /// (namespace, selector, `ns/name`) of workload-selector policies.
    selectors: Vec<(String, BTreeMap<String, String>, String)>,
    root_namespace: String,
    peer: peer::PeerPolicies,
}

impl Policies {
    /// Keys (`ns/name`) of the selector policies that apply to a workload with `labels` in
    /// `namespace` (from its namespace or the root namespace), then its PeerAuthentication policy.
    pub fn keys_for(&self, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> Vec<String> {
        let mut keys: Vec<String> = self
            .selectors
            .iter()
            .filter(|(ns, selector, _)| {
                (ns == namespace || *ns == self.root_namespace) && selector_matches(selector, labels)
            })
            .map(|(_, _, key)| key.clone())
            .collect();
        keys.sort();
        keys.extend(self.peer.key_for(namespace, labels));
        keys
    }
}

/// Converts every AuthorizationPolicy and PeerAuthentication of the snapshot.
pub fn translate(objects: &Objects, mesh: &Mesh, reports: &mut Vec<Report>) -> Policies {
    let mut policies = Policies {
        root_namespace: mesh.root_namespace.clone(),
        ..Default::default()
    };
    for policy in objects.authorization_policies() {
        if let Some(converted) = convert(policy, mesh, reports) {
            if converted.scope == Scope::WorkloadSelector as i32 {
                let selector = policy.spec.selector.clone().unwrap_or_default().match_labels;
                let key = format!("{}/{}", converted.namespace, converted.name);
                policies.selectors.push((converted.namespace.clone(), selector, key));
            }
            policies.resources.push(converted);
        }
    }
    policies.peer = peer::PeerPolicies::new(objects, mesh);
    policies.resources.extend(policies.peer.resources());
    policies
}

/// One AuthorizationPolicy for ztunnel, or `None` when it is not ztunnel's to enforce.
pub fn convert(policy: &AuthorizationPolicy, mesh: &Mesh, reports: &mut Vec<Report>) -> Option<Authorization> {
    let meta = &policy.metadata;
    let (namespace, name) = (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    );
    let object = format!("AuthorizationPolicy/{namespace}/{name}");
    let spec = &policy.spec;
    if label(meta.annotations.as_ref(), "istio.io/dry-run") == Some("true") {
        return None;
    }
    // Policies attached to a Gateway or Service with targetRefs are enforced by the waypoint.
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return None;
    }
    let action = match spec.action {
        AuthorizationAction::Allow => Action::Allow,
        AuthorizationAction::Deny => Action::Deny,
        other => {
            reports.push(Report {
                object,
                message: format!("ztunnel does not enforce the {other:?} action; policy ignored"),
            });
            return None;
        }
    };
    let scope = match (&spec.selector, namespace == mesh.root_namespace) {
        (Some(_), _) => Scope::WorkloadSelector,
        (None, true) => Scope::Global,
        (None, false) => Scope::Namespace,
    };
    // The files source never lets an invalid policy through; from the API one can arrive (an
    // empty source, say). It fails closed: an ALLOW admits nothing, a DENY denies everything.
    if let Err(invalid) = spec.validate() {
        let (rules, outcome) = match action {
            Action::Allow => (Vec::new(), "it allows nothing"),
            _ => (
                vec![security::Rule { clauses: Vec::new() }],
                "it denies every connection",
            ),
        };
        reports.push(Report {
            object,
            message: format!("invalid, enforced fail-closed ({outcome}) until fixed: {invalid}"),
        });
        return Some(Authorization {
            name,
            namespace,
            scope: scope as i32,
            action: action as i32,
            rules,
        });
    }
    let mut unenforceable = BTreeSet::new();
    let rules = spec
        .rules
        .iter()
        .flatten()
        .filter_map(|rule| {
            let mut found = BTreeSet::new();
            let converted = convert_rule(rule, &mut found);
            let keep = action == Action::Deny || found.is_empty();
            unenforceable.extend(found);
            keep.then_some(converted)
        })
        .collect();
    if !unenforceable.is_empty() {
        let outcome = match action {
            Action::Allow => "ALLOW rules using them are omitted",
            Action::Deny => "DENY rules are enforced without them",
        };
        let found: Vec<String> = unenforceable.into_iter().collect();
        reports.push(Report {
            object,
            message: format!(
                "partly applied: ztunnel enforces L4 attributes only (found: {}); {outcome}, which is more restrictive than requested. Attach the policy to a waypoint to enforce HTTP rules.",
                found.join(", ")
            ),
        });
    }
    Some(Authorization {
        name,
        namespace,
        scope: scope as i32,
        action: action as i32,
        rules,
    })
}

/// Converts one rule: `from` entries form one clause (ORed), `to` entries another, each `when`
/// condition its own; clauses are ANDed. Parts ztunnel cannot enforce are left out and named in
/// `unenforceable`. A clause with an empty match matches anything and is omitted.
fn convert_rule(rule: &Rule, unenforceable: &mut BTreeSet<String>) -> security::Rule {
    let from: Vec<Match> = rule
        .from
        .iter()
        .map(|f| source_match(&f.source, unenforceable))
        .collect();
    let to: Vec<Match> = rule
        .to
        .iter()
        .map(|t| operation_match(&t.operation, unenforceable))
        .collect();
    let mut clauses: Vec<Clause> = [from, to].into_iter().filter_map(clause).collect();
    clauses.extend(
        rule.when
            .iter()
            .filter_map(|c| condition_match(c, unenforceable))
            .filter_map(|m| clause(vec![m])),
    );
    security::Rule { clauses }
}

fn clause(matches: Vec<Match>) -> Option<Clause> {
    let always = matches.is_empty() || matches.iter().any(|m| *m == Match::default());
    (!always).then_some(Clause { matches })
}

fn source_match(source: &Source, unenforceable: &mut BTreeSet<String>) -> Match {
    for (field, values) in [
        ("requestPrincipals", &source.request_principals),
        ("notRequestPrincipals", &source.not_request_principals),
        ("remoteIpBlocks", &source.remote_ip_blocks),
        ("notRemoteIpBlocks", &source.not_remote_ip_blocks),
    ] {
        if !values.is_empty() {
            unenforceable.insert(field.into());
        }
    }
    Match {
        principals: string_matches(&source.principals),
        not_principals: string_matches(&source.not_principals),
        namespaces: string_matches(&source.namespaces),
        not_namespaces: string_matches(&source.not_namespaces),
        source_ips: addresses(&source.ip_blocks, "ipBlocks", unenforceable),
        not_source_ips: addresses(&source.not_ip_blocks, "notIpBlocks", unenforceable),
        ..Default::default()
    }
}

fn operation_match(operation: &Operation, unenforceable: &mut BTreeSet<String>) -> Match {
    for (field, values) in [
        ("hosts", &operation.hosts),
        ("notHosts", &operation.not_hosts),
        ("methods", &operation.methods),
        ("notMethods", &operation.not_methods),
        ("paths", &operation.paths),
        ("notPaths", &operation.not_paths),
    ] {
        if !values.is_empty() {
            unenforceable.insert(field.into());
        }
    }
    Match {
        destination_ports: ports(&operation.ports, "ports", unenforceable),
        not_destination_ports: ports(&operation.not_ports, "notPorts", unenforceable),
        ..Default::default()
    }
}

/// A `when` condition on an L4 key; any other key is an HTTP attribute.
fn condition_match(condition: &Condition, unenforceable: &mut BTreeSet<String>) -> Option<Match> {
    let (values, not_values) = (&condition.values, &condition.not_values);
    let field = format!("when {}", condition.key);
    let matched = match condition.key.as_str() {
        "source.ip" => Match {
            source_ips: addresses(values, &field, unenforceable),
            not_source_ips: addresses(not_values, &field, unenforceable),
            ..Default::default()
        },
        "source.namespace" => Match {
            namespaces: string_matches(values),
            not_namespaces: string_matches(not_values),
            ..Default::default()
        },
        "source.principal" => Match {
            principals: string_matches(values),
            not_principals: string_matches(not_values),
            ..Default::default()
        },
        "destination.ip" => Match {
            destination_ips: addresses(values, &field, unenforceable),
            not_destination_ips: addresses(not_values, &field, unenforceable),
            ..Default::default()
        },
        "destination.port" => Match {
            destination_ports: ports(values, &field, unenforceable),
            not_destination_ports: ports(not_values, &field, unenforceable),
            ..Default::default()
        },
        _ => {
            unenforceable.insert(field);
            return None;
        }
    };
    Some(matched)
}

/// Istio's wildcard forms: `*` any value present, `*x` suffix, `x*` prefix, else exact.
pub fn string_match(pattern: &str) -> StringMatch {
    let kind = if pattern == "*" {
        string_match::MatchType::Presence(())
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        string_match::MatchType::Suffix(suffix.to_owned())
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        string_match::MatchType::Prefix(prefix.to_owned())
    } else {
        string_match::MatchType::Exact(pattern.to_owned())
    };
    StringMatch { match_type: Some(kind) }
}

fn string_matches(patterns: &[String]) -> Vec<StringMatch> {
    patterns.iter().map(|p| string_match(p)).collect()
}

/// CIDRs or bare IPs; an invalid one cannot be enforced.
fn addresses(blocks: &[String], field: &str, unenforceable: &mut BTreeSet<String>) -> Vec<security::Address> {
    let mut addresses = Vec::with_capacity(blocks.len());
    for block in blocks {
        match cidr(block) {
            Some(address) => addresses.push(address),
            None => {
                unenforceable.insert(format!("{field} {block:?} (not an IP or CIDR)"));
            }
        }
    }
    addresses
}

fn cidr(block: &str) -> Option<security::Address> {
    let (ip, length) = block
        .split_once('/')
        .map_or((block, None), |(ip, length)| (ip, Some(length)));
    let ip: IpAddr = ip.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let length = match length {
        None => max,
        Some(length) => length.parse().ok().filter(|length| *length <= max)?,
    };
    Some(security::Address {
        address: super::ip_bytes(ip),
        length,
    })
}

/// Port numbers; a named or out-of-range port cannot be enforced at L4.
fn ports(values: &[String], field: &str, unenforceable: &mut BTreeSet<String>) -> Vec<u32> {
    let mut ports = Vec::with_capacity(values.len());
    for value in values {
        match value.parse::<u16>() {
            Ok(port) if port != 0 => ports.push(u32::from(port)),
            _ => {
                unenforceable.insert(format!("{field} {value:?} (not a port number)"));
            }
        }
    }
    ports
}
