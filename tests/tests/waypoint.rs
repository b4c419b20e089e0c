//! The waypoint in the loop: namespace `demo` uses waypoint `waypoint`, so a client's requests to
//! the `server` service go client → ztunnel → HBONE → waypoint → HBONE (the waypoint's identity)
//! → ztunnel → app. The waypoint answers for HTTP, spreads requests over the endpoints and counts
//! them in `istio_requests_total`, enforces L7 AuthorizationPolicies attached to it, and applies
//! HTTPRoutes (weighted split, header match, retry, timeout); the servers' ztunnel sees the
//! waypoint's identity.

use std::net::SocketAddr;

use mesh_tests::http_app;
use mesh_tests::lab::{Lab, http_get, pod_yaml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BASE: u8 = 64;

fn manifests() -> String {
    let mut yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n".to_owned();
    yaml += &pod_yaml("client", "demo", "node-1", "127.64.1.1", "client");
    yaml += &pod_yaml("server-1", "demo", "node-2", "127.64.2.1", "server");
    yaml += &pod_yaml("server-2", "demo", "node-2", "127.64.2.2", "server");
    // The waypoint's own pod: not captured (Istio labels it so), reached over HBONE directly.
    yaml += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: waypoint-0, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}\nspec: {serviceAccountName: waypoint, nodeName: node-1, containers: [{name: proxy, image: waypoint}]}\nstatus: {podIP: 127.64.1.50, conditions: [{type: Ready, status: \"True\"}]}\n";
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: waypoint, namespace: demo}\nspec: {selector: {gateway.networking.k8s.io/gateway-name: waypoint}, clusterIP: 127.64.98.1, ports: [{name: mesh, port: 15008}]}\n";
    yaml += "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: demo}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n";
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: demo}\nspec: {selector: {app: server}, clusterIP: 127.64.99.1, ports: [{port: 80, targetPort: http}]}\n";
    yaml
}

/// One HTTP/1.1 request from the client pod (through its ztunnel); status, headers and body.
async fn request(lab: &Lab, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let service: SocketAddr = "127.64.99.1:80".parse()?;
    let mut stream = lab.connect(1, "127.64.1.1", service).await?;
    stream
        .write_all(format!("{method} {path} HTTP/1.1\r\nhost: server.demo\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response.get(9..12).unwrap_or("0").parse()?;
    Ok((status, response))
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_service_go_through_its_waypoint() {
    let mut lab = Lab::start(BASE, &manifests(), &["node-1", "node-2"]).await.unwrap();
    lab.start_waypoint(1, "demo", "waypoint", "127.64.1.50").await.unwrap();
    let _one = http_app("127.64.2.1:8080", "server-1").await;
    let _two = http_app("127.64.2.2:8080", "server-2").await;

    let mut served_by = Vec::new();
    for _ in 0..4 {
        let (status, response) = request(&lab, "GET", "/hello").await.unwrap();
        assert_eq!(status, 200, "{response}");
        served_by.push(body(&response).to_owned());
    }
    served_by.sort();
    assert_eq!(
        served_by,
        [
            "server-1 GET /hello",
            "server-1 GET /hello",
            "server-2 GET /hello",
            "server-2 GET /hello"
        ]
    );
    let (status, _) = request(&lab, "DELETE", "/status/503").await.unwrap();
    assert_eq!(status, 503, "the app's own status comes back");

    // HTTP/2 (prior knowledge) is detected too, and reaches the HTTP/1.1 app.
    let service: SocketAddr = "127.64.99.1:80".parse().unwrap();
    let stream = lab.connect(1, "127.64.1.1", service).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let h2_request = http::Request::get("http://server.demo/over-h2")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(h2_request).await.unwrap();
    assert_eq!(response.status(), 200);
    let h2_body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(h2_body.ends_with(b"GET /over-h2"), "{h2_body:?}");

    // The waypoint counted exactly what was sent, by response code, with Istio's labels.
    let (_, metrics) = http_get("127.64.1.50:15020".parse().unwrap(), "/metrics")
        .await
        .unwrap();
    let count = |code: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("reporter=\"waypoint\"")
                    && l.contains("source_workload=\"client\"")
                    && l.contains("destination_service=\"server.demo.svc.cluster.local\"")
                    && l.contains(&format!("response_code=\"{code}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!((count("200"), count("503")), (5, 1), "{metrics}");

    // An L7 policy on the waypoint: GET /allowed* only. DELETE / gets 403 from the waypoint.
    lab.write_config(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: get-allowed, namespace: demo}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  rules: [{to: [{operation: {methods: [GET], paths: [\"/allowed*\"]}}]}]\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, response) = request(&lab, "DELETE", "/").await.unwrap();
        if status == 403 {
            assert_eq!(body(&response).trim(), "RBAC: access denied");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the policy never took effect: {response}"
        );
    }
    let (status, response) = request(&lab, "GET", "/allowed/page").await.unwrap();
    assert_eq!(status, 200, "{response}");

    // The servers' ztunnel saw the waypoint's identity, not the client's.
    let (_, inbound) = http_get(format!("{}:15020", lab.node_host(2)).parse().unwrap(), "/metrics")
        .await
        .unwrap();
    assert!(
        inbound
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/waypoint\"")),
        "{inbound}"
    );
}

/// The demo of `manifests`, with the servers labelled v1 and v2, a Service per version, and an
/// HTTPRoute on `server`.
fn routed_manifests(base: u8) -> String {
    let mut yaml = manifests().replace("127.64.", &format!("127.{base}."));
    for (name, version) in [("server-1", "v1"), ("server-2", "v2")] {
        yaml = yaml.replace(
            &format!("{{name: {name}, namespace: demo, labels: {{app: server}}}}"),
            &format!("{{name: {name}, namespace: demo, labels: {{app: server, version: {version}}}}}"),
        );
        yaml += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: server-{version}, namespace: demo}}\nspec: {{selector: {{app: server, version: {version}}}, clusterIP: 127.{base}.97.{}, ports: [{{port: 8080, targetPort: http}}]}}\n",
            if version == "v1" { 1 } else { 2 }
        );
    }
    yaml += r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: server}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: server-v2, port: 8080}]
  - matches: [{path: {type: Exact, value: /flaky}}]
    backendRefs: [{name: server-v1, port: 8080}]
    retry: {attempts: 2, codes: [503], backoff: 10ms}
  - matches: [{path: {type: Exact, value: /slow}}]
    backendRefs: [{name: server-v1, port: 8080}]
    timeouts: {request: 200ms}
  - backendRefs: [{name: server-v1, port: 8080, weight: 90}, {name: server-v2, port: 8080, weight: 10}]
    filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-route, value: split}]}}]
"#;
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_splits_matches_retries_and_times_out_at_the_waypoint() {
    use http_body_util::BodyExt;
    let base = 65;
    let mut lab = Lab::start(base, &routed_manifests(base), &["node-1", "node-2"])
        .await
        .unwrap();
    lab.start_waypoint(1, "demo", "waypoint", &format!("127.{base}.1.50"))
        .await
        .unwrap();
    let _one = http_app(&format!("127.{base}.2.1:8080"), "server-1").await;
    let _two = http_app(&format!("127.{base}.2.2:8080"), "server-2").await;

    // One keep-alive HTTP/1.1 connection from the client pod to the service.
    let service: SocketAddr = format!("127.{base}.99.1:80").parse().unwrap();
    let stream = lab.connect(1, &format!("127.{base}.1.1"), service).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut send = async |path: &str, version: Option<&str>| -> (u16, http::HeaderMap, String) {
        let mut request = http::Request::get(path).header("host", "server.demo");
        if let Some(version) = version {
            request = request.header("x-version", version);
        }
        sender.ready().await.expect("the keep-alive connection is still open");
        let response = sender
            .send_request(request.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap())
            .await
            .unwrap();
        let (head, body) = response.into_parts();
        let body = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        (head.status.as_u16(), head.headers, body)
    };

    // The route may take a moment to reach the waypoint.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while send("/probe", None).await.1.get("x-route").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the HTTPRoute never reached the waypoint"
        );
    }

    // 90/10 over 1,000 requests.
    let mut v2 = 0;
    for _ in 0..1000 {
        let (status, headers, body) = send("/split", None).await;
        assert_eq!((status, headers["x-route"].to_str().unwrap()), (200, "split"), "{body}");
        v2 += usize::from(body.starts_with("server-2"));
    }
    assert!((50..=150).contains(&v2), "v2 got {v2} of 1000 (want 100 ± 50)");

    // A header match goes to v2 only.
    for _ in 0..5 {
        let (status, _, body) = send("/any", Some("v2")).await;
        assert_eq!((status, body.as_str()), (200, "server-2 GET /any"));
    }

    // The flaky backend fails every other request; the retry turns each 503 into a 200.
    for _ in 0..4 {
        let (status, _, body) = send("/flaky", None).await;
        assert_eq!((status, body.as_str()), (200, "server-1 GET /flaky"));
    }

    // The timeout fires before the slow backend answers.
    let started = std::time::Instant::now();
    let (status, _, body) = send("/slow", None).await;
    assert_eq!((status, body.trim()), (504, "upstream request timeout"));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "answered by the timeout, not the app"
    );
}

/// `istio_requests_total` at the waypoint on `ip`, summed over every label set.
async fn waypoint_requests(ip: &str) -> u64 {
    let (_, metrics) = http_get(format!("{ip}:15020").parse().unwrap(), "/metrics")
        .await
        .unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_lists_and_deletes_a_waypoint_and_traffic_follows() {
    use waypoint::cli::{Command, Store, Target, run};
    let base = 66;
    // The waypoint is deployed, but no Gateway declares it and no namespace uses it yet.
    let yaml = manifests()
        .replace("127.64.", &format!("127.{base}."))
        .replace(", istio.io/use-waypoint: waypoint", "");
    let yaml = yaml
        .split("---\n")
        .filter(|doc| !doc.contains("kind: Gateway"))
        .collect::<Vec<_>>()
        .join("---\n");
    let mut lab = Lab::start(base, &yaml, &["node-1", "node-2"]).await.unwrap();
    let waypoint_ip = format!("127.{base}.1.50");
    lab.start_waypoint(1, "demo", "waypoint", &waypoint_ip).await.unwrap();
    let _one = http_app(&format!("127.{base}.2.1:8080"), "server-1").await;
    let _two = http_app(&format!("127.{base}.2.2:8080"), "server-2").await;
    let get = async || {
        let service: SocketAddr = format!("127.{base}.99.1:80").parse().unwrap();
        let mut stream = lab.connect(1, &format!("127.{base}.1.1"), service).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: server.demo\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    };
    let target = || Target {
        namespace: "demo".into(),
        name: "waypoint".into(),
        store: Store::directory(&lab.dir.join("config")),
    };
    /// Sends requests until the waypoint's count moves (or not) as expected.
    async fn until(what: &str, through_waypoint: bool, ip: &str, get: &impl AsyncFn()) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let before = waypoint_requests(ip).await;
            get().await;
            if (waypoint_requests(ip).await > before) == through_waypoint {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: not within 10s");
        }
    }

    get().await;
    assert_eq!(
        waypoint_requests(&waypoint_ip).await,
        0,
        "no waypoint yet: traffic goes straight"
    );

    let applied = run(Command::Apply {
        target: target(),
        enroll_namespace: true,
    })
    .await
    .unwrap();
    assert!(applied.contains("waypoint demo/waypoint applied"), "{applied}");
    until("traffic through the new waypoint", true, &waypoint_ip, &get).await;
    let listed = run(Command::List {
        store: Store::directory(&lab.dir.join("config")),
    })
    .await
    .unwrap();
    assert_eq!(listed, "demo/waypoint  used by: demo\n");

    run(Command::Delete { target: target() }).await.unwrap();
    until("traffic straight again", false, &waypoint_ip, &get).await;
    assert_eq!(
        run(Command::List {
            store: Store::directory(&lab.dir.join("config"))
        })
        .await
        .unwrap(),
        "no waypoints\n"
    );
}
