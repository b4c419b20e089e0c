//! HTTPRoute as the waypoint applies it, following the Gateway API: of all rules attached to a
//! service, the most specific match wins (exact path, then the longest prefix, then a method,
//! then the most header matches, then the most query matches; then the oldest route, then
//! namespace/name, then rule order). The rule then picks a backend by weight and carries the
//! filters, timeout and retry policy the request gets. Pure: no I/O, so the semantics are tested
//! here and the proxy only asks.

pub mod config;
pub mod filters;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method};
use regex::Regex;

pub use filters::{Filter, HeaderModifier, PathModifier, Redirect, Rewrite};

/// How a request path is matched.
#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`.
    Prefix(String),
    /// Anchored at both ends.
    Regex(Regex),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => path == exact,
            Self::Prefix(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                prefix.is_empty()
                    || path
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Self::Regex(regex) => regex
                .find(path)
                .is_some_and(|m| m.start() == 0 && m.end() == path.len()),
        }
    }
}

/// How a header or query value is matched.
#[derive(Clone, Debug)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => value == exact,
            Self::Regex(regex) => regex
                .find(value)
                .is_some_and(|m| m.start() == 0 && m.end() == value.len()),
        }
    }
}

/// One `matches` entry of a rule: every condition it sets must hold.
#[derive(Clone, Debug)]
pub struct Match {
    pub path: PathMatch,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<Method>,
}

impl Default for Match {
    /// The Gateway API's default: path prefix `/`.
    fn default() -> Self {
        Self {
            path: PathMatch::Prefix("/".into()),
            headers: Vec::new(),
            query: Vec::new(),
            method: None,
        }
    }
}

impl Match {
    pub fn matches(&self, request: &Parts) -> bool {
        self.path.matches(request.uri.path())
            && self.method.as_ref().is_none_or(|m| *m == request.method)
            && self.headers.iter().all(|(name, value)| {
                request
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| value.matches(v))
            })
            && self.query.iter().all(|(name, value)| {
                query_pairs(request.uri.query().unwrap_or_default())
                    .find(|(key, _)| key == name)
                    .is_some_and(|(_, v)| value.matches(v))
            })
    }

    /// Orders matches from most to least specific (the Gateway API's precedence).
    fn precedence(
        &self,
    ) -> (
        u8,
        std::cmp::Reverse<usize>,
        bool,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
    ) {
        let (kind, length) = match &self.path {
            PathMatch::Exact(path) => (0, path.len()),
            PathMatch::Prefix(prefix) => (1, prefix.len()),
            PathMatch::Regex(_) => (2, 0),
        };
        (
            kind,
            std::cmp::Reverse(length),
            self.method.is_none(),
            std::cmp::Reverse(self.headers.len()),
            std::cmp::Reverse(self.query.len()),
        )
    }
}

/// `a=1&b=2` as pairs (first value wins when a key repeats; no percent-decoding of keys).
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// Where a rule may send a request: a service (`namespace/hostname`) port, with a weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub service: String,
    pub port: u16,
    pub weight: u32,
}

/// Retries of a rule: how many extra attempts, on which statuses, how long between them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

/// One rule of an HTTPRoute.
#[derive(Debug, Default)]
pub struct Rule {
    /// Empty means "every request" (path prefix `/`).
    pub matches: Vec<Match>,
    pub filters: Vec<Filter>,
    /// Empty means: the service the request was addressed to.
    pub backends: Vec<Backend>,
    pub timeout: Option<Duration>,
    pub retry: Option<Retry>,
    /// Requests routed by this rule so far: spreads them over the backends by weight.
    routed: AtomicU64,
}

impl Rule {
    pub fn new(matches: Vec<Match>, filters: Vec<Filter>, backends: Vec<Backend>) -> Self {
        Self {
            matches,
            filters,
            backends,
            ..Self::default()
        }
    }

    /// The next backend by weight: over any run of `sum(weights)` requests each backend gets
    /// exactly its weight. `None` when every weight is 0 (the request must fail, per the spec).
    pub fn pick_backend(&self) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        // Spread each backend's share over the cycle (stride by a number coprime with it), so
        // a 90/10 split does not send ten in a row to the small one.
        let slot = spread(self.routed.fetch_add(1, Ordering::Relaxed) % total, total);
        let mut passed = 0;
        self.backends.iter().find(|b| {
            passed += u64::from(b.weight);
            slot < passed
        })
    }
}

/// A permutation of `0..total` that interleaves consecutive indexes.
fn spread(index: u64, total: u64) -> u64 {
    let stride = (total / 2 + 1..=total)
        .chain(1..=total)
        .find(|s| gcd(*s, total) == 1)
        .unwrap_or(1);
    (index * stride) % total
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// An HTTPRoute attached to a service.
#[derive(Debug)]
pub struct Route {
    pub namespace: String,
    pub name: String,
    /// Seconds since the epoch; older routes win ties.
    pub created: i64,
    /// Empty means every host.
    pub hostnames: Vec<String>,
    pub rules: Vec<Rule>,
}

impl Route {
    fn serves_host(&self, host: Option<&str>) -> bool {
        let Some(host) = host else { return true };
        let host = host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        self.hostnames.is_empty()
            || self.hostnames.iter().any(|name| match name.strip_prefix("*.") {
                Some(suffix) => host
                    .strip_suffix(suffix)
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1),
                None => name == host,
            })
    }
}

/// What a request matched.
#[derive(Debug)]
pub struct Selected<'a> {
    pub route: &'a Route,
    pub rule: &'a Rule,
    pub matched: &'a Match,
}

/// The routes of one service, with their matches in precedence order.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// (route, rule, match) indexes, most specific first.
    order: Vec<(usize, usize, Option<usize>)>,
}

static MATCH_ALL: std::sync::LazyLock<Match> = std::sync::LazyLock::new(Match::default);

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        let mut order: Vec<(usize, usize, Option<usize>)> = Vec::new();
        for (r, route) in routes.iter().enumerate() {
            for (u, rule) in route.rules.iter().enumerate() {
                if rule.matches.is_empty() {
                    order.push((r, u, None));
                }
                order.extend((0..rule.matches.len()).map(|m| (r, u, Some(m))));
            }
        }
        let table = Self {
            routes,
            order: Vec::new(),
        };
        order.sort_by(|a, b| {
            let key = |(r, u, m): &(usize, usize, Option<usize>)| {
                let route = &table.routes[*r];
                (
                    table.matched(*r, *u, *m).precedence(),
                    route.created,
                    (route.namespace.clone(), route.name.clone()),
                    *u,
                    *m,
                )
            };
            key(a).cmp(&key(b))
        });
        Self { order, ..table }
    }

    fn matched(&self, route: usize, rule: usize, index: Option<usize>) -> &Match {
        index.map_or(&MATCH_ALL, |m| &self.routes[route].rules[rule].matches[m])
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The most specific rule matching `request`, if any.
    pub fn select(&self, request: &Parts) -> Option<Selected<'_>> {
        let host = request
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri.host());
        self.order.iter().find_map(|&(r, u, m)| {
            let route = &self.routes[r];
            let matched = self.matched(r, u, m);
            (route.serves_host(host) && matched.matches(request)).then_some(Selected {
                route,
                rule: &route.rules[u],
                matched,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn path(kind: &str, value: &str) -> Match {
        Match {
            path: match kind {
                "exact" => PathMatch::Exact(value.into()),
                "prefix" => PathMatch::Prefix(value.into()),
                _ => PathMatch::Regex(Regex::new(value).unwrap()),
            },
            ..Match::default()
        }
    }

    fn backend(service: &str, weight: u32) -> Backend {
        Backend {
            service: format!("demo/{service}.demo.svc.cluster.local"),
            port: 80,
            weight,
        }
    }

    fn route(name: &str, created: i64, rules: Vec<Rule>) -> Route {
        Route {
            namespace: "demo".into(),
            name: name.into(),
            created,
            hostnames: Vec::new(),
            rules,
        }
    }

    /// The backend service name the table picks for a request, or "-".
    fn routed(table: &RouteTable, request: &Parts) -> String {
        table
            .select(request)
            .and_then(|s| s.rule.pick_backend())
            .map(|b| b.service.split(['/', '.']).nth(1).unwrap_or_default().to_owned())
            .unwrap_or_else(|| "-".into())
    }

    #[test]
    fn prefixes_match_whole_path_elements() {
        let prefix = PathMatch::Prefix("/foo".into());
        for (path, expected) in [
            ("/foo", true),
            ("/foo/", true),
            ("/foo/bar", true),
            ("/foobar", false),
            ("/", false),
        ] {
            assert_eq!(prefix.matches(path), expected, "{path}");
        }
        assert!(
            PathMatch::Prefix("/foo/".into()).matches("/foo"),
            "a trailing slash is ignored"
        );
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
        let regex = PathMatch::Regex(Regex::new("/v[0-9]+/items").unwrap());
        assert!(
            regex.matches("/v2/items") && !regex.matches("/v2/items/1"),
            "regex is anchored"
        );
    }

    #[test]
    fn the_most_specific_match_wins_across_rules_and_routes() {
        let exact = Rule::new(vec![path("exact", "/api/login")], vec![], vec![backend("exact", 1)]);
        let long_prefix = Rule::new(vec![path("prefix", "/api/v2")], vec![], vec![backend("long", 1)]);
        let short_prefix = Rule::new(vec![path("prefix", "/api")], vec![], vec![backend("short", 1)]);
        let with_header = Rule::new(
            vec![Match {
                headers: vec![(HeaderName::from_static("x-version"), ValueMatch::Exact("v2".into()))],
                ..path("prefix", "/api")
            }],
            vec![],
            vec![backend("header", 1)],
        );
        let with_method = Rule::new(
            vec![Match {
                method: Some(Method::DELETE),
                ..path("prefix", "/api")
            }],
            vec![],
            vec![backend("method", 1)],
        );
        let catch_all = Rule::new(vec![], vec![], vec![backend("default", 1)]);
        let table = RouteTable::new(vec![
            route("b", 2, vec![catch_all, short_prefix]),
            route("a", 1, vec![with_header, long_prefix, exact, with_method]),
        ]);
        let cases = [
            (request("GET", "/api/login", &[]), "exact"),
            (request("GET", "/api/v2/items", &[("x-version", "v2")]), "long"),
            (request("DELETE", "/api/x", &[("x-version", "v2")]), "method"),
            (request("GET", "/api/x", &[("x-version", "v2")]), "header"),
            (request("GET", "/api/x", &[("x-version", "v1")]), "short"),
            (request("GET", "/other", &[]), "default"),
        ];
        for (request, expected) in cases {
            assert_eq!(routed(&table, &request), expected, "{} {}", request.method, request.uri);
        }
    }

    #[test]
    fn equal_matches_go_to_the_older_route_then_the_earlier_rule() {
        let table = RouteTable::new(vec![
            route(
                "newer",
                20,
                vec![Rule::new(vec![path("prefix", "/")], vec![], vec![backend("newer", 1)])],
            ),
            route(
                "older",
                10,
                vec![
                    Rule::new(vec![path("prefix", "/")], vec![], vec![backend("first", 1)]),
                    Rule::new(vec![path("prefix", "/")], vec![], vec![backend("second", 1)]),
                ],
            ),
        ]);
        assert_eq!(routed(&table, &request("GET", "/", &[])), "first");
    }

    #[test]
    fn query_and_header_values_match_exactly_or_by_anchored_regex() {
        let rule = Rule::new(
            vec![Match {
                query: vec![("tier".into(), ValueMatch::Regex(Regex::new("gold|silver").unwrap()))],
                headers: vec![(HeaderName::from_static("x-user"), ValueMatch::Exact("alice".into()))],
                ..Match::default()
            }],
            vec![],
            vec![backend("vip", 1)],
        );
        let table = RouteTable::new(vec![route("r", 0, vec![rule])]);
        assert_eq!(
            routed(&table, &request("GET", "/?a=1&tier=gold", &[("x-user", "alice")])),
            "vip"
        );
        assert_eq!(
            routed(&table, &request("GET", "/?tier=golden", &[("x-user", "alice")])),
            "-"
        );
        assert_eq!(
            routed(&table, &request("GET", "/?tier=gold", &[("x-user", "alicia")])),
            "-"
        );
        assert_eq!(routed(&table, &request("GET", "/?tier=gold", &[])), "-");
    }

    #[test]
    fn hostnames_limit_a_route_with_wildcards_for_one_label_or_more() {
        let mut scoped = route("r", 0, vec![Rule::new(vec![], vec![], vec![backend("scoped", 1)])]);
        scoped.hostnames = vec!["*.example.com".into(), "api.local".into()];
        let table = RouteTable::new(vec![scoped]);
        assert_eq!(
            routed(&table, &request("GET", "/", &[("host", "a.example.com")])),
            "scoped"
        );
        assert_eq!(
            routed(&table, &request("GET", "/", &[("host", "api.local:8080")])),
            "scoped"
        );
        assert_eq!(routed(&table, &request("GET", "/", &[("host", "example.com")])), "-");
        assert_eq!(routed(&table, &request("GET", "/", &[("host", "other.local")])), "-");
    }

    #[test]
    fn weights_split_exactly_and_interleave() {
        let rule = Rule::new(
            vec![],
            vec![],
            vec![backend("v1", 90), backend("v2", 10), backend("off", 0)],
        );
        let picks: Vec<String> = (0..1000)
            .map(|_| rule.pick_backend().unwrap().service.clone())
            .collect();
        let v2 = picks.iter().filter(|s| s.contains("/v2.")).count();
        assert_eq!((picks.len() - v2, v2), (900, 100));
        assert!(!picks.iter().any(|s| s.contains("/off.")), "weight 0 never picked");
        let longest_v2_run = picks
            .split(|s| !s.contains("/v2."))
            .map(<[String]>::len)
            .max()
            .unwrap_or(0);
        assert_eq!(longest_v2_run, 1, "the small share is spread, not sent in a burst");
        assert!(
            Rule::new(vec![], vec![], vec![backend("off", 0)])
                .pick_backend()
                .is_none()
        );
    }
}
