//! The RBAC evaluator that the RBAC tests of istiod-lite and the node agent use: exact grants
//! compare clean; refusals, unused rule parts, wildcards and cluster-wide grants used in one
//! namespace only are each named.

use kube_api_double::ApiCall;
use mesh_deploy_tests::rbac::{Access, Rbac, requests_of};

const MANIFESTS: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: reader}
rules:
  - {apiGroups: [""], resources: [pods], verbs: [list, watch]}
  - {apiGroups: ["apps"], resources: [deployments], verbs: [get, patch, create]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: reader}
subjects: [{kind: ServiceAccount, name: app, namespace: system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: own, namespace: system}
rules:
  - {apiGroups: [""], resources: [secrets], resourceNames: [ca], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: own, namespace: system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: own}
subjects: [{kind: ServiceAccount, name: app, namespace: system}]
"#;

const USER: &str = "system:serviceaccount:system:app";

fn call(verb: &str, group: &str, resource: &str, namespace: Option<&str>, name: Option<&str>) -> ApiCall {
    let (resource, subresource) = match resource.split_once('/') {
        Some((resource, sub)) => (resource, Some(sub.to_owned())),
        None => (resource, None),
    };
    ApiCall {
        user: USER.into(),
        verb: verb.into(),
        group: group.into(),
        resource: resource.into(),
        subresource,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    }
}

fn requests(calls: &[ApiCall]) -> Vec<Access> {
    requests_of(USER, calls, |_| false)
}

#[test]
fn exact_grants_compare_clean() {
    let grants = Rbac::from_yaml(MANIFESTS).grants("system", "app");
    let mut calls = vec![
        call("list", "", "pods", None, None),
        call("watch", "", "pods", None, None),
        call("get", "apps", "deployments", Some("demo"), Some("web")),
        // A server-side apply that creates its object: authorized as patch and as create.
        call("patch", "apps", "deployments", Some("demo"), Some("web")),
        call("patch", "apps", "deployments", Some("demo"), Some("web")),
        call("get", "", "secrets", Some("system"), Some("ca")),
    ];
    calls.push(ApiCall {
        user: "someone-else".into(),
        ..call("delete", "", "pods", Some("demo"), Some("x"))
    });
    let requests = requests(&calls);
    let creates: Vec<String> = requests
        .iter()
        .filter(|r| r.verb == "create")
        .map(ToString::to_string)
        .collect();
    assert_eq!(creates, ["create apps/deployments web in demo"], "the first apply only");
    assert!(
        !requests.iter().any(|r| r.verb == "delete"),
        "other users' calls are left out"
    );
    let comparison = grants.compare(&requests);
    assert!(comparison.is_exact(), "{comparison}");
}

#[test]
fn refusals_unused_parts_and_wide_grants_are_named() {
    let grants = Rbac::from_yaml(MANIFESTS).grants("system", "app");
    let calls = [
        call("list", "", "pods", None, None),
        // Another Secret than the one named, and a Role's grant outside its namespace.
        call("get", "", "secrets", Some("system"), Some("other")),
        call("get", "", "secrets", Some("demo"), Some("ca")),
        // A ClusterRole grant used in the subject's own namespace only.
        call("get", "apps", "deployments", Some("system"), Some("web")),
        call("patch", "apps", "deployments/status", Some("system"), Some("web")),
    ];
    let comparison = grants.compare(&requests(&calls));
    assert_eq!(
        comparison.refused,
        [
            "get core/secrets ca in demo",
            "get core/secrets other in system",
            "patch apps/deployments/status web in system"
        ]
    );
    assert_eq!(
        comparison.unused,
        [
            "ClusterRole reader rule 1: watch core/pods",
            "ClusterRole reader rule 2: patch apps/deployments",
            "ClusterRole reader rule 2: create apps/deployments",
            "Role own rule 1: get core/secrets ca",
        ]
    );
    assert_eq!(
        comparison.too_wide,
        [
            "ClusterRole reader rule 2: get apps/deployments is granted in every namespace but only used in system (a Role there would do)"
        ]
    );
}

#[test]
fn wildcards_are_too_wide_and_other_subjects_get_nothing() {
    let yaml = MANIFESTS.replace("verbs: [list, watch]", "verbs: [\"*\"]");
    let rbac = Rbac::from_yaml(&yaml);
    let comparison = rbac
        .grants("system", "app")
        .compare(&requests(&[call("list", "", "pods", None, None)]));
    assert!(
        comparison.too_wide[0].starts_with("ClusterRole reader rule 1: a wildcard"),
        "{comparison}"
    );
    let nobody = rbac.grants("system", "someone-else");
    assert!(!nobody.allows(&Access::from(&call("list", "", "pods", None, None))));
}
