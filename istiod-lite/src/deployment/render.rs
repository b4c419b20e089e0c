//! The desired ServiceAccount, Deployment and Service of a waypoint Gateway: a pure function of the
//! Gateway, its overlay and the [`Settings`], modelled on Istio's waypoint template and written
//! as JSON (readable like the template), then merged with the overlay and typed.
//!
//! Everything is named after the Gateway, owned by it (so the API's garbage collector removes it
//! with the Gateway) and labelled [`MANAGED_LABEL`], so we may overwrite it later. The Deployment
//! has no `spec.replicas` unless the overlay sets it: `kubectl scale` and an HPA own that field.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use serde_json::{Value, json};

use super::overlay::{self, Overlay};
use super::{Error, GATEWAY_CLASS_LABEL, MANAGED_LABEL, MANAGED_VALUE, Settings};
use crate::objects::Gateway;
use crate::translate::waypoints::{GATEWAY_NAME_LABEL, HBONE_PORT};

/// The waypoint binary serves Prometheus metrics here (its `WAYPOINT_METRICS_ADDR` default).
pub const METRICS_PORT: u16 = 15020;
/// The waypoint binary answers `/healthz/ready` here (its `WAYPOINT_READINESS_ADDR` default).
pub const STATUS_PORT: u16 = 15021;
/// The container that runs the waypoint binary.
pub const CONTAINER: &str = "waypoint";
/// The ConfigMap with the mesh's root certificate, in every namespace (Istio's name).
pub const ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";
pub const ROOT_CERT_DIR: &str = "/var/run/secrets/istio";
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// The projected service account token the CA checks by TokenReview.
pub const TOKEN_VOLUME: &str = "istio-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
pub const TOKEN_AUDIENCE: &str = "istio-ca";
/// Twelve hours, as Istio asks; the kubelet refreshes the file well before it expires.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 43200;
/// Waypoint pods are never captured by ztunnel themselves (Istio sets the same on its waypoints).
const DATAPLANE_MODE: (&str, &str) = ("istio.io/dataplane-mode", "none");
/// The Gateway label that names the waypoint's network, passed on as `NETWORK`.
const NETWORK_LABEL: &str = "topology.istio.io/network";

/// What a waypoint Gateway asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub deployment: Deployment,
    pub service: Service,
}

/// The objects for `gateway`, with `config_map` (the one its parametersRef names) merged in.
pub fn desired(gateway: &Gateway, config_map: Option<&ConfigMap>, settings: &Settings) -> Result<Desired, Error> {
    let overlay = config_map.map(Overlay::parse).transpose()?.unwrap_or_default();
    Ok(Desired {
        service_account: overlay::apply(
            service_account(gateway),
            overlay.service_account.as_ref(),
            "serviceAccount",
        )?,
        deployment: overlay::apply(deployment(gateway, settings), overlay.deployment.as_ref(), "deployment")?,
        service: overlay::apply(service(gateway), overlay.service.as_ref(), "service")?,
    })
}

fn name_and_namespace(gateway: &Gateway) -> (&str, &str) {
    (
        gateway.metadata.name.as_deref().unwrap_or_default(),
        gateway.metadata.namespace.as_deref().unwrap_or_default(),
    )
}

/// The Gateway's `spec.infrastructure` labels or annotations, without the Gateway API's own
/// prefix (Istio drops those to avoid conflicts).
fn infrastructure(gateway: &Gateway, labels: bool) -> BTreeMap<String, String> {
    let Some(infrastructure) = &gateway.spec.infrastructure else {
        return BTreeMap::new();
    };
    let source = if labels {
        &infrastructure.labels
    } else {
        &infrastructure.annotations
    };
    source
        .iter()
        .filter(|(key, _)| !key.starts_with("gateway.networking.k8s.io/"))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// Labels of every object: the infrastructure labels, then ours (which win).
fn labels(gateway: &Gateway) -> BTreeMap<String, String> {
    let (name, _) = name_and_namespace(gateway);
    let mut labels = infrastructure(gateway, true);
    labels.insert(GATEWAY_NAME_LABEL.into(), name.into());
    labels.insert(GATEWAY_CLASS_LABEL.into(), gateway.spec.gateway_class_name.clone());
    labels.insert(MANAGED_LABEL.into(), MANAGED_VALUE.into());
    labels
}

/// The owner reference to the Gateway. Like Istio, not `controller: true`: the Gateway owns the
/// objects for garbage collection, and nothing else needs to claim them.
fn owner_reference(gateway: &Gateway) -> Value {
    let (name, _) = name_and_namespace(gateway);
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": name,
        "uid": gateway.metadata.uid.as_deref().unwrap_or_default(),
    })
}

fn metadata(gateway: &Gateway) -> Value {
    let (name, namespace) = name_and_namespace(gateway);
    let mut metadata = json!({
        "name": name,
        "namespace": namespace,
        "labels": labels(gateway),
        "ownerReferences": [owner_reference(gateway)],
    });
    let annotations = infrastructure(gateway, false);
    if !annotations.is_empty() {
        metadata["annotations"] = json!(annotations);
    }
    metadata
}

fn service_account(gateway: &Gateway) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(gateway)})
}

fn service(gateway: &Gateway) -> Value {
    let (name, _) = name_and_namespace(gateway);
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(gateway),
        "spec": {
            "type": "ClusterIP",
            "ipFamilyPolicy": "PreferDualStack",
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": [
                {"name": "status-port", "port": STATUS_PORT, "protocol": "TCP", "appProtocol": "tcp"},
                {"name": "mesh", "port": HBONE_PORT, "protocol": "TCP", "appProtocol": "hbone"},
            ],
        },
    })
}

fn deployment(gateway: &Gateway, settings: &Settings) -> Value {
    let (name, _) = name_and_namespace(gateway);
    let mut pod_labels: BTreeMap<String, String> = [
        ("sidecar.istio.io/inject", "false"),
        DATAPLANE_MODE,
        ("service.istio.io/canonical-name", name),
        ("service.istio.io/canonical-revision", "latest"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect();
    pod_labels.extend(labels(gateway));
    let mut pod_annotations = infrastructure(gateway, false);
    pod_annotations.extend(
        [
            ("prometheus.io/scrape", "true".to_owned()),
            ("prometheus.io/port", METRICS_PORT.to_string()),
            ("prometheus.io/path", "/metrics".to_owned()),
        ]
        .map(|(key, value)| (key.to_owned(), value)),
    );
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(gateway),
        "spec": {
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": {
                    "serviceAccountName": name,
                    "containers": [container(gateway, settings)],
                    "volumes": [
                        {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
                            "audience": TOKEN_AUDIENCE,
                            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                            "path": TOKEN_VOLUME,
                        }}]}},
                        {"name": "istiod-ca-cert", "configMap": {"name": ROOT_CERT_CONFIGMAP}},
                    ],
                },
            },
        },
    })
}

/// The waypoint container: only flags the `waypoint` binary reads (as environment variables), its
/// ports at the binary's defaults, Istio's probes and a locked-down security context.
fn container(gateway: &Gateway, settings: &Settings) -> Value {
    let (name, _) = name_and_namespace(gateway);
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let mut env = vec![
        json!({"name": "XDS_ADDRESS", "value": settings.xds_address}),
        json!({"name": "ROOT_CERT", "value": format!("{ROOT_CERT_DIR}/{ROOT_CERT_KEY}")}),
        json!({"name": "NODE_TOKEN_FILE", "value": format!("{TOKEN_DIR}/{TOKEN_VOLUME}")}),
        json!({"name": "TRUST_DOMAIN", "value": settings.trust_domain}),
        json!({"name": "GATEWAY_NAME", "value": name}),
        json!({"name": "NODE_NAME", "valueFrom": field("spec.nodeName")}),
        json!({"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")}),
        json!({"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")}),
    ];
    if let Some(network) = gateway.metadata.labels.as_ref().and_then(|l| l.get(NETWORK_LABEL)) {
        env.push(json!({"name": "NETWORK", "value": network}));
    }
    let ready = json!({"path": "/healthz/ready", "port": STATUS_PORT, "scheme": "HTTP"});
    json!({
        "name": CONTAINER,
        "image": settings.waypoint_image,
        "env": env,
        "ports": [
            {"name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"},
        ],
        "startupProbe": {"httpGet": ready, "failureThreshold": 30, "periodSeconds": 1, "timeoutSeconds": 1},
        "readinessProbe": {"httpGet": ready, "failureThreshold": 4, "periodSeconds": 15, "timeoutSeconds": 1},
        "securityContext": {
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": "istiod-ca-cert", "mountPath": ROOT_CERT_DIR, "readOnly": true},
        ],
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;

    pub(crate) fn gateway() -> Gateway {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "demo", "uid": "gw-uid", "generation": 2},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        }))
        .unwrap()
    }

    fn settings() -> Settings {
        Settings {
            waypoint_image: "registry.example/waypoint:1.0".into(),
            ..Settings::default()
        }
    }

    fn rendered(gateway: &Gateway) -> Desired {
        desired(gateway, None, &settings()).unwrap()
    }

    fn pod_spec(desired: &Desired) -> &PodSpec {
        desired.deployment.spec.template.spec.as_ref().unwrap()
    }

    fn waypoint_container(desired: &Desired) -> &Container {
        &pod_spec(desired).containers[0]
    }

    fn env<'a>(container: &'a Container, name: &str) -> &'a EnvVar {
        let env = container.env.as_ref().unwrap();
        env.iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name} in {env:?}"))
    }

    #[test]
    fn every_object_is_named_labelled_and_owned_by_the_gateway() {
        let desired = rendered(&gateway());
        let metas = [
            &desired.service_account.metadata,
            &desired.deployment.metadata,
            &desired.service.metadata,
        ];
        for meta in metas {
            assert_eq!(meta.name.as_deref(), Some("waypoint"));
            assert_eq!(meta.namespace.as_deref(), Some("demo"));
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels[GATEWAY_NAME_LABEL], "waypoint");
            assert_eq!(labels[GATEWAY_CLASS_LABEL], "istio-waypoint");
            assert_eq!(labels[MANAGED_LABEL], "istio.io-mesh-controller");
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            let owner = &owners[0];
            assert_eq!(
                (
                    owner.api_version.as_str(),
                    owner.kind.as_str(),
                    owner.name.as_str(),
                    owner.uid.as_str()
                ),
                ("gateway.networking.k8s.io/v1", "Gateway", "waypoint", "gw-uid")
            );
            assert_eq!(
                (owner.controller, owner.block_owner_deletion),
                (None, None),
                "as Istio: no controller"
            );
        }
    }

    #[test]
    fn the_deployment_leaves_replicas_to_scaling_and_selects_by_gateway_name() {
        let desired = rendered(&gateway());
        let spec = &desired.deployment.spec;
        assert_eq!(spec.replicas, None);
        let encoded = serde_json::to_value(&desired.deployment).unwrap();
        assert!(encoded["spec"].get("replicas").is_none(), "{encoded}");
        let selector = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(
            selector,
            &BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), "waypoint".to_owned())])
        );
        let pod_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(pod_labels[GATEWAY_NAME_LABEL], "waypoint");
        assert_eq!(
            pod_labels["istio.io/dataplane-mode"], "none",
            "ztunnel never captures a waypoint"
        );
        assert_eq!(pod_labels["sidecar.istio.io/inject"], "false");
        assert_eq!(pod_labels[MANAGED_LABEL], MANAGED_VALUE);
        let annotations = spec.template.metadata.as_ref().unwrap().annotations.as_ref().unwrap();
        assert_eq!(annotations["prometheus.io/port"], "15020");
        assert_eq!(annotations["prometheus.io/path"], "/metrics");
        assert_eq!(pod_spec(&desired).service_account_name.as_deref(), Some("waypoint"));
    }

    #[test]
    fn the_container_reaches_istiod_with_the_root_cert_and_a_projected_token() {
        let desired = rendered(&gateway());
        let container = waypoint_container(&desired);
        assert_eq!(container.name, CONTAINER);
        assert_eq!(container.image.as_deref(), Some("registry.example/waypoint:1.0"));
        let value = |name| env(container, name).value.as_deref();
        assert_eq!(value("XDS_ADDRESS"), Some("https://istiod-lite.istio-system.svc:15012"));
        assert_eq!(value("TRUST_DOMAIN"), Some("cluster.local"));
        assert_eq!(value("GATEWAY_NAME"), Some("waypoint"));
        let field = |name| {
            let source = env(container, name).value_from.as_ref().unwrap();
            source.field_ref.as_ref().unwrap().field_path.clone()
        };
        assert_eq!(field("NODE_NAME"), "spec.nodeName");
        assert_eq!(field("POD_NAMESPACE"), "metadata.namespace");
        assert_eq!(field("SERVICE_ACCOUNT"), "spec.serviceAccountName");

        // The files the flags name are the ones the volumes mount.
        let mounts = container.volume_mounts.as_ref().unwrap();
        let mount = |volume: &str| mounts.iter().find(|m| m.name == volume).unwrap();
        assert_eq!(mount(TOKEN_VOLUME).mount_path, "/var/run/secrets/tokens");
        assert_eq!(value("NODE_TOKEN_FILE"), Some("/var/run/secrets/tokens/istio-token"));
        assert_eq!(mount("istiod-ca-cert").mount_path, "/var/run/secrets/istio");
        assert_eq!(value("ROOT_CERT"), Some("/var/run/secrets/istio/root-cert.pem"));
        assert!(mounts.iter().all(|m| m.read_only == Some(true)));

        let volumes = pod_spec(&desired).volumes.as_ref().unwrap();
        let volume = |name: &str| volumes.iter().find(|v| v.name == name).unwrap();
        let sources = volume(TOKEN_VOLUME)
            .projected
            .as_ref()
            .unwrap()
            .sources
            .as_ref()
            .unwrap();
        let token = sources[0].service_account_token.as_ref().unwrap();
        assert_eq!(token.audience.as_deref(), Some("istio-ca"));
        assert_eq!(token.path, "istio-token");
        assert_eq!(token.expiration_seconds, Some(43200));
        let roots = volume("istiod-ca-cert").config_map.as_ref().unwrap();
        assert_eq!(roots.name, "istio-ca-root-cert");
    }

    #[test]
    fn the_container_serves_the_binarys_ports_and_is_probed_on_15021() {
        let desired = rendered(&gateway());
        let container = waypoint_container(&desired);
        let ports: Vec<(i32, Option<&str>)> = container
            .ports
            .iter()
            .flatten()
            .map(|p| (p.container_port, p.name.as_deref()))
            .collect();
        assert_eq!(
            ports,
            [
                (15008, Some("hbone")),
                (15020, Some("metrics")),
                (15021, Some("status-port"))
            ]
        );
        for probe in [&container.readiness_probe, &container.startup_probe] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.path.as_deref(), Some("/healthz/ready"));
            assert_eq!(get.port, IntOrString::Int(15021));
        }
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_owned()])
        );
    }

    /// Every variable we set is one the `waypoint` binary reads, and the ports we declare are its
    /// defaults: read from its source, so a rename there fails here.
    #[test]
    fn every_variable_set_is_one_the_waypoint_binary_reads() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let source: String = ["waypoint/src/config.rs", "mesh-core/src/control.rs"]
            .iter()
            .map(|file| std::fs::read_to_string(format!("{root}/{file}")).unwrap())
            .collect();
        let read: BTreeSet<&str> = source
            .split("env = \"")
            .skip(1)
            .map(|rest| &rest[..rest.find('"').unwrap()])
            .collect();
        let mut gateway = gateway();
        gateway.metadata.labels = Some(BTreeMap::from([(NETWORK_LABEL.to_owned(), "west".to_owned())]));
        let desired = rendered(&gateway);
        let container = waypoint_container(&desired);
        for var in container.env.iter().flatten() {
            assert!(
                read.contains(var.name.as_str()),
                "{} is not read by the waypoint: {read:?}",
                var.name
            );
        }
        assert_eq!(env(container, "NETWORK").value.as_deref(), Some("west"));
        for default in ["\"0.0.0.0:15008\"", "\"0.0.0.0:15020\"", "\"0.0.0.0:15021\""] {
            assert!(
                source.contains(default),
                "the waypoint no longer listens on {default} by default"
            );
        }
    }

    #[test]
    fn the_service_is_a_cluster_ip_with_the_mesh_and_status_ports() {
        let desired = rendered(&gateway());
        let spec = desired.service.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(
            spec.selector.as_ref().unwrap(),
            &BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), "waypoint".to_owned())])
        );
        let ports: Vec<_> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.port, p.app_protocol.as_deref()))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("status-port"), 15021, Some("tcp")),
                (Some("mesh"), 15008, Some("hbone"))
            ]
        );
    }

    #[test]
    fn infrastructure_labels_and_annotations_reach_every_object_but_not_over_ours() {
        let mut gateway = gateway();
        gateway.spec.infrastructure = serde_json::from_value(json!({
            "labels": {"team": "payments", "gateway.networking.k8s.io/gateway-name": "other"},
            "annotations": {"owner": "payments@example.com"},
        }))
        .unwrap();
        let desired = rendered(&gateway);
        for meta in [
            &desired.service_account.metadata,
            &desired.deployment.metadata,
            &desired.service.metadata,
        ] {
            assert_eq!(meta.labels.as_ref().unwrap()["team"], "payments");
            assert_eq!(meta.labels.as_ref().unwrap()[GATEWAY_NAME_LABEL], "waypoint");
            assert_eq!(meta.annotations.as_ref().unwrap()["owner"], "payments@example.com");
        }
        let template = desired.deployment.spec.template.metadata.as_ref().unwrap();
        assert_eq!(template.labels.as_ref().unwrap()["team"], "payments");
        assert_eq!(template.annotations.as_ref().unwrap()["owner"], "payments@example.com");
    }
}
