//! The waypoint's data path, per CONNECT stream: the target (`:authority`, a service VIP:port
//! or a workload ip:port) names the destination; the first bytes say whether the stream carries
//! HTTP/1.1, HTTP/2 or something else. HTTP requests go through named phases — route (the
//! HTTPRoute of the destination service, else the service itself) → request filters → upstream
//! (a healthy endpoint, over HBONE with the waypoint's own identity, `:authority` = pod
//! ip:target port) → response filters → log and metrics. Other bytes are carried as TCP.

mod sniff;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::certificates::{CertificateManager, CertificateSource};
use mesh_core::hbone::{self, H2Stream, InboundRequest, Pool, PoolKey};
use mesh_core::identity::SpiffeId;
use mesh_core::proto::workload::{Service, Workload};
use mesh_core::state::{NetworkAddress, State, identity_of, service_key};
use tracing::{debug, info, warn};

use crate::authz::Policies;
use crate::metrics::{RequestLabels, RequestMetrics};
use crate::route;
use crate::route::config::Tables;
use sniff::{Protocol, Rewind, sniff};

type Body = BoxBody<Bytes, hyper::Error>;

fn text_body(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).map_err(|never| match never {}).boxed()
}

fn local_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(text_body(format!("{text}\n")));
    *response.status_mut() = status;
    response
}

/// What the waypoint knows and holds.
#[derive(Debug)]
pub struct Waypoint<S> {
    pub state: Arc<RwLock<State>>,
    pub certificates: Arc<CertificateManager<S>>,
    pub identity: SpiffeId,
    pub network: String,
    pub pool: Pool,
    pub metrics: RequestMetrics,
    /// Service key (`namespace/hostname`) → its HTTPRoutes.
    pub routes: Tables,
    /// L7 AuthorizationPolicies; those targeting this waypoint's Gateway or the destination
    /// service apply.
    pub policies: Policies,
    /// `Gateway/<namespace>/<name>`: this waypoint, as policies target it.
    pub gateway: String,
    upstreams: Arc<Upstreams>,
    next_endpoint: AtomicUsize,
}

/// What the access log says of a request beyond its connection.
struct Logged<'a> {
    method: &'a http::Method,
    path: &'a str,
    route: Option<&'a str>,
    /// `ok`, or why it was refused.
    result: &'a str,
}

/// Where a stream was addressed.
#[derive(Clone, Debug)]
struct Destination {
    target: SocketAddr,
    service: Option<Arc<Service>>,
    workload: Option<Arc<Workload>>,
}

/// Who sent it.
#[derive(Clone, Debug)]
struct Client {
    address: IpAddr,
    identity: SpiffeId,
    workload: Option<Arc<Workload>>,
}

/// Why a request found no upstream.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("no healthy endpoint for {0}")]
    NoEndpoint(String),
    #[error("every backend of the route has weight 0")]
    NoBackend,
    #[error("backend service {0} is unknown")]
    UnknownBackend(String),
    #[error("{0}")]
    Connect(String),
}

impl<S: CertificateSource> Waypoint<S> {
    pub fn new(
        state: Arc<RwLock<State>>,
        (routes, policies): (Tables, Policies),
        gateway: String,
        certificates: Arc<CertificateManager<S>>,
        identity: SpiffeId,
        network: &str,
        metrics: RequestMetrics,
    ) -> Self {
        Self {
            state,
            certificates,
            identity,
            network: network.to_owned(),
            pool: Pool::new(hbone::PoolConfig::default()),
            metrics,
            routes,
            policies,
            gateway,
            upstreams: Arc::default(),
            next_endpoint: AtomicUsize::new(0),
        }
    }

    fn at(&self, ip: IpAddr) -> NetworkAddress {
        NetworkAddress {
            network: self.network.clone(),
            ip,
        }
    }

    /// Handles one CONNECT stream.
    pub async fn handle(self: Arc<Self>, request: InboundRequest) {
        let target = request.authority;
        // ztunnel names the original client in `Forwarded: for=`; the peer is that client's ztunnel.
        let client_ip = forwarded_for(&request.headers).unwrap_or(request.peer_address.ip());
        let (destination, client_workload) = {
            let state = self.state.read().expect("not poisoned");
            let at = self.at(target.ip());
            let destination = Destination {
                target,
                service: state.service_by_vip(&at).cloned(),
                workload: state.workload_by_ip(&at).cloned(),
            };
            (destination, state.workload_by_ip(&self.at(client_ip)).cloned())
        };
        if destination.service.is_none() && destination.workload.is_none() {
            warn!(%target, source = %request.peer_identity, "waypoint target is neither a service nor a workload");
            return request.reject(StatusCode::BAD_REQUEST);
        }
        let client = Client {
            address: client_ip,
            identity: request.peer_identity.clone(),
            workload: client_workload,
        };
        let Ok(stream) = request.accept() else { return };
        let (protocol, stream) = match sniff(stream).await {
            Ok(sniffed) => sniffed,
            Err(error) => return debug!(%target, %error, "stream ended before its protocol was known"),
        };
        let io = TokioIo::new(stream);
        let waypoint = self.clone();
        let (destination_ref, client_ref) = (destination.clone(), client.clone());
        let service = hyper::service::service_fn(move |request| {
            let (waypoint, destination, client) = (waypoint.clone(), destination_ref.clone(), client_ref.clone());
            async move { Ok::<_, Infallible>(waypoint.serve_request(request, &destination, &client).await) }
        });
        let served = match protocol {
            Protocol::Http1 => hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
                .map_err(|e| e.to_string()),
            Protocol::Http2 => hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service)
                .await
                .map_err(|e| e.to_string()),
            Protocol::Opaque => self.carry_tcp(io.into_inner(), &destination, &client).await,
        };
        if let Err(error) = served {
            debug!(%target, %error, "stream ended with an error");
        }
    }

    /// One HTTP request through the phases.
    async fn serve_request(
        &self,
        request: Request<Incoming>,
        destination: &Destination,
        client: &Client,
    ) -> Response<Body> {
        let started = Instant::now();
        let (mut parts, body) = request.into_parts();
        let request_bytes = content_length(&parts.headers);
        let (method, path) = (parts.method.clone(), parts.uri.path().to_owned());

        // Authorization: the L7 policies on this waypoint or on the destination service.
        if let Err(denied) = self.authorize(&parts, destination, client) {
            let response = local_response(StatusCode::FORBIDDEN, "RBAC: access denied");
            let request = Logged {
                method: &method,
                path: &path,
                route: None,
                result: &denied,
            };
            self.finish(
                &request,
                destination,
                client,
                None,
                "-",
                started,
                request_bytes,
                &response,
            );
            return response;
        }

        // Route: the service's HTTPRoutes, if any; else the service (or workload) itself.
        let table = destination
            .service
            .as_ref()
            .and_then(|s| self.routes.read().expect("not poisoned").get(&service_key(s)).cloned());
        let selected = table.as_ref().and_then(|t| t.select(&parts));
        let route_name = selected
            .as_ref()
            .map(|s| format!("{}/{}", s.route.namespace, s.route.name));

        // Request filters (a redirect answers here).
        let mut local = None;
        if let Some(selected) = &selected
            && let Some(redirect) = route::filters::apply_request(&selected.rule.filters, &mut parts, selected.matched)
        {
            let (head, ()) = redirect.into_parts();
            local = Some(Response::from_parts(head, text_body("")));
        }

        // Upstream (with the rule's timeout and retries).
        let (mut response, upstream, flags) = match local {
            Some(response) => (response, None, "-"),
            None => {
                let rule = selected.as_ref().map(|s| s.rule);
                self.send_upstream(parts, body, rule, destination, client).await
            }
        };

        // Response filters.
        if let Some(selected) = &selected {
            let (mut head, body) = response.into_parts();
            route::filters::apply_response(&selected.rule.filters, &mut head);
            response = Response::from_parts(head, body);
        }

        // Log and metrics.
        let request = Logged {
            method: &method,
            path: &path,
            route: route_name.as_deref(),
            result: "ok",
        };
        self.finish(
            &request,
            destination,
            client,
            upstream.as_ref(),
            flags,
            started,
            request_bytes,
            &response,
        );
        response
    }

    /// The last phase: the request's metrics and its access-log line.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        request: &Logged<'_>,
        destination: &Destination,
        client: &Client,
        upstream: Option<&(Arc<Workload>, SocketAddr)>,
        flags: &'static str,
        started: Instant,
        request_bytes: u64,
        response: &Response<Body>,
    ) {
        let status = response.status();
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        let labels = self.labels(destination, client, upstream.map(|(w, _)| w.as_ref()), status, flags);
        self.metrics
            .record(&labels, duration_ms, request_bytes, content_length(response.headers()));
        info!(
            target: "access",
            protocol = "http",
            src.addr = %client.address,
            src.identity = %client.identity,
            dst.target = %destination.target,
            dst.service = destination.service.as_ref().map(|s| s.hostname.as_str()).unwrap_or("-"),
            upstream = upstream.map(|(_, a)| a.to_string()).as_deref().unwrap_or("-"),
            route = request.route.unwrap_or("-"),
            method = %request.method,
            path = request.path,
            status = status.as_u16(),
            duration_ms = format!("{duration_ms:.2}"),
            result = request.result,
            "request complete"
        );
    }

    fn authorize(&self, parts: &Parts, destination: &Destination, client: &Client) -> Result<(), String> {
        let host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.host())
            .unwrap_or_default();
        let request = crate::authz::Request {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            host,
            headers: &parts.headers,
            source: &client.identity,
            opaque: false,
        };
        self.check(destination, &request)
    }

    /// The L7 policies on this waypoint or on the destination service, applied to `request`.
    fn check(&self, destination: &Destination, request: &crate::authz::Request<'_>) -> Result<(), String> {
        let service = destination.service.as_deref();
        // A target is `Gateway/<ns>/<name>` (this waypoint) or `Service/<ns>/<name>`.
        let targets_service = |target: &str| {
            let named = target.strip_prefix("Service/").and_then(|t| t.split_once('/'));
            service.is_some_and(|s| named == Some((s.namespace.as_str(), s.name.as_str())))
        };
        let applies = |p: &&Arc<mesh_core::proto::waypoint::L7Policy>| {
            p.targets.iter().any(|t| *t == self.gateway || targets_service(t))
        };
        let policies = self.policies.read().expect("not poisoned");
        crate::authz::check(policies.iter().filter(applies).map(|p| p.as_ref()), request)
    }

    /// A healthy endpoint of the destination service, or the destination workload itself.
    fn pick_endpoint(&self, destination: &Destination) -> Result<(Arc<Workload>, SocketAddr), UpstreamError> {
        match (&destination.service, &destination.workload) {
            (Some(service), _) => {
                let state = self.state.read().expect("not poisoned");
                let endpoints = state.healthy_endpoints(service, destination.target.port());
                self.pick(&endpoints).ok_or_else(|| {
                    UpstreamError::NoEndpoint(format!("{}:{}", service.hostname, destination.target.port()))
                })
            }
            (None, Some(workload)) => Ok((workload.clone(), destination.target)),
            (None, None) => Err(UpstreamError::NoEndpoint(destination.target.to_string())),
        }
    }

    /// A healthy endpoint of the backend the rule picks.
    fn pick_backend(&self, rule: &route::Rule) -> Result<(Arc<Workload>, SocketAddr), UpstreamError> {
        let backend = rule.pick_backend().ok_or(UpstreamError::NoBackend)?;
        let state = self.state.read().expect("not poisoned");
        let service = state
            .service(&backend.service)
            .ok_or_else(|| UpstreamError::UnknownBackend(backend.service.clone()))?;
        let endpoints = state.healthy_endpoints(service, backend.port);
        self.pick(&endpoints)
            .ok_or_else(|| UpstreamError::NoEndpoint(format!("{}:{}", backend.service, backend.port)))
    }

    fn pick<T: Clone>(&self, candidates: &[T]) -> Option<T> {
        (!candidates.is_empty())
            .then(|| candidates[self.next_endpoint.fetch_add(1, Ordering::Relaxed) % candidates.len()].clone())
    }

    /// An HBONE stream to `workload` for `address`, with the waypoint's identity.
    async fn tunnel(
        &self,
        workload: &Workload,
        address: SocketAddr,
        client: &Client,
    ) -> Result<H2Stream, UpstreamError> {
        let connect = async {
            let certificate = self.certificates.get(&self.identity).await.map_err(|e| e.to_string())?;
            let key = PoolKey {
                source: self.identity.clone(),
                destination: identity_of(workload).map_err(|e| e.to_string())?,
                address: SocketAddr::new(address.ip(), hbone::PORT),
                source_address: None,
            };
            let mut headers = HeaderMap::new();
            if let Ok(forwarded) = HeaderValue::from_str(&format!("for={}", client.address)) {
                headers.insert("forwarded", forwarded);
            }
            self.pool
                .connect(&key, &certificate, address, headers)
                .await
                .map_err(|e| e.to_string())
        };
        Box::pin(connect).await.map_err(UpstreamError::Connect)
    }

    /// The upstream phase: an endpoint (the rule's backend, or the destination), the request
    /// sent, a response. With a retry policy the body is held so it can be sent again; the
    /// timeout covers every attempt. The response, the endpoint it came from, Envoy's flag.
    async fn send_upstream(
        &self,
        parts: Parts,
        body: Incoming,
        rule: Option<&route::Rule>,
        destination: &Destination,
        client: &Client,
    ) -> (Response<Body>, Option<(Arc<Workload>, SocketAddr)>, &'static str) {
        let attempts = async {
            let Some(retry) = rule.and_then(|r| r.retry.clone()) else {
                return self.attempt(parts, body, rule, destination, client).await;
            };
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    let text = format!("request body: {error}");
                    return (local_response(StatusCode::BAD_REQUEST, &text), None, "-");
                }
            };
            let mut tried = 0;
            loop {
                let outcome = self
                    .attempt(clone_parts(&parts), Full::new(body.clone()), rule, destination, client)
                    .await;
                if tried >= retry.attempts || !retry.codes.contains(&outcome.0.status().as_u16()) {
                    return outcome;
                }
                tried += 1;
                debug!(status = outcome.0.status().as_u16(), attempt = tried + 1, "retrying");
                tokio::time::sleep(retry.backoff).await;
            }
        };
        match rule.and_then(|r| r.timeout) {
            None => attempts.await,
            Some(limit) => tokio::time::timeout(limit, attempts).await.unwrap_or_else(|_| {
                (
                    local_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                    None,
                    "UT",
                )
            }),
        }
    }

    /// One attempt: pick an endpoint, send, answer 503 when that fails.
    async fn attempt<B>(
        &self,
        parts: Parts,
        body: B,
        rule: Option<&route::Rule>,
        destination: &Destination,
        client: &Client,
    ) -> (Response<Body>, Option<(Arc<Workload>, SocketAddr)>, &'static str)
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let endpoint = match rule {
            Some(rule) if !rule.backends.is_empty() => self.pick_backend(rule),
            _ => self.pick_endpoint(destination),
        };
        let (workload, address) = match endpoint {
            Ok(endpoint) => endpoint,
            Err(error) => {
                return (
                    local_response(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
                    None,
                    "UH",
                );
            }
        };
        match self.upstream(parts, body, &workload, address, client).await {
            Ok(response) => (response.map(|b| b.boxed()), Some((workload, address)), "-"),
            Err(error) => {
                warn!(upstream = %address, %error, "upstream failed");
                let text = format!("upstream connect error: {error}");
                (
                    local_response(StatusCode::SERVICE_UNAVAILABLE, &text),
                    Some((workload, address)),
                    "UF",
                )
            }
        }
    }

    /// Sends the request to `address` over HBONE as HTTP/1.1, on a kept-alive connection to that
    /// endpoint for this client when one is idle (a request that finds it dead goes on a new one).
    async fn upstream<B>(
        &self,
        mut parts: Parts,
        body: B,
        workload: &Workload,
        address: SocketAddr,
        client: &Client,
    ) -> Result<Response<Incoming>, UpstreamError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // HTTP/2 from the client becomes HTTP/1.1 to the app: the authority moves to `Host`.
        if parts.version != Version::HTTP_11 {
            if let Some(authority) = parts.uri.authority().cloned()
                && !parts.headers.contains_key(http::header::HOST)
                && let Ok(host) = HeaderValue::from_str(authority.as_str())
            {
                parts.headers.insert(http::header::HOST, host);
            }
            parts.version = Version::HTTP_11;
            if let Some(path) = parts.uri.path_and_query().cloned() {
                parts.uri = path.into();
            }
        }
        // Connections are kept per client too: the destination sees the client in `Forwarded`.
        let key = (address, client.address);
        let mut request = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
        if let Some(mut sender) = self.upstreams.take(key) {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.upstreams.keep(key, sender);
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    // Never sent: the idle connection had died. Use a new one.
                    Some(unsent) => request = unsent,
                    None => return Err(UpstreamError::Connect(error.into_error().to_string())),
                },
            }
        }
        let stream = self.tunnel(workload, address, client).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        self.upstreams.keep(key, sender);
        Ok(response)
    }

    /// Bytes that are not HTTP: carried as they are to an endpoint.
    async fn carry_tcp(
        &self,
        mut stream: Rewind<H2Stream>,
        destination: &Destination,
        client: &Client,
    ) -> Result<(), String> {
        let empty = HeaderMap::new();
        let request = crate::authz::Request {
            method: "",
            path: "",
            host: "",
            headers: &empty,
            source: &client.identity,
            opaque: true,
        };
        if let Err(denied) = self.check(destination, &request) {
            info!(target: "access", protocol = "tcp", src.identity = %client.identity, dst.target = %destination.target, result = denied.as_str(), "connection denied");
            stream.into_inner().reset();
            return Ok(());
        }
        let (workload, address) = self.pick_endpoint(destination).map_err(|e| e.to_string())?;
        let mut upstream = self
            .tunnel(&workload, address, client)
            .await
            .map_err(|e| e.to_string())?;
        tokio::io::copy_bidirectional(&mut stream, &mut upstream)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn labels(
        &self,
        destination: &Destination,
        client: &Client,
        upstream: Option<&Workload>,
        status: StatusCode,
        flags: &'static str,
    ) -> RequestLabels {
        let or_unknown = |value: Option<&str>| value.filter(|v| !v.is_empty()).unwrap_or("unknown").to_owned();
        let workload_name = |w: &Workload| {
            if w.workload_name.is_empty() {
                w.name.clone()
            } else {
                w.workload_name.clone()
            }
        };
        let service = destination.service.as_deref();
        RequestLabels {
            reporter: "waypoint",
            source_workload: or_unknown(client.workload.as_deref().map(workload_name).as_deref()),
            source_workload_namespace: or_unknown(Some(client.identity.namespace())),
            source_principal: client.identity.to_string(),
            destination_workload: or_unknown(upstream.map(workload_name).as_deref()),
            destination_workload_namespace: or_unknown(upstream.map(|w| w.namespace.as_str())),
            destination_principal: or_unknown(
                upstream
                    .and_then(|w| identity_of(w).ok())
                    .map(|i| i.to_string())
                    .as_deref(),
            ),
            destination_service: or_unknown(service.map(|s| s.hostname.as_str())),
            destination_service_name: or_unknown(service.map(|s| s.name.as_str())),
            destination_service_namespace: or_unknown(service.map(|s| s.namespace.as_str())),
            request_protocol: "http",
            response_code: status.as_u16(),
            response_flags: flags,
            connection_security_policy: "mutual_tls",
        }
    }
}

type UpstreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
type Sender = hyper::client::conn::http1::SendRequest<UpstreamBody>;

/// Idle HTTP/1.1 connections to endpoints, by (endpoint, client).
#[derive(Debug, Default)]
struct Upstreams {
    idle: std::sync::Mutex<HashMap<(SocketAddr, IpAddr), Vec<Sender>>>,
}

/// Idle connections kept per endpoint and client; more are closed.
const IDLE_PER_KEY: usize = 16;

impl Upstreams {
    fn take(&self, key: (SocketAddr, IpAddr)) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("not poisoned");
        let senders = idle.get_mut(&key)?;
        while let Some(sender) = senders.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        idle.remove(&key);
        None
    }

    /// Returns `sender` to the pool once its response has been read to the end.
    fn keep(self: &Arc<Self>, key: (SocketAddr, IpAddr), mut sender: Sender) {
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = pool.idle.lock().expect("not poisoned");
                let senders = idle.entry(key).or_default();
                if senders.len() < IDLE_PER_KEY {
                    senders.push(sender);
                }
            }
        });
    }
}

/// A request head again, for another attempt (extensions are not carried).
fn clone_parts(parts: &Parts) -> Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

/// The client from `Forwarded: for=<ip>`.
fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let value = headers.get("forwarded")?.to_str().ok()?;
    value
        .split([';', ','])
        .find_map(|part| part.trim().strip_prefix("for="))
        .map(|ip| ip.trim_matches('"').trim_start_matches('[').trim_end_matches(']'))
        .and_then(|ip| ip.parse().ok())
}

fn content_length(headers: &HeaderMap) -> u64 {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
