//! Translation rules, each from a YAML fixture: enrolment, workload and service fields, waypoint
//! precedence, AuthorizationPolicy (scopes, matches, HTTP fields), PeerAuthentication (STRICT,
//! port-level), ServiceEntry and WorkloadEntry.

use std::collections::BTreeMap;
use std::net::IpAddr;

use istiod_lite::objects;
use istiod_lite::store::Objects;
use istiod_lite::translate::{Mesh, Translation, translate};
use mesh_core::proto::security::{Action, Authorization, Match, Scope, StringMatch, string_match};
use mesh_core::proto::workload::{
    GatewayAddress, NamespacedHostname, NetworkAddress, Port, Service, TunnelProtocol, Workload, WorkloadStatus,
    gateway_address,
};

fn load(yaml: &str) -> Translation {
    load_with(yaml, &Mesh::default())
}

fn load_with(yaml: &str, mesh: &Mesh) -> Translation {
    let mut reader = yaml.as_bytes();
    let objects: Vec<_> = serde_saphyr::read::<_, serde_json::Value>(&mut reader)
        .map(|document| objects::parse(document.unwrap()).unwrap())
        .collect();
    translate(&Objects::new(objects), mesh)
}

fn workload<'a>(translation: &'a Translation, name: &str) -> &'a Workload {
    translation
        .workloads
        .iter()
        .find(|w| w.name == name)
        .unwrap_or_else(|| panic!("no workload {name}"))
}

fn service<'a>(translation: &'a Translation, name: &str) -> &'a Service {
    translation
        .services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

fn policy<'a>(translation: &'a Translation, namespace: &str, name: &str) -> &'a Authorization {
    translation
        .authorizations
        .iter()
        .find(|a| a.namespace == namespace && a.name == name)
        .unwrap_or_else(|| panic!("no policy {namespace}/{name}"))
}

fn reports_for(translation: &Translation, object: &str) -> Vec<String> {
    translation
        .reports
        .iter()
        .filter(|r| r.object == object)
        .map(|r| r.message.clone())
        .collect()
}

fn ip(text: &str) -> Vec<u8> {
    match text.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn port(service_port: u32, target_port: u32) -> Port {
    Port {
        service_port,
        target_port,
        ..Default::default()
    }
}

fn exact(value: &str) -> StringMatch {
    StringMatch {
        match_type: Some(string_match::MatchType::Exact(value.into())),
    }
}

const WORKLOADS: &str = include_str!("fixtures/workloads.yaml");

#[test]
fn pod_becomes_a_workload_with_istio_fields() {
    let t = load(WORKLOADS);
    let w = workload(&t, "server-7d4b9c-x2x");
    assert_eq!(w.uid, "Kubernetes//Pod/demo/server-7d4b9c-x2x");
    assert_eq!(w.namespace, "demo");
    assert_eq!(w.addresses, [ip("10.0.1.5"), ip("fd00::5")]);
    assert_eq!(w.service_account, "server");
    assert_eq!(w.node, "node-1");
    assert_eq!(w.trust_domain, "", "left empty for cluster.local, as Istio does");
    assert_eq!(
        (w.canonical_name.as_str(), w.canonical_revision.as_str()),
        ("server", "v2")
    );
    assert_eq!(w.workload_name, "server", "the Deployment behind the ReplicaSet");
    assert_eq!(w.status, WorkloadStatus::Healthy as i32);
    assert_eq!(w.cluster_id, "Kubernetes");
    // http resolves to the container's 8080; grpc names a UDP port, so it is left out for this pod.
    assert_eq!(
        w.services["demo/server.demo.svc.cluster.local"].ports,
        [port(80, 8080), port(15000, 15000)]
    );
    assert_eq!(
        w.services["demo/headless.demo.svc.cluster.local"].ports,
        [port(8080, 8080)]
    );

    let client = workload(&t, "client");
    assert_eq!(
        (client.canonical_name.as_str(), client.canonical_revision.as_str()),
        ("client", "1.2")
    );
    assert_eq!(client.workload_name, "client");
    let plain = workload(&t, "plain");
    assert_eq!(plain.service_account, "default");
    assert_eq!(
        (plain.canonical_name.as_str(), plain.canonical_revision.as_str()),
        ("plain", "latest")
    );
    assert_eq!(plain.status, WorkloadStatus::Unhealthy as i32, "no Ready condition");
    assert_eq!(workload(&t, "batch").status, WorkloadStatus::Unhealthy as i32);
    assert!(
        t.workloads.iter().all(|w| w.name != "done"),
        "finished pods are not workloads"
    );
}

#[test]
fn enrolment_follows_pod_then_namespace_and_skips_sidecars() {
    let t = load(WORKLOADS);
    let tunnel = |name| TunnelProtocol::try_from(workload(&t, name).tunnel_protocol).unwrap();
    assert_eq!(tunnel("server-7d4b9c-x2x"), TunnelProtocol::Hbone, "ambient namespace");
    assert_eq!(
        tunnel("batch"),
        TunnelProtocol::None,
        "pod label none beats the namespace"
    );
    assert_eq!(
        tunnel("client"),
        TunnelProtocol::Hbone,
        "pod label ambient in a plain namespace"
    );
    assert_eq!(tunnel("plain"), TunnelProtocol::None);
    assert_eq!(
        tunnel("sidecar"),
        TunnelProtocol::None,
        "sidecar pods are never captured"
    );
}

#[test]
fn on_kubernetes_a_pod_speaks_hbone_only_once_its_capture_is_reported() {
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: starting, namespace: demo}\nspec: {nodeName: n1, containers: []}\nstatus: {podIP: 10.0.0.1}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: captured, namespace: demo, annotations: {ambient.istio.io/redirection: enabled}}\n\
        spec: {nodeName: n1, containers: []}\nstatus: {podIP: 10.0.0.2}\n";
    let mesh = Mesh {
        require_redirection: true,
        ..Mesh::default()
    };
    let t = load_with(yaml, &mesh);
    let tunnel = |name| TunnelProtocol::try_from(workload(&t, name).tunnel_protocol).unwrap();
    assert_eq!(
        tunnel("starting"),
        TunnelProtocol::None,
        "no annotation yet: not reached over HBONE"
    );
    assert_eq!(tunnel("captured"), TunnelProtocol::Hbone);
    let files = load(yaml);
    let tunnel = |name| TunnelProtocol::try_from(workload(&files, name).tunnel_protocol).unwrap();
    assert_eq!(
        tunnel("starting"),
        TunnelProtocol::Hbone,
        "the lab's files need no agent annotation"
    );
}

#[test]
fn services_carry_cluster_ips_and_ports() {
    let t = load(WORKLOADS);
    let s = service(&t, "server");
    assert_eq!(s.hostname, "server.demo.svc.cluster.local");
    assert_eq!(
        s.addresses,
        [NetworkAddress {
            network: String::new(),
            address: ip("10.96.0.10")
        }]
    );
    // Named target ports are resolved per workload: 0 here. UDP ports are not ztunnel's.
    assert_eq!(s.ports, [port(80, 0), port(9090, 0), port(15000, 15000)]);
    assert!(service(&t, "headless").addresses.is_empty());
    assert!(
        t.services.iter().all(|s| s.name != "external"),
        "ExternalName services are skipped"
    );
    let resources = t.resources();
    let names: Vec<&str> = resources[0].1.iter().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&"demo/server.demo.svc.cluster.local"));
    assert!(names.contains(&"Kubernetes//Pod/demo/server-7d4b9c-x2x"));
}

#[test]
fn waypoint_binding_narrower_wins_and_none_opts_out() {
    let t = load(include_str!("fixtures/waypoints.yaml"));
    let ns_waypoint = GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: "demo".into(),
            hostname: "ns-wp.demo.svc.cluster.local".into(),
        })),
        hbone_mtls_port: 15008,
    };
    let workload_waypoint = GatewayAddress {
        destination: Some(gateway_address::Destination::Address(NetworkAddress {
            network: String::new(),
            address: ip("10.0.9.9"),
        })),
        hbone_mtls_port: 15008,
    };
    assert_eq!(
        service(&t, "plain").waypoint,
        Some(ns_waypoint),
        "the namespace's waypoint"
    );
    // `special` names a waypoint that serves workloads only: the service gets none.
    assert_eq!(service(&t, "special").waypoint, None);
    assert_eq!(service(&t, "optout").waypoint, None);
    assert_eq!(
        service(&t, "broken").waypoint,
        None,
        "a missing waypoint is no waypoint, no fallback"
    );
    assert_eq!(
        reports_for(&t, "Service/demo/broken"),
        [
            "istio.io/use-waypoint=missing: no Gateway of class istio-waypoint named demo/missing; traffic is not sent to a waypoint"
        ]
    );
    assert_eq!(service(&t, "ns-wp").waypoint, None, "the waypoint's own service");
    // Workloads: the namespace waypoint serves services only; the pod's own label wins.
    assert_eq!(workload(&t, "follower").waypoint, None);
    assert_eq!(workload(&t, "direct").waypoint, Some(workload_waypoint));
    assert_eq!(
        workload(&t, "ns-wp-6d8f-abc").waypoint,
        None,
        "waypoint pods never use a waypoint"
    );
}

const POLICIES: &str = include_str!("fixtures/policies.yaml");

#[test]
fn authorization_policies_keep_scope_action_and_matches() {
    let t = load(POLICIES);
    let global = policy(&t, "istio-system", "deny-range");
    assert_eq!(
        (global.scope, global.action),
        (Scope::Global as i32, Action::Deny as i32)
    );
    let sources = &global.rules[0].clauses[0].matches[0].source_ips;
    assert_eq!(sources.len(), 2);
    assert_eq!((sources[0].address.clone(), sources[0].length), (ip("192.0.2.0"), 24));
    assert_eq!(
        (sources[1].address.clone(), sources[1].length),
        (ip("198.51.100.7"), 32)
    );

    let ns = policy(&t, "demo", "ns-allow");
    assert_eq!((ns.scope, ns.action), (Scope::Namespace as i32, Action::Allow as i32));
    let clauses = &ns.rules[0].clauses;
    assert_eq!(clauses.len(), 4, "from, to, and one per when condition");
    let from = &clauses[0].matches;
    assert_eq!(from[0].namespaces, [exact("demo")]);
    assert_eq!(
        from[1].principals,
        [
            StringMatch {
                match_type: Some(string_match::MatchType::Prefix("cluster.local/ns/".into()))
            },
            StringMatch {
                match_type: Some(string_match::MatchType::Suffix("/sa/admin".into()))
            },
            StringMatch {
                match_type: Some(string_match::MatchType::Presence(()))
            },
        ]
    );
    assert_eq!(from[1].not_principals, [exact("cluster.local/ns/demo/sa/evil")]);
    assert_eq!(clauses[1].matches[0].destination_ports, [8080, 9090]);
    assert_eq!(clauses[1].matches[0].not_destination_ports, [15000]);
    let when_ip = &clauses[2].matches[0];
    assert_eq!(
        (when_ip.source_ips[0].length, when_ip.not_source_ips[0].length),
        (16, 32)
    );
    assert_eq!(clauses[3].matches[0].destination_ports, [8080]);

    let selected = policy(&t, "demo", "server-only");
    assert_eq!(selected.scope, Scope::WorkloadSelector as i32);
    assert_eq!(
        selected.rules.len(),
        1,
        "rules: [{{}}] is one rule that matches everything"
    );
    assert!(selected.rules[0].clauses.is_empty());
    // Selector policies are listed by the workloads they select; scoped ones are not.
    assert_eq!(
        workload(&t, "server").authorization_policies,
        ["demo/allow-get", "demo/server-only"]
    );
    assert_eq!(workload(&t, "other").authorization_policies, ["demo/named-port"]);
    let resources = t.resources();
    let names: Vec<&str> = resources[1].1.iter().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&"demo/ns-allow") && names.contains(&"istio-system/deny-range"));
}

#[test]
fn http_fields_drop_allow_rules_and_are_stripped_from_deny_rules() {
    let t = load(POLICIES);
    let allow = policy(&t, "demo", "allow-get");
    assert_eq!(allow.rules.len(), 1, "the rule with methods is dropped");
    assert_eq!(allow.rules[0].clauses[0].matches[0].namespaces, [exact("ops")]);
    let report = reports_for(&t, "AuthorizationPolicy/demo/allow-get");
    assert_eq!(report.len(), 1);
    assert!(
        report[0].starts_with(
            "partly applied: ztunnel enforces L4 attributes only (found: methods); ALLOW rules using them are omitted"
        ),
        "{report:?}"
    );

    let deny = policy(&t, "demo", "deny-delete");
    assert_eq!(deny.rules.len(), 1);
    assert_eq!(
        deny.rules[0].clauses.len(),
        1,
        "the header condition is gone, the port stays"
    );
    assert_eq!(
        deny.rules[0].clauses[0].matches,
        [Match {
            destination_ports: vec![9090],
            ..Default::default()
        }]
    );
    let report = reports_for(&t, "AuthorizationPolicy/demo/deny-delete");
    assert!(
        report[0].contains("found: methods, when request.headers[x-debug]")
            && report[0].contains("DENY rules are enforced without them"),
        "{report:?}"
    );

    // A named port cannot be enforced: the ALLOW rule fails closed (no rule: allows nothing).
    assert!(policy(&t, "demo", "named-port").rules.is_empty());
    assert!(reports_for(&t, "AuthorizationPolicy/demo/named-port")[0].contains("ports \"http\" (not a port number)"));

    assert!(
        t.authorizations
            .iter()
            .all(|a| a.name != "audit" && a.name != "waypoint-l7")
    );
    assert_eq!(
        reports_for(&t, "AuthorizationPolicy/demo/audit"),
        ["ztunnel does not enforce the Audit action; policy ignored"]
    );
}

#[test]
fn strict_mtls_denies_plaintext_per_workload_and_port() {
    let t = load(include_str!("fixtures/mtls.yaml"));
    let strict = policy(&t, "istio-system", "istio_converted_static_strict");
    assert_eq!(
        (strict.scope, strict.action),
        (Scope::WorkloadSelector as i32, Action::Deny as i32)
    );
    let plaintext = Match {
        not_principals: vec![StringMatch {
            match_type: Some(string_match::MatchType::Presence(())),
        }],
        ..Default::default()
    };
    assert_eq!(strict.rules[0].clauses[0].matches, std::slice::from_ref(&plaintext));

    let keys = |name| workload(&t, name).authorization_policies.clone();
    assert_eq!(
        keys("app"),
        ["istio-system/istio_converted_static_strict"],
        "namespace STRICT; the older policy wins"
    );
    assert!(keys("legacy").is_empty(), "its selector policy makes it PERMISSIVE");
    assert!(keys("web").is_empty(), "mesh PERMISSIVE");
    assert_eq!(keys("metrics"), ["strict/converted_peer_authentication_metrics-port"]);
    assert_eq!(keys("db"), ["relaxed/converted_peer_authentication_db-port"]);

    // STRICT with 8081 exempt: deny plaintext unless the port is 8081.
    let metrics = policy(&t, "strict", "converted_peer_authentication_metrics-port");
    let clauses = &metrics.rules[0].clauses;
    assert_eq!(clauses[0].matches, std::slice::from_ref(&plaintext));
    assert_eq!(
        clauses[1].matches,
        [Match {
            not_destination_ports: vec![8081],
            ..Default::default()
        }]
    );
    // PERMISSIVE with 9443 STRICT: deny plaintext on 9443 only.
    let db = policy(&t, "relaxed", "converted_peer_authentication_db-port");
    assert_eq!(db.rules.len(), 1);
    assert_eq!(
        db.rules[0].clauses[0].matches,
        [Match {
            destination_ports: vec![9443],
            ..plaintext
        }]
    );
}

#[test]
fn no_peer_authentication_means_no_strict_policy() {
    let t = load(WORKLOADS);
    assert!(t.authorizations.is_empty());
}

#[test]
fn service_entries_and_workload_entries() {
    let t = load(include_str!("fixtures/entries.yaml"));
    let hosts: Vec<&str> = t
        .services
        .iter()
        .filter(|s| s.name == "payments")
        .map(|s| s.hostname.as_str())
        .collect();
    assert_eq!(hosts, ["payments.example.com", "pay.internal"], "one service per host");
    let payments = service(&t, "payments");
    assert_eq!(payments.addresses[0].address, ip("240.0.0.10"));
    assert_eq!(payments.ports, [port(443, 8443)]);
    assert_eq!(
        payments.subject_alt_names,
        ["spiffe://cluster.local/ns/shop/sa/payments"]
    );

    let endpoints: Vec<&Workload> = t
        .workloads
        .iter()
        .filter(|w| w.uid.contains("/ServiceEntry/"))
        .collect();
    assert_eq!(endpoints.len(), 2);
    assert_eq!(
        endpoints[0].uid,
        "Kubernetes/networking.istio.io/ServiceEntry/shop/payments/192.0.2.10"
    );
    assert_eq!(endpoints[0].service_account, "payments");
    assert_eq!(endpoints[0].services["shop/pay.internal"].ports, [port(443, 8443)]);
    assert_eq!(
        endpoints[1].services["shop/payments.example.com"].ports,
        [port(443, 9443)],
        "endpoint port override"
    );
    assert_eq!(endpoints[1].capacity, Some(3));

    assert!(t.services.iter().all(|s| s.name != "too-wide"));
    assert!(
        reports_for(&t, "ServiceEntry/shop/too-wide")[0]
            .contains("\"240.0.0.0/24\" is not an IP or a single-address CIDR")
    );

    let vm = workload(&t, "vm-1");
    assert_eq!(vm.uid, "Kubernetes/networking.istio.io/WorkloadEntry/shop/vm-1");
    assert_eq!(vm.addresses, [ip("10.5.0.1")]);
    assert_eq!(vm.service_account, "vm");
    assert_eq!(vm.tunnel_protocol, TunnelProtocol::Hbone as i32);
    assert_eq!(vm.canonical_revision, "v3");
    let expected: BTreeMap<String, Vec<Port>> = BTreeMap::from([
        ("shop/vm-svc.shop.svc.cluster.local".to_owned(), vec![port(80, 8081)]),
        ("shop/vm.shop.internal".to_owned(), vec![port(80, 8081)]),
    ]);
    let services: BTreeMap<String, Vec<Port>> = vm.services.iter().map(|(k, v)| (k.clone(), v.ports.clone())).collect();
    assert_eq!(
        services, expected,
        "selected by the Service and the ServiceEntry, with the entry's named port"
    );
}

#[test]
fn http_routes_attached_to_services_are_resolved_for_waypoints() {
    use mesh_core::proto::waypoint::{http_filter, http_match, value_match};
    let translation = load(
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews-v2, namespace: shop}\nspec: {ports: [{port: 8080}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: split, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: reviews}, {group: \"\", kind: Service, name: missing}, {name: some-gateway}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-version, value: v2}], method: get}]\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-routed, value: \"yes\"}]}}, {type: Mirror}]\n    backendRefs: [{name: reviews-v2, port: 8080, weight: 90}, {name: gone, port: 80, weight: 10}, {name: reviews}]\n    timeouts: {request: 500ms}\n    retry: {attempts: 2, codes: [503], backoff: 100ms}\n  - matches: [{path: {type: RegularExpression, value: \"/bad(\"}}, {queryParams: [{type: RegularExpression, name: q, value: \"a.*\"}]}]\n",
    );
    assert_eq!(translation.http_routes.len(), 1);
    let route = &translation.http_routes[0];
    assert_eq!((route.namespace.as_str(), route.name.as_str()), ("shop", "split"));
    assert_eq!(
        route.parents,
        ["shop/reviews.shop.svc.cluster.local"],
        "only existing Service parents"
    );
    let rule = &route.rules[0];
    let matched = &rule.matches[0];
    assert_eq!(matched.path, Some(http_match::Path::Prefix("/api".into())));
    assert_eq!(matched.method, "GET");
    assert_eq!(matched.headers[0].value, Some(value_match::Value::Exact("v2".into())));
    assert!(matches!(
        rule.filters[..],
        [mesh_core::proto::waypoint::HttpFilter {
            kind: Some(http_filter::Kind::RequestHeaderModifier(_))
        }]
    ));
    let backends: Vec<_> = rule
        .backends
        .iter()
        .map(|b| (b.service.as_str(), b.port, b.weight))
        .collect();
    assert_eq!(
        backends,
        [
            ("shop/reviews-v2.shop.svc.cluster.local", 8080, 90),
            ("shop/gone.shop.svc.cluster.local", 80, 10)
        ],
        "a backend without a port is left out"
    );
    assert_eq!(rule.timeout_ms, 500);
    let retry = rule.retry.as_ref().unwrap();
    assert_eq!(
        (retry.attempts, retry.codes.as_slice(), retry.backoff_ms),
        (2, &[503][..], 100)
    );
    // The bad regex drops its match only; the valid one stays.
    assert_eq!(route.rules[1].matches.len(), 1);
    assert_eq!(
        route.rules[1].matches[0].query_params[0].value,
        Some(value_match::Value::Regex("a.*".into()))
    );
    let reports = reports_for(&translation, "HTTPRoute/shop/split");
    for expected in [
        "spec.parentRefs[1]: Service shop/missing not found",
        "spec.rules[0].filters[1].type: filter \"Mirror\" is not supported",
        "spec.rules[0].backendRefs[1]: Service shop/gone not found",
        "spec.rules[0].backendRefs[2]: port is required for a Service backend",
    ] {
        assert!(reports.iter().any(|r| r == expected), "{expected} not in {reports:?}");
    }
    assert!(
        reports
            .iter()
            .any(|r| r.starts_with("spec.rules[1].matches[0].path.value: regex \"/bad(\"")),
        "{reports:?}"
    );
}
