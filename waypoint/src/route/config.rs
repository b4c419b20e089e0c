//! HttpRoute resources from xDS into route tables: each resource is checked (a route the
//! waypoint cannot honour is NACKed with the reason, and its previous version keeps serving),
//! then every service's routes are rebuilt into one [`RouteTable`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use mesh_core::proto::waypoint::{self as proto, HttpRoute, http_filter, http_match, path_modifier, value_match};
use mesh_core::xds::{Rejection, Update};
use prost::Message;
use regex::Regex;

use super::filters::{Filter, HeaderModifier, PathModifier, Redirect, Rewrite};
use super::{Backend, Match, PathMatch, Retry, Route, RouteTable, Rule, ValueMatch};

/// Service key → its route table; what the proxy reads.
pub type Tables = Arc<RwLock<HashMap<String, Arc<RouteTable>>>>;

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| format!("header name {name:?} is invalid"))
}

fn header_value(value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value).map_err(|_| format!("header value {value:?} is invalid"))
}

fn regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("regex {pattern:?}: {e}"))
}

fn value_match(value: &proto::ValueMatch) -> Result<ValueMatch, String> {
    match &value.value {
        Some(value_match::Value::Exact(exact)) => Ok(ValueMatch::Exact(exact.clone())),
        Some(value_match::Value::Regex(pattern)) => Ok(ValueMatch::Regex(regex(pattern)?)),
        None => Err(format!("match on {:?} has no value", value.name)),
    }
}

fn path_modifier(path: Option<&proto::PathModifier>) -> Result<Option<PathModifier>, String> {
    Ok(match path.and_then(|p| p.kind.as_ref()) {
        Some(path_modifier::Kind::ReplaceFullPath(full)) => Some(PathModifier::ReplaceFullPath(full.clone())),
        Some(path_modifier::Kind::ReplacePrefixMatch(prefix)) => Some(PathModifier::ReplacePrefixMatch(prefix.clone())),
        None => None,
    })
}

fn headers(modifier: &proto::HeaderModifier) -> Result<HeaderModifier, String> {
    let pairs = |headers: &[proto::Header]| {
        headers
            .iter()
            .map(|h| Ok((header_name(&h.name)?, header_value(&h.value)?)))
            .collect::<Result<Vec<_>, String>>()
    };
    Ok(HeaderModifier {
        set: pairs(&modifier.set)?,
        add: pairs(&modifier.add)?,
        remove: modifier
            .remove
            .iter()
            .map(|n| header_name(n))
            .collect::<Result<_, _>>()?,
    })
}

fn filter(filter: &proto::HttpFilter) -> Result<Filter, String> {
    Ok(match filter.kind.as_ref().ok_or("filter without a kind")? {
        http_filter::Kind::RequestHeaderModifier(m) => Filter::RequestHeaders(headers(m)?),
        http_filter::Kind::ResponseHeaderModifier(m) => Filter::ResponseHeaders(headers(m)?),
        http_filter::Kind::RequestRedirect(r) => Filter::Redirect(Redirect {
            scheme: Some(r.scheme.clone()).filter(|s| !s.is_empty()),
            hostname: Some(r.hostname.clone()).filter(|h| !h.is_empty()),
            path: path_modifier(r.path.as_ref())?,
            port: u16::try_from(r.port).ok().filter(|p| *p != 0),
            status: u16::try_from(r.status_code)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .filter(|c| c.is_redirection())
                .ok_or_else(|| format!("redirect status {} is not a redirect", r.status_code))?,
        }),
        http_filter::Kind::UrlRewrite(r) => Filter::Rewrite(Rewrite {
            hostname: Some(r.hostname.clone()).filter(|h| !h.is_empty()),
            path: path_modifier(r.path.as_ref())?,
        }),
    })
}

fn matches(value: &proto::HttpMatch) -> Result<Match, String> {
    Ok(Match {
        path: match &value.path {
            Some(http_match::Path::Exact(exact)) => PathMatch::Exact(exact.clone()),
            Some(http_match::Path::Prefix(prefix)) => PathMatch::Prefix(prefix.clone()),
            Some(http_match::Path::Regex(pattern)) => PathMatch::Regex(regex(pattern)?),
            None => PathMatch::Prefix("/".into()),
        },
        headers: value
            .headers
            .iter()
            .map(|h| Ok((header_name(&h.name)?, value_match(h)?)))
            .collect::<Result<_, String>>()?,
        query: value
            .query_params
            .iter()
            .map(|q| Ok((q.name.clone(), value_match(q)?)))
            .collect::<Result<_, String>>()?,
        method: match value.method.as_str() {
            "" => None,
            method => Some(Method::from_bytes(method.as_bytes()).map_err(|_| format!("method {method:?} is invalid"))?),
        },
    })
}

/// Checks one resource and builds its route.
pub fn route(resource: &HttpRoute) -> Result<Route, String> {
    let rules = resource
        .rules
        .iter()
        .enumerate()
        .map(|(index, rule)| {
            let at = |e: String| format!("rules[{index}]: {e}");
            let mut built = Rule::new(
                rule.matches.iter().map(matches).collect::<Result<_, _>>().map_err(at)?,
                rule.filters.iter().map(filter).collect::<Result<_, _>>().map_err(at)?,
                rule.backends
                    .iter()
                    .map(|b| {
                        Ok(Backend {
                            service: b.service.clone(),
                            port: u16::try_from(b.port).map_err(|_| format!("backend port {} is invalid", b.port))?,
                            weight: b.weight,
                        })
                    })
                    .collect::<Result<_, String>>()
                    .map_err(at)?,
            );
            built.timeout = (rule.timeout_ms > 0).then(|| Duration::from_millis(rule.timeout_ms));
            built.retry = rule.retry.as_ref().filter(|r| r.attempts > 0).map(|r| Retry {
                attempts: r.attempts,
                codes: r.codes.iter().filter_map(|c| u16::try_from(*c).ok()).collect(),
                backoff: Duration::from_millis(r.backoff_ms),
            });
            Ok(built)
        })
        .collect::<Result<_, String>>()?;
    Ok(Route {
        namespace: resource.namespace.clone(),
        name: resource.name.clone(),
        created: resource.created,
        hostnames: resource.hostnames.clone(),
        rules,
    })
}

/// Keeps the accepted HttpRoute resources and the tables built from them.
#[derive(Debug, Default)]
pub struct RouteStore {
    resources: BTreeMap<String, HttpRoute>,
    pub tables: Tables,
}

impl RouteStore {
    pub fn new(tables: Tables) -> Self {
        Self {
            resources: BTreeMap::new(),
            tables,
        }
    }

    /// Applies an xDS response: removals, then updates (each checked), then rebuilds the tables.
    pub fn apply(&mut self, updates: Vec<Update>, removed: Vec<String>) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        for name in removed {
            self.resources.remove(&name);
        }
        for update in updates {
            let checked = HttpRoute::decode(&*update.resource.value)
                .map_err(|e| format!("not an HttpRoute: {e}"))
                .and_then(|resource| route(&resource).map(|_| resource));
            match checked {
                Ok(resource) => {
                    self.resources.insert(update.name, resource);
                }
                Err(reason) => rejected.push(Rejection {
                    name: update.name,
                    reason,
                }),
            }
        }
        let mut by_service: HashMap<String, Vec<Route>> = HashMap::new();
        for resource in self.resources.values() {
            for parent in &resource.parents {
                if let Ok(built) = route(resource) {
                    by_service.entry(parent.clone()).or_default().push(built);
                }
            }
        }
        let tables = by_service
            .into_iter()
            .map(|(service, routes)| (service, Arc::new(RouteTable::new(routes))))
            .collect();
        *self.tables.write().expect("not poisoned") = tables;
        rejected
    }
}
