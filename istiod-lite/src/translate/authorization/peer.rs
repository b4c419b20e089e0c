//! PeerAuthentication as ztunnel enforces it: mTLS STRICT is a DENY of connections without a
//! peer identity. The mode of a workload comes from the mesh (root namespace), its namespace, and
//! the oldest selector policy matching it, each narrower level overriding a set mode; port-level
//! modes of a selector policy become a policy of their own.

use std::collections::BTreeMap;

use mesh_core::proto::security::{Action, Authorization, Clause, Match, Rule, Scope};

use super::string_match;
use crate::objects::istio::{MtlsMode, PeerAuthentication};
use crate::store::Objects;
use crate::translate::{Mesh, selector_matches};

/// The DENY-plaintext policy Istio generates, in the root namespace; workloads in STRICT mode list it.
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
const PORT_LEVEL_PREFIX: &str = "converted_peer_authentication_";

#[derive(Clone, Debug)]
struct Peer {
    namespace: String,
    name: String,
    created: Option<k8s_openapi::jiff::Timestamp>,
    selector: Option<BTreeMap<String, String>>,
    mode: MtlsMode,
    ports: BTreeMap<u16, MtlsMode>,
}

#[derive(Clone, Debug, Default)]
pub(super) struct PeerPolicies {
    root_namespace: String,
    /// Oldest first, so the first match at a level is the one that wins.
    peers: Vec<Peer>,
}

impl PeerPolicies {
    pub(super) fn new(objects: &Objects, mesh: &Mesh) -> Self {
        let mut peers: Vec<Peer> = objects.peer_authentications().map(|pa| peer(pa)).collect();
        peers.sort_by(|a, b| (a.created, &a.namespace, &a.name).cmp(&(b.created, &b.namespace, &b.name)));
        Self {
            root_namespace: mesh.root_namespace.clone(),
            peers,
        }
    }

    fn mesh_level(&self) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.namespace == self.root_namespace && p.selector.is_none())
    }

    fn namespace_level(&self, namespace: &str) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.namespace == namespace && p.selector.is_none())
    }

    fn workload_level(&self, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> Option<&Peer> {
        if namespace == self.root_namespace {
            return None;
        }
        self.peers
            .iter()
            .find(|p| p.namespace == namespace && p.selector.as_ref().is_some_and(|s| selector_matches(s, labels)))
    }

    /// The mode a namespace's workloads inherit before any selector policy.
    fn inherited(&self, namespace: &str) -> MtlsMode {
        [self.mesh_level(), self.namespace_level(namespace)]
            .into_iter()
            .flatten()
            .map(|p| p.mode)
            .fold(
                MtlsMode::Permissive,
                |mode, next| {
                    if next == MtlsMode::Unset { mode } else { next }
                },
            )
    }

    /// The policy key a workload lists, if its effective mode denies some plaintext.
    pub(super) fn key_for(&self, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> Option<String> {
        let inherited = self.inherited(namespace);
        let workload = self.workload_level(namespace, labels);
        if let Some(peer) = workload
            && port_level_rules(peer, inherited).is_some()
        {
            return Some(format!("{}/{PORT_LEVEL_PREFIX}{}", peer.namespace, peer.name));
        }
        let mode = match workload.map(|p| p.mode) {
            Some(MtlsMode::Unset) | None => inherited,
            Some(mode) => mode,
        };
        (mode == MtlsMode::Strict).then(|| format!("{}/{STATIC_STRICT_POLICY}", self.root_namespace))
    }

    /// The static STRICT policy (when any PeerAuthentication exists) and the port-level policies.
    pub(super) fn resources(&self) -> Vec<Authorization> {
        if self.peers.is_empty() {
            return Vec::new();
        }
        let mut resources = vec![Authorization {
            name: STATIC_STRICT_POLICY.into(),
            namespace: self.root_namespace.clone(),
            scope: Scope::WorkloadSelector as i32,
            action: Action::Deny as i32,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![plaintext()],
                }],
            }],
        }];
        for peer in self
            .peers
            .iter()
            .filter(|p| p.selector.is_some() && p.namespace != self.root_namespace)
        {
            if let Some(rules) = port_level_rules(peer, self.inherited(&peer.namespace)) {
                resources.push(Authorization {
                    name: format!("{PORT_LEVEL_PREFIX}{}", peer.name),
                    namespace: peer.namespace.clone(),
                    scope: Scope::WorkloadSelector as i32,
                    action: Action::Deny as i32,
                    rules,
                });
            }
        }
        resources
    }
}

fn peer(pa: &PeerAuthentication) -> Peer {
    Peer {
        namespace: pa.metadata.namespace.clone().unwrap_or_default(),
        name: pa.metadata.name.clone().unwrap_or_default(),
        created: pa.metadata.creation_timestamp.as_ref().map(|t| t.0),
        selector: pa.spec.selector.as_ref().map(|s| s.match_labels.clone()),
        mode: pa.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default(),
        ports: pa
            .spec
            .port_level_mtls
            .iter()
            .map(|(port, m)| (*port, m.mode))
            .collect(),
    }
}

/// A connection without a peer identity: plaintext.
fn plaintext() -> Match {
    Match {
        not_principals: vec![string_match("*")],
        ..Default::default()
    }
}

/// Rules of a selector policy's port-level modes, or `None` when they change nothing.
/// STRICT overall: deny plaintext unless the port is one of the exempt ones.
/// Otherwise: deny plaintext on each STRICT port.
fn port_level_rules(peer: &Peer, inherited: MtlsMode) -> Option<Vec<Rule>> {
    if peer.ports.is_empty() {
        return None;
    }
    let top = if peer.mode == MtlsMode::Unset {
        inherited
    } else {
        peer.mode
    };
    if top == MtlsMode::Strict {
        let exempt: Vec<u32> = peer
            .ports
            .iter()
            .filter(|(_, mode)| matches!(mode, MtlsMode::Permissive | MtlsMode::Disable))
            .map(|(port, _)| u32::from(*port))
            .collect();
        if exempt.is_empty() {
            return None;
        }
        let exempt = Match {
            not_destination_ports: exempt,
            ..Default::default()
        };
        return Some(vec![Rule {
            clauses: vec![
                Clause {
                    matches: vec![plaintext()],
                },
                Clause { matches: vec![exempt] },
            ],
        }]);
    }
    let rules: Vec<Rule> = peer
        .ports
        .iter()
        .filter(|(_, mode)| **mode == MtlsMode::Strict)
        .map(|(port, _)| Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    destination_ports: vec![u32::from(*port)],
                    ..plaintext()
                }],
            }],
        })
        .collect();
    (!rules.is_empty()).then_some(rules)
}
