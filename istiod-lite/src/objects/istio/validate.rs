//! What an AuthorizationPolicy must hold beyond its shape, following Istio's own validation
//! (`pkg/config/validation`): no part of a rule may be empty once parsed (an empty source,
//! operation or condition would otherwise match everything), no value may be an empty string,
//! and a DENY policy needs rules. `rules: [{}]` keeps the meaning Istio gives it: one rule that
//! matches every request (allow-all in an ALLOW policy).
//!
//! Two layers: [`AuthorizationPolicySpec::validate`] checks the typed spec, whatever its source
//! (translation fails closed on it); [`explicit_empties`] checks the document as written, where
//! `principals: []` or `from: []` would parse as if the field were absent: a list written empty
//! is a mistake (a template that rendered nothing), so it is an error rather than "unset".

use serde_json::Value;

use super::{AuthorizationAction, AuthorizationPolicySpec, Condition, Operation, Source};

/// Why a policy cannot be enforced as written, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct Invalid {
    /// `spec.rules[0].from[0].source`, as serde paths read.
    pub path: String,
    pub reason: String,
}

impl Invalid {
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

const SOURCE_FIELDS: &str = "principals, notPrincipals, requestPrincipals, notRequestPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks, remoteIpBlocks, notRemoteIpBlocks";
const OPERATION_FIELDS: &str = "hosts, notHosts, ports, notPorts, methods, notMethods, paths, notPaths";

impl AuthorizationPolicySpec {
    /// The first part of the spec that is empty or unsupported, if any.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.action == AuthorizationAction::Deny && self.rules.is_none() {
            return Err(Invalid::new(
                "spec.rules",
                "a DENY policy without rules denies nothing; write the rules it enforces",
            ));
        }
        for (i, rule) in self.rules.iter().flatten().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                from.source.validate(&format!("spec.rules[{i}].from[{j}].source"))?;
            }
            for (j, to) in rule.to.iter().enumerate() {
                to.operation.validate(&format!("spec.rules[{i}].to[{j}].operation"))?;
            }
            for (j, condition) in rule.when.iter().enumerate() {
                condition.validate(&format!("spec.rules[{i}].when[{j}]"))?;
            }
        }
        Ok(())
    }
}

/// Every value is a non-empty string.
fn no_empty_values(path: &str, fields: &[(&str, &Vec<String>)]) -> Result<(), Invalid> {
    for (field, values) in fields {
        if let Some(k) = values.iter().position(String::is_empty) {
            return Err(Invalid::new(format!("{path}.{field}[{k}]"), "empty value"));
        }
    }
    Ok(())
}

impl Source {
    fn validate(&self, path: &str) -> Result<(), Invalid> {
        for (field, values) in [
            ("serviceAccounts", &self.service_accounts),
            ("notServiceAccounts", &self.not_service_accounts),
        ] {
            if !values.is_empty() {
                return Err(Invalid::new(
                    format!("{path}.{field}"),
                    "not supported by istiod-lite; write principals (<trust domain>/ns/<namespace>/sa/<account>) instead",
                ));
            }
        }
        let fields = [
            ("principals", &self.principals),
            ("notPrincipals", &self.not_principals),
            ("requestPrincipals", &self.request_principals),
            ("notRequestPrincipals", &self.not_request_principals),
            ("namespaces", &self.namespaces),
            ("notNamespaces", &self.not_namespaces),
            ("ipBlocks", &self.ip_blocks),
            ("notIpBlocks", &self.not_ip_blocks),
            ("remoteIpBlocks", &self.remote_ip_blocks),
            ("notRemoteIpBlocks", &self.not_remote_ip_blocks),
        ];
        if fields.iter().all(|(_, values)| values.is_empty()) {
            return Err(Invalid::new(
                path,
                format!("empty source (it would match every peer); set at least one of {SOURCE_FIELDS}"),
            ));
        }
        no_empty_values(path, &fields)
    }
}

impl Operation {
    fn validate(&self, path: &str) -> Result<(), Invalid> {
        let fields = [
            ("hosts", &self.hosts),
            ("notHosts", &self.not_hosts),
            ("ports", &self.ports),
            ("notPorts", &self.not_ports),
            ("methods", &self.methods),
            ("notMethods", &self.not_methods),
            ("paths", &self.paths),
            ("notPaths", &self.not_paths),
        ];
        if fields.iter().all(|(_, values)| values.is_empty()) {
            return Err(Invalid::new(
                path,
                format!("empty operation (it would match every request); set at least one of {OPERATION_FIELDS}"),
            ));
        }
        no_empty_values(path, &fields)
    }
}

impl Condition {
    fn validate(&self, path: &str) -> Result<(), Invalid> {
        if self.key.is_empty() {
            return Err(Invalid::new(format!("{path}.key"), "empty key"));
        }
        if self.values.is_empty() && self.not_values.is_empty() {
            return Err(Invalid::new(
                path,
                format!("condition on {} has neither values nor notValues", self.key),
            ));
        }
        no_empty_values(path, &[("values", &self.values), ("notValues", &self.not_values)])
    }
}

/// The first list or map written empty inside `spec.rules[*]` of a policy document (`from: []`,
/// `source: {}`, `principals: []`). A rule itself may be `{}`: that is Istio's match-all rule.
pub fn explicit_empties(document: &Value) -> Result<(), Invalid> {
    let Some(rules) = document.pointer("/spec/rules").and_then(Value::as_array) else {
        return Ok(());
    };
    for (i, rule) in rules.iter().enumerate() {
        let Some(rule) = rule.as_object() else { continue };
        for (field, value) in rule {
            first_empty(value, &format!("spec.rules[{i}].{field}"))?;
        }
    }
    Ok(())
}

fn first_empty(value: &Value, path: &str) -> Result<(), Invalid> {
    const REASON: &str =
        "written empty: remove it, or list what it should match (an empty list or map never means \"anything\")";
    match value {
        Value::Array(items) if items.is_empty() => Err(Invalid::new(path, REASON)),
        Value::Object(fields) if fields.is_empty() => Err(Invalid::new(path, REASON)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(k, item)| first_empty(item, &format!("{path}[{k}]"))),
        Value::Object(fields) => fields
            .iter()
            .try_for_each(|(field, item)| first_empty(item, &format!("{path}.{field}"))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use crate::objects::{Object, ParseError, parse};

    fn policy(spec: &str) -> Result<Object, ParseError> {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: demo, resourceVersion: '7', managedFields: []}}\nspec:\n{spec}"
        );
        parse(serde_saphyr::from_str(&yaml).unwrap())
    }

    fn error(spec: &str) -> String {
        policy(spec).expect_err(spec).to_string()
    }

    #[test]
    fn the_match_all_rule_and_the_allow_nothing_policy_keep_istios_meaning() {
        for spec in [
            "  rules: [{}]\n",
            "  rules: []\n",
            "  {}\n",
            "  action: DENY\n  rules: [{}]\n",
        ] {
            policy(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        }
    }

    #[test]
    fn empty_parts_of_a_rule_are_errors_naming_their_path() {
        let cases = [
            (
                "  rules: [{from: [{}]}]\n",
                "field spec.rules[0].from[0]: written empty",
            ),
            ("  rules: [{from: []}]\n", "field spec.rules[0].from: written empty"),
            (
                "  rules: [{to: [{operation: {methods: []}}]}]\n",
                "field spec.rules[0].to[0].operation.methods: written empty",
            ),
            (
                "  rules: [{to: [{operation: {ports: null}}]}]\n",
                "field spec.rules[0].to[0].operation.ports: invalid type: null",
            ),
            ("  rules: [{to: [{}]}]\n", "field spec.rules[0].to[0]: written empty"),
            (
                "  rules: [{when: [{key: source.ip}]}]\n",
                "field spec.rules[0].when[0]: condition on source.ip has neither values nor notValues",
            ),
            (
                "  rules: [{from: [{source: {principals: ['']}}]}]\n",
                "field spec.rules[0].from[0].source.principals[0]: empty value",
            ),
            (
                "  rules: [{from: [{source: {serviceAccounts: [demo/admin]}}]}]\n",
                "field spec.rules[0].from[0].source.serviceAccounts: not supported by istiod-lite",
            ),
            (
                "  action: DENY\n",
                "field spec.rules: a DENY policy without rules denies nothing",
            ),
            (
                "  rules: [{from: [{source: {principals: [a]}, operation: {ports: ['80']}}]}]\n",
                "field spec.rules[0].from[0].operation: unknown field `operation`, expected `source`",
            ),
        ];
        for (spec, expected) in cases {
            let error = error(spec);
            assert!(
                error.starts_with(&format!("AuthorizationPolicy/demo/p: {expected}")),
                "{spec}: {error}"
            );
        }
    }

    #[test]
    fn unknown_fields_of_every_istio_spec_are_errors_and_metadata_stays_lenient() {
        let documents = [
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: demo}\nspec: {mtls: {mod: STRICT}}\n",
                "PeerAuthentication/demo/p: field spec.mtls.mod: unknown field `mod`, expected `mode`",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: demo}\nspec: {selectr: {matchLabels: {app: a}}, mtls: {mode: STRICT}}\n",
                "PeerAuthentication/demo/p: field spec.selectr: unknown field `selectr`",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec: {selector: {matchLabel: {app: a}}}\n",
                "AuthorizationPolicy/demo/p: field spec.selector.matchLabel: unknown field `matchLabel`, expected `matchLabels`",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e, namespace: demo}\nspec: {hosts: [a.example], ports: [{number: 80, name: http, protocl: HTTP}]}\n",
                "ServiceEntry/demo/e: field spec.ports[0].protocl: unknown field `protocl`",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: demo}\nspec: {address: 10.0.0.1, serviceAcount: a}\n",
                "WorkloadEntry/demo/w: field spec.serviceAcount: unknown field `serviceAcount`",
            ),
        ];
        for (yaml, expected) in documents {
            let error = parse(serde_saphyr::from_str(yaml).unwrap()).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{error}");
        }
        // Fields Kubernetes adds to metadata are no error.
        policy("  rules: [{from: [{source: {principals: [a]}}]}]\n").unwrap();
    }
}
