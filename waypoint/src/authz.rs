//! L7 authorization as the waypoint enforces it per request, with Istio's semantics: a matching
//! DENY policy denies; with ALLOW policies present, only a request one of them matches is
//! admitted. A policy matches when any rule does; a rule when all its `from`, `to` and `when`
//! parts do (each `from`/`to` list matching when any entry does). Values are exact, `prefix*`,
//! `*suffix` or `*` (present). Bytes that are not HTTP are judged as Istio does: HTTP-only parts
//! of a rule never match in an ALLOW policy and are ignored in a DENY policy (deny more, not less).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use http::HeaderMap;
use mesh_core::identity::SpiffeId;
use mesh_core::proto::waypoint::{L7Condition, L7Operation, L7Policy, L7Rule, L7Source, l7_policy};
use mesh_core::xds::{Rejection, Update};
use prost::Message;

/// What a request is judged on.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    pub source: &'a SpiffeId,
    /// Not HTTP: only the source is known.
    pub opaque: bool,
}

fn value_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// `allowed` empty or one matches, and none of `excluded` matches.
fn field(allowed: &[String], excluded: &[String], value: Option<&str>) -> bool {
    let any = |patterns: &[String]| value.is_some_and(|v| patterns.iter().any(|p| value_matches(p, v)));
    (allowed.is_empty() || any(allowed)) && !any(excluded)
}

/// The source's principal as policies write it: the URI without `spiffe://`.
fn principal<'a>(request: &Request<'a>) -> &'a str {
    request.source.as_str().trim_start_matches("spiffe://")
}

fn source_matches(source: &L7Source, request: &Request<'_>) -> bool {
    field(&source.principals, &source.not_principals, Some(principal(request)))
        && field(
            &source.namespaces,
            &source.not_namespaces,
            Some(request.source.namespace()),
        )
}

fn operation_matches(operation: &L7Operation, request: &Request<'_>, deny: bool) -> bool {
    if request.opaque {
        return deny;
    }
    // Host patterns are lowercased once, when the policy arrives.
    let host = request.host.to_ascii_lowercase();
    field(&operation.hosts, &operation.not_hosts, Some(&host))
        && field(&operation.methods, &operation.not_methods, Some(request.method))
        && field(&operation.paths, &operation.not_paths, Some(request.path))
}

fn condition_matches(condition: &L7Condition, request: &Request<'_>, deny: bool) -> bool {
    if request.opaque && condition.key.starts_with("request.") {
        return deny;
    }
    let value = match condition
        .key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        Some(name) => request.headers.get(name).and_then(|v| v.to_str().ok()),
        None => match condition.key.as_str() {
            "source.principal" => Some(principal(request)),
            "source.namespace" => Some(request.source.namespace()),
            _ => None,
        },
    };
    field(&condition.values, &condition.not_values, value)
}

fn rule_matches(rule: &L7Rule, request: &Request<'_>, deny: bool) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, request)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, request, deny)))
        && rule.when.iter().all(|c| condition_matches(c, request, deny))
}

fn policy_name(policy: &L7Policy) -> String {
    format!("{}/{}", policy.namespace, policy.name)
}

/// Decides a request against the policies that apply to it; the denial names the policy.
pub fn check<'p>(policies: impl IntoIterator<Item = &'p L7Policy>, request: &Request<'_>) -> Result<(), String> {
    let mut allow_policies = Vec::new();
    let mut allowed = false;
    for policy in policies {
        let deny = policy.action == l7_policy::Action::Deny as i32;
        let matched = policy.rules.iter().any(|r| rule_matches(r, request, deny));
        if deny {
            if matched {
                return Err(format!("denied by DENY policy {}", policy_name(policy)));
            }
        } else {
            allowed |= matched;
            allow_policies.push(policy_name(policy));
        }
    }
    if allow_policies.is_empty() || allowed {
        Ok(())
    } else {
        Err(format!(
            "no ALLOW policy matched (checked: {})",
            allow_policies.join(", ")
        ))
    }
}

/// The L7 policies from xDS; what the proxy reads.
pub type Policies = Arc<RwLock<Vec<Arc<L7Policy>>>>;

/// Keeps the policies by name and publishes them as one list.
#[derive(Debug, Default)]
pub struct PolicyStore {
    by_name: BTreeMap<String, Arc<L7Policy>>,
    pub published: Policies,
}

impl PolicyStore {
    pub fn new(published: Policies) -> Self {
        Self {
            by_name: BTreeMap::new(),
            published,
        }
    }

    pub fn apply(&mut self, updates: Vec<Update>, removed: Vec<String>) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        for name in removed {
            self.by_name.remove(&name);
        }
        for update in updates {
            match L7Policy::decode(&*update.resource.value) {
                Ok(mut policy) => {
                    // Hosts compare case-insensitively: lowercase the patterns once, here.
                    for operation in policy.rules.iter_mut().flat_map(|r| r.to.iter_mut()) {
                        for host in operation.hosts.iter_mut().chain(operation.not_hosts.iter_mut()) {
                            *host = host.to_ascii_lowercase();
                        }
                    }
                    self.by_name.insert(update.name, Arc::new(policy));
                }
                Err(error) => rejected.push(Rejection {
                    name: update.name,
                    reason: format!("not an L7Policy: {error}"),
                }),
            }
        }
        *self.published.write().expect("not poisoned") = self.by_name.values().cloned().collect();
        rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(action: l7_policy::Action, rules: Vec<L7Rule>) -> L7Policy {
        L7Policy {
            name: "p".into(),
            namespace: "demo".into(),
            targets: vec!["Gateway/demo/waypoint".into()],
            action: action as i32,
            rules,
        }
    }

    fn to(methods: &[&str], paths: &[&str]) -> L7Rule {
        L7Rule {
            to: vec![L7Operation {
                methods: methods.iter().map(|m| (*m).to_owned()).collect(),
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn judge(
        policies: &[L7Policy],
        method: &str,
        path: &str,
        source: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<(), String> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.parse().unwrap());
        }
        let source: SpiffeId = source.parse().unwrap();
        check(
            policies,
            &Request {
                method,
                path,
                host: "server.demo",
                headers: &map,
                source: &source,
                opaque: method.is_empty(),
            },
        )
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

    #[test]
    fn allow_admits_only_matching_methods_and_paths() {
        let policies = [policy(l7_policy::Action::Allow, vec![to(&["GET"], &["/allowed*"])])];
        assert!(judge(&policies, "GET", "/allowed/x", CLIENT, &[]).is_ok());
        assert_eq!(
            judge(&policies, "DELETE", "/", CLIENT, &[]).unwrap_err(),
            "no ALLOW policy matched (checked: demo/p)"
        );
        assert!(judge(&policies, "GET", "/other", CLIENT, &[]).is_err());
    }

    #[test]
    fn deny_wins_and_names_itself() {
        let deny = L7Policy {
            name: "no-delete".into(),
            ..policy(l7_policy::Action::Deny, vec![to(&["DELETE"], &[])])
        };
        let allow_all = policy(l7_policy::Action::Allow, vec![L7Rule::default()]);
        assert_eq!(
            judge(&[allow_all.clone(), deny.clone()], "DELETE", "/", CLIENT, &[]).unwrap_err(),
            "denied by DENY policy demo/no-delete"
        );
        assert!(judge(&[allow_all, deny], "GET", "/", CLIENT, &[]).is_ok());
    }

    #[test]
    fn opaque_bytes_never_pass_http_only_allows_and_meet_http_only_denies() {
        let allow_get = [policy(l7_policy::Action::Allow, vec![to(&["GET"], &[])])];
        assert!(judge(&allow_get, "", "", CLIENT, &[]).is_err());
        let deny_delete = [policy(l7_policy::Action::Deny, vec![to(&["DELETE"], &[])])];
        assert!(
            judge(&deny_delete, "", "", CLIENT, &[]).is_err(),
            "denied more, not less"
        );
        let allow_client = [policy(
            l7_policy::Action::Allow,
            vec![L7Rule {
                from: vec![L7Source {
                    principals: vec!["cluster.local/ns/demo/sa/client".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        )];
        assert!(
            judge(&allow_client, "", "", CLIENT, &[]).is_ok(),
            "source-only rules still apply"
        );
    }

    #[test]
    fn sources_and_conditions() {
        let rule = L7Rule {
            from: vec![L7Source {
                principals: vec!["cluster.local/ns/demo/sa/*".into()],
                not_namespaces: vec!["legacy".into()],
                ..Default::default()
            }],
            when: vec![L7Condition {
                key: "request.headers[x-tenant]".into(),
                values: vec!["acme".into()],
                not_values: vec![],
            }],
            ..Default::default()
        };
        let policies = [policy(l7_policy::Action::Allow, vec![rule])];
        assert!(judge(&policies, "GET", "/", CLIENT, &[("x-tenant", "acme")]).is_ok());
        assert!(judge(&policies, "GET", "/", CLIENT, &[("x-tenant", "other")]).is_err());
        assert!(
            judge(&policies, "GET", "/", CLIENT, &[]).is_err(),
            "a missing header does not match"
        );
        assert!(
            judge(
                &policies,
                "GET",
                "/",
                "spiffe://cluster.local/ns/shop/sa/x",
                &[("x-tenant", "acme")]
            )
            .is_err()
        );
        assert!(
            judge(&[policy(l7_policy::Action::Allow, vec![])], "GET", "/", CLIENT, &[]).is_err(),
            "ALLOW without rules admits nothing"
        );
    }
}
