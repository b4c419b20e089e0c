//! HTTPRoutes attached to Services (`parentRefs` of kind Service, as ambient waypoints use them),
//! for the waypoint: every reference resolved to a service key, durations to milliseconds,
//! regexes checked. What cannot be resolved is reported with the route and the field, and left
//! out; the rest of the route still applies.

use std::collections::BTreeSet;
use std::time::Duration;

use mesh_core::proto::waypoint::{
    Header, HeaderModifier, HttpBackend, HttpFilter, HttpMatch, HttpRetry, HttpRoute, HttpRouteRule, PathModifier,
    RequestRedirect, UrlRewrite, ValueMatch, http_filter, http_match, path_modifier, value_match,
};

use super::{Mesh, Report};
use crate::objects::gateway::{
    HTTPHeaderFilter, HTTPPathModifier, HTTPRoute, HTTPRouteFilter, HTTPRouteMatch, HTTPRouteRule, HTTPValueMatch,
    MatchType,
};
use crate::store::Objects;

/// Every HTTPRoute with at least one Service parent.
pub fn translate(objects: &Objects, mesh: &Mesh, reports: &mut Vec<Report>) -> Vec<HttpRoute> {
    let services: BTreeSet<(String, String)> = objects
        .services()
        .map(|s| {
            (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    objects
        .http_routes()
        .filter_map(|route| {
            Translator {
                mesh,
                services: &services,
                route,
                reports: &mut *reports,
            }
            .route()
        })
        .collect()
}

struct Translator<'a> {
    mesh: &'a Mesh,
    services: &'a BTreeSet<(String, String)>,
    route: &'a HTTPRoute,
    reports: &'a mut Vec<Report>,
}

fn is_service(group: Option<&str>, kind: Option<&str>, default_kind: &str) -> bool {
    matches!(group.unwrap_or(""), "" | "core") && kind.unwrap_or(default_kind) == "Service"
}

fn millis(text: &str) -> Result<u64, String> {
    humantime::parse_duration(text)
        .map(|d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .map_err(|e| format!("{text:?} is not a duration: {e}"))
}

impl Translator<'_> {
    fn namespace(&self) -> String {
        self.route.metadata.namespace.clone().unwrap_or_default()
    }

    fn report(&mut self, field: &str, message: impl std::fmt::Display) {
        self.reports.push(Report {
            object: format!(
                "HTTPRoute/{}/{}",
                self.namespace(),
                self.route.metadata.name.clone().unwrap_or_default()
            ),
            message: format!("{field}: {message}"),
        });
    }

    /// `namespace/hostname` of Service `name` in `namespace`.
    fn service_key(&self, namespace: &str, name: &str) -> String {
        format!("{namespace}/{name}.{namespace}.svc.{}", self.mesh.domain_suffix)
    }

    fn route(mut self) -> Option<HttpRoute> {
        let namespace = self.namespace();
        let mut parents = Vec::new();
        for (index, parent) in self.route.spec.parent_refs.iter().enumerate() {
            if !is_service(parent.group.as_deref(), parent.kind.as_deref(), "Gateway") {
                continue;
            }
            let parent_namespace = parent.namespace.clone().unwrap_or_else(|| namespace.clone());
            if self.services.contains(&(parent_namespace.clone(), parent.name.clone())) {
                parents.push(self.service_key(&parent_namespace, &parent.name));
            } else {
                let message = format!("Service {parent_namespace}/{} not found", parent.name);
                self.report(&format!("spec.parentRefs[{index}]"), message);
            }
        }
        if parents.is_empty() {
            return None;
        }
        let rules = self
            .route
            .spec
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| self.rule(index, rule))
            .collect();
        Some(HttpRoute {
            name: self.route.metadata.name.clone().unwrap_or_default(),
            namespace,
            created: self
                .route
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or_default(),
            parents,
            hostnames: self.route.spec.hostnames.clone(),
            rules,
        })
    }

    fn rule(&mut self, index: usize, rule: &HTTPRouteRule) -> HttpRouteRule {
        let at = format!("spec.rules[{index}]");
        let matches = rule
            .matches
            .iter()
            .enumerate()
            .filter_map(|(m, value)| self.match_(&format!("{at}.matches[{m}]"), value))
            .collect();
        let filters = rule
            .filters
            .iter()
            .enumerate()
            .filter_map(|(f, filter)| self.filter(&format!("{at}.filters[{f}]"), filter))
            .collect();
        let mut backends = Vec::new();
        for (b, backend) in rule.backend_refs.iter().enumerate() {
            let field = format!("{at}.backendRefs[{b}]");
            if !is_service(backend.group.as_deref(), backend.kind.as_deref(), "Service") {
                self.report(&field, "only Service backends are supported");
                continue;
            }
            let Some(port) = backend.port else {
                self.report(&field, "port is required for a Service backend");
                continue;
            };
            let backend_namespace = backend.namespace.clone().unwrap_or_else(|| self.namespace());
            if !self
                .services
                .contains(&(backend_namespace.clone(), backend.name.clone()))
            {
                self.report(
                    &field,
                    format!("Service {backend_namespace}/{} not found", backend.name),
                );
            }
            backends.push(HttpBackend {
                service: self.service_key(&backend_namespace, &backend.name),
                port: u32::from(port),
                weight: backend.weight.unwrap_or(1),
            });
        }
        let timeout_ms = match rule.timeouts.as_ref().and_then(|t| t.request.as_deref()) {
            Some(text) => millis(text).unwrap_or_else(|e| {
                self.report(&format!("{at}.timeouts.request"), e);
                0
            }),
            None => 0,
        };
        let retry = rule.retry.as_ref().map(|retry| HttpRetry {
            attempts: retry.attempts.unwrap_or(0),
            codes: retry.codes.iter().map(|c| u32::from(*c)).collect(),
            backoff_ms: match retry.backoff.as_deref() {
                Some(text) => millis(text).unwrap_or_else(|e| {
                    self.report(&format!("{at}.retry.backoff"), e);
                    0
                }),
                None => 0,
            },
        });
        HttpRouteRule {
            matches,
            filters,
            backends,
            timeout_ms,
            retry,
        }
    }

    fn regex(&mut self, field: &str, pattern: &str) -> bool {
        match regex::Regex::new(pattern) {
            Ok(_) => true,
            Err(error) => {
                self.report(field, format!("regex {pattern:?}: {error}"));
                false
            }
        }
    }

    fn value(&mut self, field: &str, value: &HTTPValueMatch) -> Option<ValueMatch> {
        let kind = match value.kind.unwrap_or(MatchType::Exact) {
            MatchType::RegularExpression => {
                if !self.regex(field, &value.value) {
                    return None;
                }
                value_match::Value::Regex(value.value.clone())
            }
            _ => value_match::Value::Exact(value.value.clone()),
        };
        Some(ValueMatch {
            name: value.name.clone(),
            value: Some(kind),
        })
    }

    /// A match that cannot be honoured (a bad regex) is dropped whole: matching more than the
    /// author wrote would be worse than matching nothing.
    fn match_(&mut self, field: &str, value: &HTTPRouteMatch) -> Option<HttpMatch> {
        let path = value.path.as_ref();
        let text = path.and_then(|p| p.value.clone()).unwrap_or_else(|| "/".into());
        let path = match path.and_then(|p| p.kind).unwrap_or(MatchType::PathPrefix) {
            MatchType::Exact => http_match::Path::Exact(text),
            MatchType::PathPrefix => http_match::Path::Prefix(text),
            MatchType::RegularExpression => {
                if !self.regex(&format!("{field}.path.value"), &text) {
                    return None;
                }
                http_match::Path::Regex(text)
            }
        };
        let mut headers = Vec::new();
        for (index, header) in value.headers.iter().enumerate() {
            headers.push(self.value(&format!("{field}.headers[{index}]"), header)?);
        }
        let mut query_params = Vec::new();
        for (index, query) in value.query_params.iter().enumerate() {
            query_params.push(self.value(&format!("{field}.queryParams[{index}]"), query)?);
        }
        Some(HttpMatch {
            path: Some(path),
            headers,
            query_params,
            method: value.method.clone().unwrap_or_default().to_uppercase(),
        })
    }

    fn filter(&mut self, field: &str, filter: &HTTPRouteFilter) -> Option<HttpFilter> {
        let headers = |h: &HTTPHeaderFilter| HeaderModifier {
            set: h
                .set
                .iter()
                .map(|x| Header {
                    name: x.name.clone(),
                    value: x.value.clone(),
                })
                .collect(),
            add: h
                .add
                .iter()
                .map(|x| Header {
                    name: x.name.clone(),
                    value: x.value.clone(),
                })
                .collect(),
            remove: h.remove.clone(),
        };
        let kind = match filter.kind.as_str() {
            "RequestHeaderModifier" => filter
                .request_header_modifier
                .as_ref()
                .map(|h| http_filter::Kind::RequestHeaderModifier(headers(h))),
            "ResponseHeaderModifier" => filter
                .response_header_modifier
                .as_ref()
                .map(|h| http_filter::Kind::ResponseHeaderModifier(headers(h))),
            "RequestRedirect" => filter.request_redirect.as_ref().map(|r| {
                http_filter::Kind::RequestRedirect(RequestRedirect {
                    scheme: r.scheme.clone().unwrap_or_default(),
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r
                        .path
                        .as_ref()
                        .and_then(|p| self.path_modifier(&format!("{field}.requestRedirect.path"), p)),
                    port: r.port.map(u32::from).unwrap_or(0),
                    status_code: r.status_code.map(u32::from).unwrap_or(302),
                })
            }),
            "URLRewrite" => filter.url_rewrite.as_ref().map(|r| {
                http_filter::Kind::UrlRewrite(UrlRewrite {
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r
                        .path
                        .as_ref()
                        .and_then(|p| self.path_modifier(&format!("{field}.urlRewrite.path"), p)),
                })
            }),
            other => {
                self.report(&format!("{field}.type"), format!("filter {other:?} is not supported"));
                return None;
            }
        };
        if kind.is_none() {
            self.report(field, format!("{} filter without its settings", filter.kind));
        }
        Some(HttpFilter { kind: Some(kind?) })
    }

    fn path_modifier(&mut self, field: &str, path: &HTTPPathModifier) -> Option<PathModifier> {
        let kind = match (path.kind.as_str(), &path.replace_full_path, &path.replace_prefix_match) {
            ("ReplaceFullPath", Some(full), _) => path_modifier::Kind::ReplaceFullPath(full.clone()),
            ("ReplacePrefixMatch", _, Some(prefix)) => path_modifier::Kind::ReplacePrefixMatch(prefix.clone()),
            (kind, _, _) => {
                self.report(field, format!("type {kind:?} without its value"));
                return None;
            }
        };
        Some(PathModifier { kind: Some(kind) })
    }
}
