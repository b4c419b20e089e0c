//! Gateway API resources (gateway.networking.k8s.io/v1): GatewayClass, Gateway (a waypoint when its
//! class is `istio-waypoint`) and HTTPRoute, with the fields ambient mode uses.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// A class of Gateways and the controller that implements it; istiod-lite creates `istio-waypoint`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GatewayClass",
    schema = "disabled",
    derive = "PartialEq",
    status = "GatewayClassStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct GatewayClassSpec {
    pub controller_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayClassStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "Gateway",
    namespaced,
    schema = "disabled",
    derive = "PartialEq",
    status = "GatewayStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
    /// Where the deployed proxy's labels, annotations and parameters come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infrastructure: Option<GatewayInfrastructure>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayInfrastructure {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// For waypoints, a ConfigMap in the Gateway's namespace (group `""`, kind `ConfigMap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters_ref: Option<LocalParametersReference>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalParametersReference {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    #[serde(default)]
    pub hostname: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayStatus {
    #[serde(default)]
    pub addresses: Vec<GatewayAddress>,
    /// `Accepted` and `Programmed`, as the Gateway API defines them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    namespaced,
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct HTTPRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HTTPRouteRule>,
    /// Experimental (`useDefaultGateways`): accepted, not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_default_gateways: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct ParentReference {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub section_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct HTTPRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HTTPRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HTTPRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HTTPBackendRef>,
    #[serde(default)]
    pub timeouts: Option<HTTPRouteTimeouts>,
    #[serde(default)]
    pub retry: Option<HTTPRouteRetry>,
    /// Accepted, not read; its contents are not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_persistence: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct HTTPRouteMatch {
    #[serde(default)]
    pub path: Option<HTTPPathMatch>,
    #[serde(default)]
    pub headers: Vec<HTTPValueMatch>,
    #[serde(default)]
    pub query_params: Vec<HTTPValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct HTTPPathMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<MatchType>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct HTTPValueMatch {
    #[serde(default, rename = "type")]
    pub kind: Option<MatchType>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MatchType {
    Exact,
    PathPrefix,
    RegularExpression,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct HTTPRouteFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HTTPHeaderFilter>,
    #[serde(default)]
    pub response_header_modifier: Option<HTTPHeaderFilter>,
    #[serde(default)]
    pub request_redirect: Option<HTTPRequestRedirect>,
    #[serde(default)]
    pub url_rewrite: Option<HTTPURLRewrite>,
    /// The filters below are accepted, not applied; their contents are not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_ref: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<serde_json::Value>,
    /// Experimental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_auth: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct HTTPRequestRedirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<HTTPPathModifier>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct HTTPURLRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<HTTPPathModifier>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct HTTPPathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HTTPHeaderFilter {
    #[serde(default)]
    pub set: Vec<HTTPHeader>,
    #[serde(default)]
    pub add: Vec<HTTPHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HTTPHeader {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct HTTPBackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
    /// Per-backend filters: accepted, not applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HTTPRouteFilter>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HTTPRouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default, rename = "backendRequest")]
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HTTPRouteRetry {
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub backoff: Option<String>,
}

#[cfg(test)]
mod tests {
    use crate::objects::{Object, ParseError, parse};

    fn parse_yaml(yaml: &str) -> Result<Object, ParseError> {
        parse(serde_saphyr::from_str(yaml).unwrap())
    }

    #[test]
    fn a_typo_in_a_backend_ref_is_an_error_naming_its_path() {
        let yaml = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews}]
  rules:
  - backendRefs:
    - name: reviews-v1
      port: 9080
      weigth: 80
";
        let error = parse_yaml(yaml).unwrap_err();
        let ParseError::Field { key, path, reason } = &error else {
            panic!("expected a field error, got {error}");
        };
        assert_eq!(key.to_string(), "HTTPRoute/bookinfo/reviews");
        assert_eq!(path, "spec.rules[0].backendRefs[0].weigth");
        assert!(reason.contains("unknown field `weigth`"), "{reason}");
    }

    #[test]
    fn typos_elsewhere_in_a_route_are_errors_too() {
        for (typo, path) in [
            ("spec: {rule: []}", "spec.rule"),
            ("spec: {rules: [{match: []}]}", "spec.rules[0].match"),
            (
                "spec: {rules: [{matches: [{path: {type: Exact, valeu: /}}]}]}",
                "spec.rules[0].matches[0].path.valeu",
            ),
            (
                "spec: {rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {sett: []}}]}]}",
                "spec.rules[0].filters[0].requestHeaderModifier.sett",
            ),
            (
                "spec: {rules: [{timeouts: {requets: 1s}}]}",
                "spec.rules[0].timeouts.requets",
            ),
            ("spec: {rules: [{retry: {attempt: 3}}]}", "spec.rules[0].retry.attempt"),
            ("spec: {parentRefs: [{nmae: x}]}", "spec.parentRefs[0].nmae"),
        ] {
            let yaml =
                format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\n{typo}\n");
            match parse_yaml(&yaml) {
                Err(ParseError::Field { path: found, .. }) => assert_eq!(found, path, "{typo}"),
                other => panic!("{typo}: expected an error at {path}, got {other:?}"),
            }
        }
    }

    /// Every field of Gateway API v1 HTTPRoute (standard channel, and the experimental ones),
    /// including those istiod-lite does not apply, is accepted.
    #[test]
    fn a_full_route_from_the_gateway_api_docs_parses() {
        let yaml = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: full
  namespace: default
spec:
  parentRefs:
  - group: gateway.networking.k8s.io
    kind: Gateway
    name: waypoint
    namespace: default
    sectionName: mesh
    port: 15008
  hostnames: [example.com, '*.example.org']
  rules:
  - name: canary
    matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{type: Exact, name: env, value: canary}]
      queryParams: [{type: RegularExpression, name: v, value: '[0-9]+'}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-a, value: a}]
        add: [{name: x-b, value: b}]
        remove: [x-c]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-d, value: d}]}
    - type: RequestMirror
      requestMirror:
        backendRef: {group: '', kind: Service, name: mirror, namespace: default, port: 8080}
        percent: 10
        fraction: {numerator: 1, denominator: 10}
    - type: URLRewrite
      urlRewrite:
        hostname: rewritten.example.com
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
    - type: CORS
      cors:
        allowOrigins: ['https://example.com']
        allowCredentials: true
        allowMethods: [GET]
        allowHeaders: [x-a]
        exposeHeaders: [x-b]
        maxAge: 60
    - type: ExtensionRef
      extensionRef: {group: example.net, kind: Filter, name: f}
    - type: ExternalAuth
      externalAuth:
        protocol: HTTP
        backendRef: {name: auth, port: 9000}
        http: {path: /check, allowedHeaders: [x-a], allowedResponseHeaders: [x-b]}
        forwardBody: {maxSize: 1024}
    backendRefs:
    - group: ''
      kind: Service
      name: reviews-v1
      namespace: default
      port: 9080
      weight: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {add: [{name: x-backend, value: v1}]}
    - {name: reviews-v2, port: 9080, weight: 20}
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {codes: [500, 503], attempts: 3, backoff: 100ms}
    sessionPersistence:
      sessionName: s
      absoluteTimeout: 1h
      idleTimeout: 10m
      type: Cookie
      cookieConfig: {lifetimeType: Permanent}
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        hostname: new.example.com
        path: {type: ReplaceFullPath, replaceFullPath: /new}
        port: 443
        statusCode: 301
status:
  parents: []
";
        let Object::HTTPRoute(route) = parse_yaml(yaml).unwrap() else {
            panic!("not a route");
        };
        let rule = &route.spec.rules[0];
        assert_eq!(rule.name.as_deref(), Some("canary"));
        assert_eq!(rule.filters.len(), 7);
        assert_eq!(rule.backend_refs[0].weight, Some(80));
        assert_eq!(rule.backend_refs[0].filters.len(), 1);
        assert_eq!(
            route.spec.rules[1].filters[0]
                .request_redirect
                .as_ref()
                .unwrap()
                .status_code,
            Some(301)
        );
    }
}
