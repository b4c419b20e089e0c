//! A policy that fails validation can still reach translation from the Kubernetes API (typed
//! straight from the reflector, where `principals: []` reads as absent): it fails closed, for
//! ztunnel and for waypoints alike, and says why.

use std::sync::Arc;

use istiod_lite::objects::{AuthorizationPolicy, Object};
use istiod_lite::store::Objects;
use istiod_lite::translate::{Mesh, translate};
use mesh_core::proto::security::{Action, Rule};
use mesh_core::proto::waypoint::{L7Rule, l7_policy};

/// As the reflector decodes it: typed at once, without the files source's checks.
fn from_api(name: &str, spec: serde_json::Value) -> Object {
    let policy: AuthorizationPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": spec,
    }))
    .unwrap();
    Object::AuthorizationPolicy(Arc::new(policy))
}

#[test]
fn an_invalid_policy_from_the_api_allows_nothing_or_denies_everything() {
    let objects = Objects::new([
        from_api(
            "allow-empty",
            serde_json::json!({"rules": [{"from": [{"source": {"principals": []}}]}]}),
        ),
        from_api(
            "deny-empty",
            serde_json::json!({"action": "DENY", "rules": [{"to": [{"operation": {}}]}]}),
        ),
        from_api(
            "l7-allow-empty",
            serde_json::json!({
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
                "rules": [{"from": [{"source": {}}]}],
            }),
        ),
    ]);
    let translation = translate(&objects, &Mesh::default());
    let allow = translation
        .authorizations
        .iter()
        .find(|a| a.name == "allow-empty")
        .unwrap();
    assert_eq!(
        (allow.action, allow.rules.as_slice()),
        (Action::Allow as i32, &[][..]),
        "admits nothing"
    );
    let deny = translation
        .authorizations
        .iter()
        .find(|a| a.name == "deny-empty")
        .unwrap();
    assert_eq!(deny.action, Action::Deny as i32);
    assert_eq!(
        deny.rules,
        [Rule { clauses: vec![] }],
        "one rule matching every connection"
    );
    let l7 = translation
        .l7_policies
        .iter()
        .find(|p| p.name == "l7-allow-empty")
        .unwrap();
    assert_eq!(
        (l7.action, l7.rules.as_slice()),
        (l7_policy::Action::Allow as i32, &[] as &[L7Rule])
    );
    let reports: Vec<String> = translation
        .reports
        .iter()
        .map(|r| format!("{}: {}", r.object, r.message))
        .collect();
    for expected in [
        "AuthorizationPolicy/demo/allow-empty: invalid, enforced fail-closed (it allows nothing) until fixed: spec.rules[0].from[0].source: empty source",
        "AuthorizationPolicy/demo/deny-empty: invalid, enforced fail-closed (it denies every connection) until fixed: spec.rules[0].to[0].operation: empty operation",
        "AuthorizationPolicy/demo/l7-allow-empty: invalid, enforced fail-closed until fixed: spec.rules[0].from[0].source: empty source",
    ] {
        assert!(
            reports.iter().any(|r| r.starts_with(expected)),
            "{expected} not in {reports:#?}"
        );
    }
}
