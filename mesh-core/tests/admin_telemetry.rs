//! The admin server (routes, metrics, readiness, drain) and the log formats.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::admin::{self, Readiness, Routes};
use mesh_core::telemetry::{LogArgs, LogFormat, subscriber};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[tokio::test]
async fn serves_metrics_readiness_and_custom_routes_until_drained() {
    let mut registry = Registry::default();
    let pushes = Counter::<u64>::default();
    registry.register("istio_test_pushes", "Pushes sent", pushes.clone());
    let readiness = Readiness::new();
    let xds = readiness.register("xds");
    let certificates = readiness.register("certificates");
    let routes = Routes::new()
        .metrics(Arc::new(registry))
        .readiness(readiness.clone())
        .route("/config_dump", |_| admin::text(http::StatusCode::OK, "{}".into()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (signal, watch) = drain::channel();
    let server = tokio::spawn(admin::serve(listener, routes, watch));

    pushes.inc_by(3);
    let (status, body) = get(address, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("istio_test_pushes_total 3"), "{body}");

    let (status, body) = get(address, "/healthz/ready").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: waiting for certificates, xds\n")
    );
    drop(xds);
    let (_, body) = get(address, "/healthz/ready").await;
    assert_eq!(body, "not ready: waiting for certificates\n");
    drop(certificates);
    assert_eq!(get(address, "/healthz/ready").await, (200, "ready\n".into()));

    assert_eq!(get(address, "/config_dump").await, (200, "{}".into()));
    let (status, body) = get(address, "/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains("/nope"));
    let (_, index) = get(address, "/").await;
    assert_eq!(index, "/config_dump\n/healthz/ready\n/metrics\n");

    tokio::time::timeout(Duration::from_secs(5), signal.drain())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(address).await.is_err(),
        "listener closed after drain"
    );
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture(format: LogFormat, level: &str, body: impl FnOnce(&mesh_core::telemetry::LogHandle)) -> String {
    let out = Capture::default();
    let writer = out.clone();
    let args = LogArgs {
        log_format: format,
        log_level: level.into(),
    };
    let (subscriber, handle) = subscriber(&args, move || writer.clone());
    tracing::subscriber::with_default(subscriber, || body(&handle));
    String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn json_logs_are_one_object_per_line() {
    let out = capture(LogFormat::Json, "info", |_| {
        tracing::info!(peer = "10.0.0.1:1234", bytes = 42u64, "connection closed");
        tracing::debug!("filtered out");
    });
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let event: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(event["message"], "connection closed");
    assert_eq!(event["peer"], "10.0.0.1:1234");
    assert_eq!(event["bytes"], 42);
    assert_eq!(event["level"], "INFO");
}

#[test]
fn log_level_changes_at_run_time() {
    let out = capture(LogFormat::Text, "info", |handle| {
        tracing::debug!("hidden");
        handle.set_filter("debug").unwrap();
        tracing::debug!("shown");
        assert_eq!(handle.filter(), "debug");
        let error = handle.set_filter("=[").unwrap_err();
        assert!(error.contains("invalid log filter"), "{error}");
    });
    assert!(!out.contains("hidden"), "{out}");
    assert!(out.contains("shown"), "{out}");
}

#[test]
fn log_format_parse_errors_list_the_choices() {
    assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
    assert_eq!(
        "xml".parse::<LogFormat>().unwrap_err(),
        "log format \"xml\" is not one of: text, json"
    );
}
