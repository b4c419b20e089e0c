//! L4 authorization as ztunnel enforces it: any matching DENY policy denies; with ALLOW policies
//! present, only a connection one of them matches is admitted. A policy matches when any rule
//! does; a rule when all its clauses do; a clause when any of its (non-empty) matches does; a
//! match when every field it sets does (values ORed, `not_` fields requiring no value to match).

use std::net::IpAddr;

use crate::identity::SpiffeId;
use crate::proto::security::{Action, Address, Authorization, Clause, Match, StringMatch, string_match};

/// What is known about a connection when it arrives.
#[derive(Clone, Debug)]
pub struct Connection<'a> {
    pub source_ip: IpAddr,
    /// `None` for plaintext.
    pub source_identity: Option<&'a SpiffeId>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// Why a connection was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("denied by DENY policy {0}")]
    Policy(String),
    #[error("no ALLOW policy matched (checked: {})", .0.join(", "))]
    NotAllowed(Vec<String>),
}

/// Decides a connection against the policies that apply to its destination.
pub fn check<'p>(
    policies: impl IntoIterator<Item = &'p Authorization>,
    connection: &Connection<'_>,
) -> Result<(), Denied> {
    let mut allow_policies = Vec::new();
    let mut allowed = false;
    for policy in policies {
        let matched = matches_policy(policy, connection);
        if policy.action == Action::Deny as i32 {
            if matched {
                return Err(Denied::Policy(format!("{}/{}", policy.namespace, policy.name)));
            }
        } else {
            allowed |= matched;
            allow_policies.push(format!("{}/{}", policy.namespace, policy.name));
        }
    }
    if allow_policies.is_empty() || allowed {
        Ok(())
    } else {
        Err(Denied::NotAllowed(allow_policies))
    }
}

fn matches_policy(policy: &Authorization, connection: &Connection<'_>) -> bool {
    policy
        .rules
        .iter()
        .any(|rule| rule.clauses.iter().all(|clause| matches_clause(clause, connection)))
}

/// A clause with no matches is true; empty matches are skipped, so a clause of only empty
/// matches is false (as in ztunnel).
fn matches_clause(clause: &Clause, connection: &Connection<'_>) -> bool {
    if clause.matches.is_empty() {
        return true;
    }
    clause
        .matches
        .iter()
        .filter(|m| **m != Match::default())
        .any(|m| matches_match(m, connection))
}

fn matches_match(m: &Match, c: &Connection<'_>) -> bool {
    // Principals compare without the scheme: `td/ns/<ns>/sa/<sa>`.
    let principal = c.source_identity.map(|id| id.as_str().trim_start_matches("spiffe://"));
    let namespace = c.source_identity.map(SpiffeId::namespace);
    let string_field = |patterns: &[StringMatch], value: Option<&str>, negated: bool| {
        if patterns.is_empty() {
            return true;
        }
        let any = value.is_some_and(|v| patterns.iter().any(|p| string_matches(p, v)));
        any != negated
    };
    let ip_field = |blocks: &[Address], ip: IpAddr, negated: bool| {
        blocks.is_empty() || (blocks.iter().any(|b| contains(b, ip)) != negated)
    };
    let port_field =
        |ports: &[u32], port: u16, negated: bool| ports.is_empty() || (ports.contains(&u32::from(port)) != negated);
    let service_account = |accounts: &[crate::proto::security::ServiceAccountMatch], negated: bool| {
        if accounts.is_empty() {
            return true;
        }
        let any = c.source_identity.is_some_and(|id| {
            accounts
                .iter()
                .any(|a| a.namespace == id.namespace() && a.service_account == id.service_account())
        });
        any != negated
    };
    string_field(&m.principals, principal, false)
        && string_field(&m.not_principals, principal, true)
        && string_field(&m.namespaces, namespace, false)
        && string_field(&m.not_namespaces, namespace, true)
        && service_account(&m.service_accounts, false)
        && service_account(&m.not_service_accounts, true)
        && ip_field(&m.source_ips, c.source_ip, false)
        && ip_field(&m.not_source_ips, c.source_ip, true)
        && ip_field(&m.destination_ips, c.destination_ip, false)
        && ip_field(&m.not_destination_ips, c.destination_ip, true)
        && port_field(&m.destination_ports, c.destination_port, false)
        && port_field(&m.not_destination_ports, c.destination_port, true)
}

fn string_matches(pattern: &StringMatch, value: &str) -> bool {
    match &pattern.match_type {
        Some(string_match::MatchType::Exact(exact)) => value == exact,
        Some(string_match::MatchType::Prefix(prefix)) => value.starts_with(prefix.as_str()),
        Some(string_match::MatchType::Suffix(suffix)) => value.ends_with(suffix.as_str()),
        Some(string_match::MatchType::Presence(())) => !value.is_empty(),
        None => false,
    }
}

fn contains(block: &Address, ip: IpAddr) -> bool {
    let Some(network) = super::ip_from_bytes(&block.address) else {
        return false;
    };
    let (network, ip, bits) = match (network, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (
            u128::from(u32::from(n)) << 96,
            u128::from(u32::from(i)) << 96,
            block.length.min(32),
        ),
        (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), block.length.min(128)),
        _ => return false,
    };
    let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
    network & mask == ip & mask
}

#[cfg(test)]
mod tests {
    use crate::proto::security::{Rule, Scope};

    use super::*;

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    fn policy(name: &str, action: Action, clauses: Vec<Vec<Match>>) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: "demo".into(),
            scope: Scope::Namespace as i32,
            action: action as i32,
            rules: vec![Rule {
                clauses: clauses.into_iter().map(|matches| Clause { matches }).collect(),
            }],
        }
    }

    fn exact(value: &str) -> StringMatch {
        StringMatch {
            match_type: Some(string_match::MatchType::Exact(value.into())),
        }
    }

    fn presence() -> StringMatch {
        StringMatch {
            match_type: Some(string_match::MatchType::Presence(())),
        }
    }

    fn cidr(ip: &str, length: u32) -> Address {
        let address = match ip.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        Address { address, length }
    }

    fn connection<'a>(identity: Option<&'a SpiffeId>, source: &str, port: u16) -> Connection<'a> {
        Connection {
            source_ip: source.parse().unwrap(),
            source_identity: identity,
            destination_ip: "10.0.0.9".parse().unwrap(),
            destination_port: port,
        }
    }

    #[test]
    fn allow_admits_only_what_it_matches() {
        let (x, y) = (id("demo", "x"), id("demo", "y"));
        let allow_x = policy(
            "allow-x",
            Action::Allow,
            vec![vec![Match {
                principals: vec![exact("cluster.local/ns/demo/sa/x")],
                ..Default::default()
            }]],
        );
        assert_eq!(check([&allow_x], &connection(Some(&x), "10.0.0.1", 80)), Ok(()));
        assert_eq!(
            check([&allow_x], &connection(Some(&y), "10.0.0.1", 80)),
            Err(Denied::NotAllowed(vec!["demo/allow-x".into()]))
        );
        assert!(
            check([&allow_x], &connection(None, "10.0.0.1", 80)).is_err(),
            "plaintext has no principal"
        );
        assert_eq!(
            check(std::iter::empty(), &connection(None, "10.0.0.1", 80)),
            Ok(()),
            "no policy: allowed"
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let x = id("demo", "x");
        let allow_all = policy("allow-all", Action::Allow, vec![]);
        let deny_port = policy(
            "deny-9090",
            Action::Deny,
            vec![vec![Match {
                destination_ports: vec![9090],
                ..Default::default()
            }]],
        );
        assert_eq!(
            check([&allow_all, &deny_port], &connection(Some(&x), "10.0.0.1", 80)),
            Ok(())
        );
        assert_eq!(
            check([&allow_all, &deny_port], &connection(Some(&x), "10.0.0.1", 9090)),
            Err(Denied::Policy("demo/deny-9090".into()))
        );
    }

    #[test]
    fn strict_mtls_denies_plaintext_only() {
        let strict = policy(
            "strict",
            Action::Deny,
            vec![vec![Match {
                not_principals: vec![presence()],
                ..Default::default()
            }]],
        );
        let x = id("demo", "x");
        assert_eq!(check([&strict], &connection(Some(&x), "10.0.0.1", 80)), Ok(()));
        assert_eq!(
            check([&strict], &connection(None, "10.0.0.1", 80)),
            Err(Denied::Policy("demo/strict".into()))
        );
        // Port-level: plaintext allowed on 8081 only.
        let ports = policy(
            "ports",
            Action::Deny,
            vec![
                vec![Match {
                    not_principals: vec![presence()],
                    ..Default::default()
                }],
                vec![Match {
                    not_destination_ports: vec![8081],
                    ..Default::default()
                }],
            ],
        );
        assert_eq!(check([&ports], &connection(None, "10.0.0.1", 8081)), Ok(()));
        assert!(check([&ports], &connection(None, "10.0.0.1", 8080)).is_err());
    }

    #[test]
    fn namespaces_ip_blocks_and_clause_semantics() {
        let (ours, theirs) = (id("demo", "x"), id("other", "x"));
        let allow = policy(
            "allow",
            Action::Allow,
            vec![
                vec![
                    Match {
                        namespaces: vec![exact("demo")],
                        ..Default::default()
                    },
                    Match {
                        source_ips: vec![cidr("192.168.0.0", 16)],
                        ..Default::default()
                    },
                ],
                vec![Match {
                    not_source_ips: vec![cidr("10.0.0.66", 32)],
                    ..Default::default()
                }],
            ],
        );
        assert_eq!(check([&allow], &connection(Some(&ours), "10.0.0.1", 80)), Ok(()));
        assert!(check([&allow], &connection(Some(&theirs), "10.0.0.1", 80)).is_err());
        assert_eq!(
            check([&allow], &connection(Some(&theirs), "192.168.4.4", 80)),
            Ok(()),
            "the ip block is the other OR branch"
        );
        assert!(
            check([&allow], &connection(Some(&ours), "10.0.0.66", 80)).is_err(),
            "second clause ANDed"
        );
        // A clause made only of empty matches never matches.
        let hollow = policy("hollow", Action::Deny, vec![vec![Match::default()]]);
        assert_eq!(check([&hollow], &connection(None, "10.0.0.1", 80)), Ok(()));
        assert!(contains(&cidr("fd00::", 8), "fdab::1".parse().unwrap()));
        assert!(!contains(&cidr("10.0.0.0", 8), "fd00::1".parse().unwrap()));
        assert!(contains(&cidr("0.0.0.0", 0), "1.2.3.4".parse().unwrap()));
    }
}
