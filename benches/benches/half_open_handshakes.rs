//! Half-open TLS connections against the HBONE server: `--connections` (default 5,000) TCP
//! connections from `--sources` addresses (default 20, so that the total bound is reached, not
//! only the per-source one) send the first bytes of a ClientHello and stall, held while a
//! legitimate peer from another address opens fresh HBONE connections. Reported: the server
//! process's RSS, how many of the peer's connections were served, and how long the server took to
//! close every half-open one. Two scenarios, each in a process of its own so that RSS figures do
//! not mix: the default bounds, and the handshake bounds lifted, to show what they save.
//!
//! `cargo bench --profile dev -p benches --bench half_open_handshakes [-- --connections N]
//! [--sources N] [--timeout-ms N] [--legit N]` (defaults 5,000, 20, 10,000 ms, 50; the timeout is
//! long enough for the unbounded run to hold every connection at once in a debug build).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use benches::{Report, arg};
use http::HeaderMap;
use mesh_core::hbone::{Admission, InboundRequest, Pool, PoolConfig, PoolKey, Server, ServerLimits};
use mesh_core::identity::{Authority, SpiffeId, tls};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOUR: Duration = Duration::from_secs(3600);
/// A TLS handshake record announcing 512 bytes, a ClientHello header, and a few of its bytes.
const PARTIAL_HELLO: [u8; 16] = [
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 1, 2, 3, 4, 5,
];

fn main() -> anyhow::Result<()> {
    let connections: usize = arg("--connections").map(|v| v.parse()).transpose()?.unwrap_or(5_000);
    let timeout_ms: u64 = arg("--timeout-ms").map(|v| v.parse()).transpose()?.unwrap_or(10_000);
    let sources: u8 = arg("--sources").map(|v| v.parse()).transpose()?.unwrap_or(20).max(1);
    let legit: usize = arg("--legit").map(|v| v.parse()).transpose()?.unwrap_or(50);
    if let Some(address) = arg("--attack") {
        return attack(
            address.parse()?,
            connections,
            sources,
            Duration::from_millis(timeout_ms),
        );
    }
    if let Some(scenario) = arg("--scenario") {
        let result = scenario_run(
            &scenario,
            connections,
            sources,
            Duration::from_millis(timeout_ms),
            legit,
        )?;
        println!("RESULT {result}");
        return Ok(());
    }
    let mut report = Report::new("half_open_handshakes");
    report
        .setup("half_open_connections", connections as u64)
        .setup("flood_source_addresses", u64::from(sources))
        .setup("handshake_timeout_ms", timeout_ms)
        .setup("legitimate_fresh_connections", legit as u64)
        .setup("bounded", format!("{:?}", bounded(Duration::from_millis(timeout_ms))))
        .setup("server_threads", 2)
        .setup(
            "flood",
            "a process of its own, from 127.0.1.x, 256 connects at a time; legitimate peer from 127.0.0.2",
        );
    report.print_setup();
    let mut figures = Vec::new();
    for scenario in ["bounded", "unbounded"] {
        let output = std::process::Command::new(std::env::current_exe()?)
            .args(["--scenario", scenario, "--connections", &connections.to_string()])
            .args(["--sources", &sources.to_string()])
            .args(["--timeout-ms", &timeout_ms.to_string(), "--legit", &legit.to_string()])
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).ok_or_else(|| {
            anyhow::anyhow!(
                "{scenario}: no result\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        let result: Value = serde_json::from_str(line)?;
        println!("  {scenario}: {result}");
        for (key, value) in result.as_object().into_iter().flatten() {
            if let Some(value) = value.as_f64() {
                let unit = if key.ends_with("_mib") {
                    "MiB"
                } else if key.ends_with("_ms") {
                    "ms"
                } else {
                    ""
                };
                report.result(&format!("{scenario}_{key}"), value, unit);
            }
        }
        figures.push(result);
    }
    let growth = |r: &Value| r["rss_growth_mib"].as_f64().unwrap_or(f64::NAN);
    report.result(
        "rss_growth_bounded_over_unbounded_ratio",
        growth(&figures[0]) / growth(&figures[1]),
        "x",
    );
    report.write()?;
    Ok(())
}

fn bounded(timeout: Duration) -> ServerLimits {
    ServerLimits {
        handshake_timeout: timeout,
        ..ServerLimits::default()
    }
}

/// VmRSS or VmHWM of this process, in MiB.
fn memory(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "bench", sa).unwrap()
}

fn scenario_run(
    scenario: &str,
    connections: usize,
    sources: u8,
    timeout: Duration,
    legit: usize,
) -> anyhow::Result<Value> {
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let limits = match scenario {
        "bounded" => bounded(timeout),
        _ => ServerLimits {
            max_connections: usize::MAX,
            max_pending_handshakes: usize::MAX,
            max_pending_handshakes_per_source: usize::MAX,
            ..bounded(timeout)
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ca = Authority::self_signed("cluster.local")?;
    let now = SystemTime::now();
    let server_cert = ca.issue(&id("server"), now - HOUR, now + HOUR)?;
    let client_cert = ca.issue(&id("client"), now - HOUR, now + HOUR)?;
    let admission = Arc::new(Admission::new(limits));
    let (address, _signal) = runtime.block_on(async {
        let listener = mesh_core::net::listen("127.0.0.1:0".parse()?)?;
        let address = listener.local_addr()?;
        let (signal, watch) = drain::channel();
        let handler = |request: InboundRequest| async move {
            let stream = request.accept().expect("accept");
            let (mut read, mut write) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        };
        let config = Arc::new(tls::server_config(&server_cert)?);
        tokio::spawn(
            Server::new(config)
                .with_admission(admission.clone())
                .serve(listener, handler, watch),
        );
        Ok::<_, anyhow::Error>((address, signal))
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let baseline = memory("VmRSS:");

    // The flood comes from a process of its own, so that its sockets cost this one nothing.
    let mut attacker = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--attack",
            &address.to_string(),
            "--connections",
            &connections.to_string(),
        ])
        .args(["--sources", &sources.to_string()])
        .args(["--timeout-ms", &timeout.as_millis().to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(attacker.stdout.take().expect("piped")));
    let opening: Value = serde_json::from_str(
        lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("the attacker said nothing"))??
            .trim_start_matches("OPENED "),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let held = memory("VmRSS:");
    let (in_progress, admitted) = (admission.handshakes_in_progress(), admission.connections());

    // Fresh connections (a new pool each) from another address, while the flood is held.
    let served = runtime.block_on(async {
        let mut served = 0;
        for _ in 0..legit {
            let pool = Pool::new(PoolConfig::default());
            let key = PoolKey {
                source: id("client"),
                destination: id("server"),
                address,
                source_address: Some("127.0.0.2".parse().expect("ip")),
            };
            let attempt = async {
                let mut stream = pool.connect(&key, &client_cert, address, HeaderMap::new()).await.ok()?;
                stream.write_all(b"ping").await.ok()?;
                stream.shutdown().await.ok()?;
                let mut echo = Vec::new();
                stream.read_to_end(&mut echo).await.ok()?;
                (echo == b"ping").then_some(())
            };
            if tokio::time::timeout(Duration::from_secs(5), attempt)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                served += 1;
            }
        }
        served
    });
    let closing: Value = serde_json::from_str(
        lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("the attacker did not report the closes"))??
            .trim_start_matches("CLOSED "),
    )?;
    attacker.wait()?;
    let peak = memory("VmHWM:");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)?;
    let mut result = json!({
        "baseline_rss_mib": baseline,
        "held_rss_mib": held,
        "peak_rss_mib": peak,
        "rss_growth_mib": held - baseline,
        "peak_growth_per_half_open_kib": (peak - baseline) * 1024.0 / connections as f64,
        "handshakes_in_progress": in_progress,
        "connections_admitted": admitted,
        "legitimate_served": served,
        "legitimate_total": legit,
    });
    for part in [opening, closing] {
        for (key, value) in part.as_object().into_iter().flatten() {
            result[key] = value.clone();
        }
    }
    Ok(result)
}

/// The flood: opens the connections (many at once), says so, then reports when each was closed.
fn attack(address: SocketAddr, connections: usize, sources: u8, timeout: Duration) -> anyhow::Result<()> {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let started = Instant::now();
        // Each connection is watched from the moment it is open: when the server closed it, after
        // how long (`None`: refused while connecting, or never closed).
        let connecting = Arc::new(tokio::sync::Semaphore::new(256));
        let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watched = tokio::task::JoinSet::new();
        for n in 0..connections {
            let source = std::net::IpAddr::from([127, 0, 1, 1 + (n % usize::from(sources)) as u8]);
            let (connecting, opened) = (connecting.clone(), opened_tx.clone());
            watched.spawn(async move {
                let permit = connecting.acquire_owned().await.expect("open");
                let connected = async {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind(SocketAddr::new(source, 0))?;
                    socket.connect(address).await
                };
                let connected = connected.await;
                let _ = opened.send(connected.is_ok());
                drop(permit);
                let mut stream = connected.ok()?;
                let at = Instant::now();
                let _ = stream.write_all(&PARTIAL_HELLO).await;
                let mut byte = [0u8; 1];
                let closed = tokio::time::timeout(timeout * 3, stream.read(&mut byte)).await;
                Some(closed.is_ok().then(|| at.elapsed()))
            });
        }
        drop(opened_tx);
        let mut opened = 0;
        for _ in 0..connections {
            opened += usize::from(opened_rx.recv().await.unwrap_or(false));
        }
        let opening_ms = started.elapsed().as_millis() as f64;
        println!("OPENED {}", json!({"opened": opened, "opening_ms": opening_ms}));
        let (mut at_once, mut at_timeout, mut never, mut slowest) = (0u64, 0u64, 0u64, Duration::ZERO);
        while let Some(next) = watched.join_next().await {
            match next.ok().flatten() {
                None => at_once += 1,
                Some(Some(after)) if after < timeout / 2 => at_once += 1,
                Some(Some(after)) => {
                    at_timeout += 1;
                    slowest = slowest.max(after);
                }
                Some(None) => never += 1,
            }
        }
        println!(
            "CLOSED {}",
            json!({"reset_at_once": at_once, "closed_at_timeout": at_timeout, "never_closed": never, "slowest_close_ms": slowest.as_millis() as f64})
        );
    });
    Ok(())
}
