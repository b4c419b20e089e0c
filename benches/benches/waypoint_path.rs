//! HTTP/1.1 through a waypoint against ztunnels only, in the same run:
//! client → ztunnel → HBONE → waypoint → HBONE → ztunnel → server (service `server`, bound to the
//! waypoint) versus client → ztunnel → HBONE → ztunnel → server (service `server-direct`, opted
//! out with `istio.io/use-waypoint: none`). 1 KiB POST bodies, 1 KiB responses. istiod-lite, the
//! ztunnels, the waypoint and the server are processes of their own, in a network namespace this
//! benchmark creates (needs root).
//!
//! A third path, client → server with no mesh at all, is the baseline.
//!
//! Measured for each path: requests/s at saturation (keep-alive connections sending back to
//! back), p50/p99 latency at a fixed rate; for the waypoint its CPU-seconds per 1,000 requests
//! and its RSS.
//!
//! `cargo bench -p benches --bench waypoint_path [-- --seconds N --connections N --requests N --rate N]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use benches::mesh::Mesh;
use benches::{Report, arg};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_lab::component::{self as process, Process};
use mesh_tests::lab::pod_yaml;
use mesh_tests::netns;
use tokio::net::TcpSocket;

const BASE: u8 = 82;
const CLIENT: &str = "127.82.1.1";
const SERVER: &str = "127.82.2.1";
const WAYPOINT: &str = "127.82.1.50";
const VIA_WAYPOINT: &str = "127.82.99.1:80";
const DIRECT: &str = "127.82.99.2:80";
/// Plain TCP to the app, from an address no rule captures: the baseline.
const UNCAPTURED_CLIENT: &str = "127.82.1.9";
const SERVER_APP: &str = "127.82.2.1:8080";
const BODY_BYTES: usize = 1024;

fn manifests() -> String {
    let mut yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}\n".to_owned();
    yaml += &pod_yaml("client", "demo", "node-1", CLIENT, "client");
    yaml += &pod_yaml("server-1", "demo", "node-2", SERVER, "server");
    yaml += &format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: waypoint-0, namespace: demo, labels: {{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}}}\nspec: {{serviceAccountName: waypoint, nodeName: node-1, containers: [{{name: proxy, image: waypoint}}]}}\nstatus: {{podIP: {WAYPOINT}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    );
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: waypoint, namespace: demo}\nspec: {selector: {gateway.networking.k8s.io/gateway-name: waypoint}, clusterIP: 127.82.98.1, ports: [{name: mesh, port: 15008}]}\n";
    yaml += "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: demo}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n";
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: demo}\nspec: {selector: {app: server}, clusterIP: 127.82.99.1, ports: [{port: 80, targetPort: http}]}\n";
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: server-direct, namespace: demo, labels: {istio.io/use-waypoint: none}}\nspec: {selector: {app: server}, clusterIP: 127.82.99.2, ports: [{port: 80, targetPort: http}]}\n";
    yaml
}

fn parsed(name: &str, default: u64) -> anyhow::Result<u64> {
    Ok(arg(name).map(|v| v.parse()).transpose()?.unwrap_or(default))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(client: &str, service: SocketAddr) -> anyhow::Result<Sender> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{client}:0").parse()?)?;
    let stream = socket.connect(service).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One 1 KiB POST answered with 1 KiB.
async fn request(sender: &mut Sender, body: &Bytes) -> anyhow::Result<()> {
    sender.ready().await?;
    let request = http::Request::post(format!("/bytes/{BODY_BYTES}"))
        .header("host", "server.demo")
        .body(Full::new(body.clone()))?;
    let response = sender.send_request(request).await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    let received = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(received.len() == BODY_BYTES, "{} bytes back", received.len());
    Ok(())
}

/// Requests/s with `connections` keep-alive connections sending back to back for `duration`.
async fn saturation(
    client: &'static str,
    service: SocketAddr,
    connections: u64,
    duration: Duration,
) -> anyhow::Result<(f64, u64)> {
    let body = Bytes::from(vec![b'r'; BODY_BYTES]);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..connections {
        let body = body.clone();
        workers.push(tokio::spawn(async move {
            let mut sender = connect(client, service).await?;
            let mut count = 0u64;
            while started.elapsed() < duration {
                request(&mut sender, &body).await?;
                count += 1;
            }
            anyhow::Ok(count)
        }));
    }
    let mut total = 0;
    for worker in workers {
        total += worker.await??;
    }
    Ok((total as f64 / started.elapsed().as_secs_f64(), total))
}

/// p50/p99 (µs) of requests started at `rate` per second on one connection.
async fn latency(client: &str, service: SocketAddr, requests: u64, rate: u64) -> anyhow::Result<(f64, f64)> {
    let body = Bytes::from(vec![b'r'; BODY_BYTES]);
    let mut sender = connect(client, service).await?;
    for _ in 0..50 {
        request(&mut sender, &body).await?;
    }
    let mut interval = tokio::time::interval(Duration::from_secs(1) / rate.max(1) as u32);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples = Vec::with_capacity(requests as usize);
    for _ in 0..requests {
        interval.tick().await;
        let started = Instant::now();
        request(&mut sender, &body).await?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.50), at(0.99)))
}

fn main() -> anyhow::Result<()> {
    if let Some(result) = process::run_role_if_asked() {
        return result;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("waypoint_path needs root: it creates a network namespace and nftables rules");
        return Ok(());
    }
    let seconds = parsed("--seconds", 5)?;
    let connections = parsed("--connections", 8)?;
    let requests = parsed("--requests", 2000)?;
    let rate = parsed("--rate", 500)?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
    netns::run("ip", &["link", "set", "lo", "up"], None)?;

    let mut report = Report::new("waypoint_path");
    report
        .setup("request", "HTTP/1.1 POST, 1 KiB body, 1 KiB response, keep-alive")
        .setup("saturation_connections", connections)
        .setup("saturation_seconds", seconds)
        .setup("latency_requests", requests)
        .setup("latency_rate_per_s", rate)
        .setup(
            "paths",
            "waypoint: client → ztunnel → HBONE → waypoint → HBONE → ztunnel → server; ztunnels: client → ztunnel → HBONE → ztunnel → server",
        );
    report.print_setup();

    let mut mesh = Mesh::start(BASE, &manifests(), &[CLIENT, SERVER])?;
    mesh.start_waypoint("demo", "waypoint", WAYPOINT)?;
    let _server = Process::spawn(
        "http",
        &[format!("--listen={SERVER}:8080"), "--name=server-1".into()],
        false,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let paths = [
            ("no_mesh", UNCAPTURED_CLIENT, SERVER_APP),
            ("ztunnels_only", CLIENT, DIRECT),
            ("through_waypoint", CLIENT, VIA_WAYPOINT),
        ];
        for (name, client, service) in paths {
            let service: SocketAddr = service.parse()?;
            let cpu_before = mesh.waypoints[0].cpu_seconds()?;
            let (per_second, total) = saturation(client, service, connections, Duration::from_secs(seconds)).await?;
            report.result(&format!("{name}_requests_per_s"), per_second, "req/s");
            if name == "through_waypoint" {
                let cpu = mesh.waypoints[0].cpu_seconds()? - cpu_before;
                report.result("waypoint_cpu_s_per_1000_requests", cpu / total as f64 * 1000.0, "CPU-s");
            }
            let (p50, p99) = latency(client, service, requests, rate).await?;
            report.result(&format!("{name}_latency_p50_us"), p50, "µs").result(
                &format!("{name}_latency_p99_us"),
                p99,
                "µs",
            );
        }
        report
            .result("waypoint_rss_mib", mesh.waypoints[0].rss_kib()? / 1024.0, "MiB")
            .result(
                "waypoint_peak_rss_mib",
                mesh.waypoints[0].peak_rss_kib()? / 1024.0,
                "MiB",
            );
        anyhow::Ok(())
    })?;
    report.write()?;
    Ok(())
}
