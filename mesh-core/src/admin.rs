//! The small HTTP server behind every program's admin, metrics and readiness ports. Each port
//! gets its own [`Routes`]; handlers are synchronous snapshots (no request bodies).

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::telemetry::{METRICS_CONTENT_TYPE, encode_metrics};

type Handler = Arc<dyn Fn(&Parts) -> Response<String> + Send + Sync>;

/// Paths and their handlers for one port.
#[derive(Clone, Default)]
pub struct Routes {
    handlers: HashMap<String, Handler>,
}

impl fmt::Debug for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut paths: Vec<_> = self.handlers.keys().collect();
        paths.sort();
        f.debug_struct("Routes").field("paths", &paths).finish()
    }
}

impl Routes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `path` with `handler` (any method; the handler checks it if it cares).
    pub fn route(mut self, path: &str, handler: impl Fn(&Parts) -> Response<String> + Send + Sync + 'static) -> Self {
        self.handlers.insert(path.to_owned(), Arc::new(handler));
        self
    }

    /// `GET /metrics`: the registry in OpenMetrics text.
    pub fn metrics(self, registry: Arc<Registry>) -> Self {
        self.route("/metrics", move |_| {
            Response::builder()
                .header(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)
                .body(encode_metrics(&registry))
                .expect("valid response")
        })
    }

    /// `GET /healthz/ready`: 200 once every registered task is done, else 503 naming them.
    pub fn readiness(self, readiness: Readiness) -> Self {
        self.route("/healthz/ready", move |_| {
            let pending = readiness.pending();
            if pending.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: waiting for {}\n", pending.join(", ")),
                )
            }
        })
    }

    /// `/logging`: GET shows the log filter; POST `?level=<filter>` changes it.
    pub fn logging(self, handle: crate::telemetry::LogHandle) -> Self {
        self.route("/logging", move |parts| {
            let level = parts
                .uri
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
            match (&parts.method, level) {
                (&Method::POST, Some(level)) => match handle.set_filter(level) {
                    Ok(()) => text(StatusCode::OK, format!("log filter: {level}\n")),
                    Err(error) => text(StatusCode::BAD_REQUEST, format!("{error}\n")),
                },
                (&Method::POST, None) => text(StatusCode::BAD_REQUEST, "POST /logging?level=<filter>\n".into()),
                _ => text(StatusCode::OK, format!("log filter: {}\n", handle.filter())),
            }
        })
    }

    /// `POST /quitquitquit`: starts a graceful shutdown.
    pub fn quit(self, stopper: crate::lifecycle::Stopper) -> Self {
        self.route("/quitquitquit", move |parts| {
            if parts.method != Method::POST {
                return text(StatusCode::METHOD_NOT_ALLOWED, "POST to shut down\n".into());
            }
            stopper.stop("/quitquitquit");
            text(StatusCode::OK, "shutting down\n".into())
        })
    }

    fn respond(&self, parts: &Parts) -> Response<String> {
        match self.handlers.get(parts.uri.path()) {
            Some(handler) => handler(parts),
            None if parts.uri.path() == "/" && parts.method == Method::GET => {
                let mut paths: Vec<_> = self.handlers.keys().cloned().collect();
                paths.sort();
                text(StatusCode::OK, paths.join("\n") + "\n")
            }
            None => text(StatusCode::NOT_FOUND, format!("no handler for {}\n", parts.uri.path())),
        }
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<String> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body)
        .expect("valid response")
}

/// Serves `routes` on `listener` until `drain` fires.
pub async fn serve(listener: TcpListener, routes: Routes, drain: drain::Watch) {
    let routes = Arc::new(routes);
    let mut connections = JoinSet::new();
    let drained = drain.signaled();
    tokio::pin!(drained);
    loop {
        tokio::select! {
            _ = &mut drained => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "admin accept failed");
                        continue;
                    }
                };
                let routes = routes.clone();
                let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                    let (parts, _body) = request.into_parts();
                    let response = routes.respond(&parts).map(|body| Full::new(Bytes::from(body)));
                    async move { Ok::<_, Infallible>(response) }
                });
                connections.spawn(async move {
                    let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    if let Err(error) = connection.await {
                        debug!(%peer, %error, "admin connection failed");
                    }
                });
            }
        }
    }
}

/// Tasks that must finish before a program reports ready (e.g. "xds", "certificates").
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeSet<String>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a task; the program is not ready until the returned guard is dropped.
    #[must_use = "the task counts as done as soon as the guard is dropped"]
    pub fn register(&self, task: &str) -> ReadyGuard {
        self.pending.lock().expect("not poisoned").insert(task.to_owned());
        ReadyGuard {
            readiness: self.clone(),
            task: task.to_owned(),
        }
    }

    pub fn pending(&self) -> Vec<String> {
        self.pending.lock().expect("not poisoned").iter().cloned().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.pending.lock().expect("not poisoned").is_empty()
    }
}

/// Marks its task done when dropped.
#[derive(Debug)]
pub struct ReadyGuard {
    readiness: Readiness,
    task: String,
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        self.readiness.pending.lock().expect("not poisoned").remove(&self.task);
    }
}
