//! A Gateway's `spec.infrastructure.parametersRef`: a ConfigMap in its namespace whose keys
//! `deployment`, `service` and `serviceAccount` hold YAML merged over what we render, Istio's
//! format. The merge is strategic merge patch's common case: maps merge key by key, `null`
//! removes a key, lists of named items (containers, env, volumes, ports) merge by `name`, any
//! other list is replaced.
//!
//! What an overlay may not do, so an overlay cannot detach an object from its Gateway: change the
//! name, namespace, owner references, our labels or the Deployment's selector. Fields the typed
//! object does not know are refused rather than dropped, so a typo is reported, not ignored.

use k8s_openapi::api::core::v1::ConfigMap;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::Error;
use crate::objects::Gateway;

/// The ConfigMap keys we read, as Istio names them.
pub const KEYS: [&str; 3] = ["deployment", "service", "serviceAccount"];

/// Fields an overlay must leave as rendered (JSON pointers; `~1` is `/`).
const FIXED: [&str; 6] = [
    "/metadata/name",
    "/metadata/namespace",
    "/metadata/ownerReferences",
    "/metadata/labels/gateway.istio.io~1managed",
    "/metadata/labels/gateway.networking.k8s.io~1gateway-name",
    "/spec/selector",
];

/// The overlays of one ConfigMap, parsed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overlay {
    pub deployment: Option<Value>,
    pub service: Option<Value>,
    pub service_account: Option<Value>,
}

/// The name of the ConfigMap `gateway` takes its parameters from, if it names one.
pub fn config_map_name(gateway: &Gateway) -> Result<Option<&str>, Error> {
    let Some(reference) = gateway
        .spec
        .infrastructure
        .as_ref()
        .and_then(|i| i.parameters_ref.as_ref())
    else {
        return Ok(None);
    };
    if reference.group.is_empty() && reference.kind == "ConfigMap" {
        Ok(Some(&reference.name))
    } else {
        Err(Error::InvalidParameters(format!(
            "unknown infrastructure parameters type {:?}/{:?}: only a ConfigMap (group \"\") is supported",
            reference.group, reference.kind
        )))
    }
}

impl Overlay {
    /// Parses every key of `config_map`; an unknown key or bad YAML is an error naming both.
    pub fn parse(config_map: &ConfigMap) -> Result<Self, Error> {
        let name = format!(
            "{}/{}",
            config_map.metadata.namespace.as_deref().unwrap_or_default(),
            config_map.metadata.name.as_deref().unwrap_or_default()
        );
        let mut overlay = Self::default();
        for (key, text) in config_map.data.iter().flatten() {
            let slot = match key.as_str() {
                "deployment" => &mut overlay.deployment,
                "service" => &mut overlay.service,
                "serviceAccount" => &mut overlay.service_account,
                _ => {
                    return Err(Error::InvalidParameters(format!(
                        "ConfigMap {name}: unsupported key {key:?} (supported: {})",
                        KEYS.join(", ")
                    )));
                }
            };
            let value: Value = serde_saphyr::from_str(text)
                .map_err(|e| Error::InvalidParameters(format!("ConfigMap {name} key {key:?}: {e}")))?;
            if !value.is_object() {
                return Err(Error::InvalidParameters(format!(
                    "ConfigMap {name} key {key:?}: expected a map of fields"
                )));
            }
            *slot = Some(value);
        }
        Ok(overlay)
    }
}

/// `rendered` with `patch` (from the ConfigMap key `key`) merged in, as the typed object.
pub fn apply<T: DeserializeOwned + Serialize>(rendered: Value, patch: Option<&Value>, key: &str) -> Result<T, Error> {
    let invalid = |message: String| Error::InvalidParameters(format!("overlay {key:?}: {message}"));
    let mut merged = rendered.clone();
    if let Some(patch) = patch {
        merge(&mut merged, patch);
        if let Some(field) = FIXED.iter().find(|p| rendered.pointer(p) != merged.pointer(p)) {
            return Err(invalid(format!("may not change {}", field.replace("~1", "/"))));
        }
    }
    let typed: T = serde_path_to_error::deserialize(merged.clone()).map_err(|e| invalid(e.to_string()))?;
    let again = serde_json::to_value(&typed).map_err(|e| invalid(e.to_string()))?;
    if let Some(path) = dropped(&merged, &again, String::new()) {
        return Err(invalid(format!("unknown field {path}")));
    }
    Ok(typed)
}

/// Merges `patch` into `base` (see the module documentation).
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    base.remove(key);
                } else if let Some(existing) = base.get_mut(key) {
                    merge(existing, value);
                } else {
                    base.insert(key.clone(), value.clone());
                }
            }
        }
        (Value::Array(items), Value::Array(patch)) if named(items) && named(patch) => {
            for item in patch {
                match items.iter_mut().find(|existing| existing["name"] == item["name"]) {
                    Some(existing) => merge(existing, item),
                    None => items.push(item.clone()),
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

fn named(items: &[Value]) -> bool {
    items.iter().all(|item| item.get("name").is_some_and(Value::is_string))
}

/// The first field of `merged` (a path like `.spec.template`) that typing it lost.
fn dropped(merged: &Value, typed: &Value, path: String) -> Option<String> {
    match (merged, typed) {
        (Value::Object(merged), Value::Object(typed)) => merged.iter().find_map(|(key, value)| {
            let path = format!("{path}.{key}");
            match typed.get(key) {
                None if !value.is_null() => Some(path),
                Some(typed) => dropped(value, typed, path),
                None => None,
            }
        }),
        (Value::Array(merged), Value::Array(typed)) if merged.len() == typed.len() => merged
            .iter()
            .zip(typed)
            .enumerate()
            .find_map(|(index, (merged, typed))| dropped(merged, typed, format!("{path}[{index}]"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use serde_json::json;

    use super::*;
    use crate::deployment::Settings;
    use crate::deployment::render::{self, CONTAINER, Desired};

    fn gateway(parameters: serde_json::Value) -> Gateway {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "demo", "uid": "gw-uid"},
            "spec": {"gatewayClassName": "istio-waypoint", "infrastructure": {"parametersRef": parameters}},
        }))
        .unwrap()
    }

    fn config_map(data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("waypoint-params".into()),
                namespace: Some("demo".into()),
                ..Default::default()
            },
            data: Some(data.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            ..Default::default()
        }
    }

    fn with(data: &[(&str, &str)]) -> Result<Desired, Error> {
        let gateway = gateway(json!({"group": "", "kind": "ConfigMap", "name": "waypoint-params"}));
        render::desired(&gateway, Some(&config_map(data)), &Settings::default())
    }

    fn invalid(result: Result<Desired, Error>) -> String {
        match result {
            Err(Error::InvalidParameters(message)) => message,
            other => panic!("expected InvalidParameters, got {other:?}"),
        }
    }

    #[test]
    fn the_parameters_ref_must_be_a_local_config_map() {
        let named = gateway(json!({"group": "", "kind": "ConfigMap", "name": "waypoint-params"}));
        assert_eq!(config_map_name(&named).unwrap(), Some("waypoint-params"));
        let secret = gateway(json!({"group": "", "kind": "Secret", "name": "waypoint-params"}));
        assert_eq!(
            invalid(config_map_name(&secret).map(|_| unreachable!())),
            "unknown infrastructure parameters type \"\"/\"Secret\": only a ConfigMap (group \"\") is supported"
        );
    }

    #[test]
    fn an_overlay_sets_replicas_and_resources_and_keeps_the_rest() {
        let desired = with(&[(
            "deployment",
            "spec:\n  replicas: 3\n  template:\n    spec:\n      containers:\n      - name: waypoint\n        resources:\n          limits: {cpu: 2, memory: 1Gi}\n          requests: {cpu: 100m}\n",
        )])
        .unwrap();
        let spec = &desired.deployment.spec;
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.containers.len(), 1, "merged by name, not appended");
        let container = &pod.containers[0];
        assert_eq!(container.name, CONTAINER);
        assert!(container.readiness_probe.is_some(), "the rest of the container is kept");
        let resources = container.resources.as_ref().unwrap();
        assert_eq!(
            resources.limits,
            Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("2".into())),
                ("memory".to_owned(), Quantity("1Gi".into()))
            ]))
        );
        assert_eq!(resources.requests.as_ref().unwrap()["cpu"], Quantity("100m".into()));
    }

    #[test]
    fn an_overlay_without_replicas_leaves_them_unset() {
        let desired = with(&[("deployment", "metadata:\n  annotations: {team: payments}\n")]).unwrap();
        assert_eq!(desired.deployment.spec.replicas, None);
        assert_eq!(
            desired.deployment.metadata.annotations.as_ref().unwrap()["team"],
            "payments"
        );
    }

    #[test]
    fn service_and_service_account_overlays_apply_to_their_objects() {
        let desired = with(&[
            (
                "service",
                "metadata:\n  annotations: {networking.istio.io/traffic-distribution: PreferClose}\n",
            ),
            (
                "serviceAccount",
                "metadata:\n  annotations: {iam.example/role: waypoint}\n",
            ),
        ])
        .unwrap();
        let annotations = |meta: &kube::api::ObjectMeta| meta.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations(&desired.service.metadata)["networking.istio.io/traffic-distribution"],
            "PreferClose"
        );
        assert_eq!(
            annotations(&desired.service_account.metadata)["iam.example/role"],
            "waypoint"
        );
        assert!(annotations(&desired.deployment.metadata).is_empty());
    }

    #[test]
    fn null_removes_a_field_and_unnamed_lists_are_replaced() {
        let mut base = json!({"a": {"b": 1, "c": 2}, "args": ["x", "y"]});
        merge(&mut base, &json!({"a": {"b": null}, "args": ["z"]}));
        assert_eq!(base, json!({"a": {"c": 2}, "args": ["z"]}));
    }

    #[test]
    fn overlays_that_detach_mistype_or_misname_are_refused_with_the_reason() {
        assert_eq!(
            invalid(with(&[("deployment", "metadata: {name: other}\n")])),
            "overlay \"deployment\": may not change /metadata/name"
        );
        assert_eq!(
            invalid(with(&[("deployment", "spec:\n  selector: {matchLabels: {app: x}}\n")])),
            "overlay \"deployment\": may not change /spec/selector"
        );
        assert_eq!(
            invalid(with(&[(
                "service",
                "metadata: {labels: {gateway.istio.io/managed: mine}}\n"
            )])),
            "overlay \"service\": may not change /metadata/labels/gateway.istio.io/managed"
        );
        assert_eq!(
            invalid(with(&[(
                "deployment",
                "spec:\n  template:\n    spec:\n      containers:\n      - name: waypoint\n        resource: {limits: {cpu: 2}}\n"
            )])),
            "overlay \"deployment\": unknown field .spec.template.spec.containers[0].resource"
        );
        assert!(
            invalid(with(&[("deployment", "spec: {replicas: many}\n")]))
                .starts_with("overlay \"deployment\": spec.replicas: invalid type"),
        );
        assert_eq!(
            invalid(with(&[("horizontalPodAutoscaler", "spec: {}\n")])),
            "ConfigMap demo/waypoint-params: unsupported key \"horizontalPodAutoscaler\" (supported: deployment, service, serviceAccount)"
        );
        assert_eq!(
            invalid(with(&[("deployment", "- just\n- a list\n")])),
            "ConfigMap demo/waypoint-params key \"deployment\": expected a map of fields"
        );
    }
}
