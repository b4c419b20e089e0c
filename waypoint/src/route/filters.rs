//! HTTPRoute filters: header changes on the request and on the response, redirects (answered by
//! the waypoint itself) and URL rewrites (applied before the request goes upstream).

use http::request::Parts;
use http::response::Parts as ResponseParts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Uri};

use super::{Match, PathMatch};

/// RequestHeaderModifier / ResponseHeaderModifier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// How a redirect or rewrite changes the path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the part the rule's prefix match matched.
    ReplacePrefixMatch(String),
}

/// RequestRedirect: the waypoint answers with a redirect instead of routing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301 or 302 (the default).
    pub status: StatusCode,
}

/// URLRewrite: changes host and path before the request goes upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
}

fn modify_path(path: &str, modifier: &PathModifier, matched: &PathMatch) -> String {
    match (modifier, matched) {
        (PathModifier::ReplaceFullPath(full), _) => full.clone(),
        (PathModifier::ReplacePrefixMatch(replacement), PathMatch::Prefix(prefix)) => {
            let rest = path.strip_prefix(prefix.trim_end_matches('/')).unwrap_or(path);
            let joined = format!("{}{rest}", replacement.trim_end_matches('/'));
            if joined.is_empty() { "/".to_owned() } else { joined }
        }
        // The API allows ReplacePrefixMatch only with a prefix match; anything else keeps the path.
        (PathModifier::ReplacePrefixMatch(_), _) => path.to_owned(),
    }
}

fn with_path(uri: &Uri, path: &str) -> Option<PathAndQuery> {
    let text = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    text.parse().ok()
}

/// Applies a rule's request-side filters in order. A redirect ends it: the response to send.
pub fn apply_request(filters: &[Filter], request: &mut Parts, matched: &Match) -> Option<Response<()>> {
    for filter in filters {
        match filter {
            Filter::RequestHeaders(modifier) => modifier.apply(&mut request.headers),
            Filter::ResponseHeaders(_) => {}
            Filter::Redirect(redirect) => return Some(redirect_response(redirect, request, matched)),
            Filter::Rewrite(rewrite) => {
                if let Some(host) = &rewrite.hostname
                    && let Ok(value) = HeaderValue::from_str(host)
                {
                    request.headers.insert(http::header::HOST, value);
                }
                if let Some(modifier) = &rewrite.path {
                    let path = modify_path(request.uri.path(), modifier, &matched.path);
                    let mut parts = request.uri.clone().into_parts();
                    parts.path_and_query = with_path(&request.uri, &path);
                    if let Ok(uri) = Uri::from_parts(parts) {
                        request.uri = uri;
                    }
                }
            }
        }
    }
    None
}

/// Applies a rule's response-side filters.
pub fn apply_response(filters: &[Filter], response: &mut ResponseParts) {
    for filter in filters {
        if let Filter::ResponseHeaders(modifier) = filter {
            modifier.apply(&mut response.headers);
        }
    }
}

fn redirect_response(redirect: &Redirect, request: &Parts, matched: &Match) -> Response<()> {
    let host_header = request.headers.get(http::header::HOST).and_then(|h| h.to_str().ok());
    let original_host = host_header
        .or_else(|| request.uri.host())
        .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host))
        .unwrap_or("localhost");
    let scheme = redirect.scheme.clone().unwrap_or_else(|| "http".into());
    let host = redirect.hostname.clone().unwrap_or_else(|| original_host.to_owned());
    let default_port = if scheme == "https" { 443 } else { 80 };
    let authority = match redirect.port {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host,
    };
    let path = redirect
        .path
        .as_ref()
        .map(|m| modify_path(request.uri.path(), m, &matched.path))
        .unwrap_or_else(|| request.uri.path().to_owned());
    let location = Uri::builder()
        .scheme(scheme.parse::<Scheme>().unwrap_or(Scheme::HTTP))
        .authority(
            authority
                .parse::<Authority>()
                .unwrap_or_else(|_| Authority::from_static("localhost")),
        )
        .path_and_query(with_path(&request.uri, &path).unwrap_or_else(|| PathAndQuery::from_static("/")))
        .build()
        .map(|uri| uri.to_string())
        .unwrap_or_default();
    Response::builder()
        .status(redirect.status)
        .header(http::header::LOCATION, location)
        .body(())
        .expect("status and header are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, host: &str) -> Parts {
        http::Request::builder()
            .uri(uri)
            .header("host", host)
            .header("x-drop", "1")
            .header("x-keep", "a")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn prefix(value: &str) -> Match {
        Match {
            path: PathMatch::Prefix(value.into()),
            ..Match::default()
        }
    }

    #[test]
    fn request_headers_are_set_added_and_removed() {
        let mut parts = request("/", "svc");
        let modifier = HeaderModifier {
            set: vec![(HeaderName::from_static("x-keep"), HeaderValue::from_static("b"))],
            add: vec![(HeaderName::from_static("x-new"), HeaderValue::from_static("1"))],
            remove: vec![HeaderName::from_static("x-drop")],
        };
        assert!(apply_request(&[Filter::RequestHeaders(modifier)], &mut parts, &prefix("/")).is_none());
        assert_eq!(parts.headers["x-keep"], "b");
        assert_eq!(parts.headers["x-new"], "1");
        assert!(!parts.headers.contains_key("x-drop"));
    }

    #[test]
    fn rewrites_replace_the_matched_prefix_or_the_whole_path_and_keep_the_query() {
        let mut parts = request("/api/v1/items?x=1", "svc");
        let rewrite = Rewrite {
            hostname: Some("backend.internal".into()),
            path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
        };
        apply_request(&[Filter::Rewrite(rewrite)], &mut parts, &prefix("/api/v1"));
        assert_eq!(parts.uri.to_string(), "/v2/items?x=1");
        assert_eq!(parts.headers["host"], "backend.internal");

        let mut parts = request("/api/v1", "svc");
        let to_root = Rewrite {
            hostname: None,
            path: Some(PathModifier::ReplacePrefixMatch("/".into())),
        };
        apply_request(&[Filter::Rewrite(to_root)], &mut parts, &prefix("/api/v1/"));
        assert_eq!(parts.uri.path(), "/");

        let mut parts = request("/old/page", "svc");
        let full = Rewrite {
            hostname: None,
            path: Some(PathModifier::ReplaceFullPath("/new".into())),
        };
        apply_request(&[Filter::Rewrite(full)], &mut parts, &prefix("/old"));
        assert_eq!(parts.uri.path(), "/new");
    }

    #[test]
    fn a_redirect_answers_with_the_new_location() {
        let mut parts = request("/docs/guide?lang=en", "site.demo:8080");
        let redirect = Redirect {
            scheme: Some("https".into()),
            hostname: None,
            path: Some(PathModifier::ReplacePrefixMatch("/manual".into())),
            port: Some(443),
            status: StatusCode::MOVED_PERMANENTLY,
        };
        let response = apply_request(&[Filter::Redirect(redirect)], &mut parts, &prefix("/docs")).unwrap();
        assert_eq!(response.status(), 301);
        assert_eq!(response.headers()["location"], "https://site.demo/manual/guide?lang=en");
    }

    #[test]
    fn response_headers_are_changed_on_the_way_back() {
        let (mut parts, ()) = Response::builder()
            .header("server", "app")
            .body(())
            .unwrap()
            .into_parts();
        let modifier = HeaderModifier {
            set: vec![(
                HeaderName::from_static("x-served-by"),
                HeaderValue::from_static("waypoint"),
            )],
            add: vec![],
            remove: vec![HeaderName::from_static("server")],
        };
        apply_response(&[Filter::ResponseHeaders(modifier)], &mut parts);
        assert_eq!(parts.headers["x-served-by"], "waypoint");
        assert!(!parts.headers.contains_key("server"));
    }
}
