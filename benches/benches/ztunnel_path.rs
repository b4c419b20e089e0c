//! The L4 data path through two ztunnels against direct TCP, in the same run:
//! client → (captured) ztunnel on node 1 → HBONE (mTLS, HTTP/2) → ztunnel on node 2 → server,
//! versus client → server. istiod-lite and both ztunnels run as processes of their own (this
//! binary re-run in a role), so their CPU time and memory are measured apart from the load.
//!
//! Everything happens in a network namespace this benchmark creates, with nftables rules that
//! capture the client's and server's traffic as the in-pod rules would. Needs root.
//!
//! Measured, each for direct and mesh: one-stream throughput (client → server), request/response
//! latency p50/p99 at a fixed rate (1 KiB and 64 B), new connections per second from one client
//! thread; for the mesh also each ztunnel's CPU-seconds per GB and its memory per idle proxied
//! connection (RSS growth over 10,000 open connections).
//!
//! `cargo bench -p benches --bench ztunnel_path [-- --bytes N --requests N --rate N --seconds N --connections N]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use benches::mesh::Mesh;
use benches::{Report, arg};
use mesh_lab::component::{self as process, Process};
use mesh_tests::lab::demo_manifests;
use mesh_tests::netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const BASE: u8 = 81;
/// Mesh: the client pod and a server pod of the demo, both captured.
const MESH_CLIENT: &str = "127.81.1.1";
const MESH_SERVER: &str = "127.81.2.1:8080";
/// Direct: addresses no rule touches.
const DIRECT_CLIENT: &str = "127.81.1.9";
const DIRECT_SERVER: &str = "127.81.2.9:8080";

/// Runs the server app (a process of its own, for file descriptors).
const SERVE_APP_FLAG: &str = "--serve-app";

/// What the server does with a connection, from its first byte.
const SINK: u8 = b's';
const ECHO: u8 = b'e';

fn parsed(name: &str, default: u64) -> anyhow::Result<u64> {
    Ok(arg(name).map(|v| v.parse()).transpose()?.unwrap_or(default))
}

fn main() -> anyhow::Result<()> {
    if let Some(result) = process::run_role_if_asked() {
        return result;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("ztunnel_path needs root: it creates a network namespace and nftables rules");
        return Ok(());
    }
    let bytes = parsed("--bytes", 2 << 30)?;
    let requests = parsed("--requests", 3000)?;
    let rate = parsed("--rate", 1000)?;
    let seconds = parsed("--seconds", 3)?;
    let connections = parsed("--connections", 10_000)?;

    // File descriptors for 10,000 connections at every hop (the server runs in a process of its
    // own for that); the children inherit the limit.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    if std::env::args().any(|a| a == SERVE_APP_FLAG) {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                tokio::join!(serve(MESH_SERVER), serve(DIRECT_SERVER));
                Ok(())
            });
    }
    // Before any thread exists, so every thread and child lives in the new namespace.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
    netns::run("ip", &["link", "set", "lo", "up"], None)?;

    let mut report = Report::new("ztunnel_path");
    report
        .setup("bytes_per_stream", bytes)
        .setup("latency_requests", requests)
        .setup("latency_rate_per_s", rate)
        .setup("connection_test_seconds", seconds)
        .setup("idle_connections", connections)
        .setup(
            "path",
            "client → ztunnel (15001, captured) → HBONE mTLS 1.3 → ztunnel (15008) → server; loopback in a private netns",
        )
        .setup("direct", "client → server over the same loopback");
    report.print_setup();

    let mesh = Mesh::start(BASE, &demo_manifests(BASE), &[MESH_CLIENT, "127.81.2.1", "127.81.2.2"])?;
    let _server = Process {
        child: std::process::Command::new(std::env::current_exe()?)
            .arg(SERVE_APP_FLAG)
            .spawn()?,
    };
    std::thread::sleep(Duration::from_millis(200));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        for (name, client, server) in [
            ("direct", DIRECT_CLIENT, DIRECT_SERVER),
            ("mesh", MESH_CLIENT, MESH_SERVER),
        ] {
            let server: SocketAddr = server.parse()?;
            let cpu_before = mesh.cpu_seconds()?;
            let elapsed = throughput(client, server, bytes).await?;
            let gbit = bytes as f64 * 8.0 / 1e9 / elapsed.as_secs_f64();
            report.result(&format!("{name}_throughput_gbit_s"), gbit, "Gbit/s");
            if name == "mesh" {
                let gigabytes = bytes as f64 / 1e9;
                let [one, two] = mesh.cpu_seconds()?;
                report
                    .result(
                        "ztunnel_client_side_cpu_s_per_gb",
                        (one - cpu_before[0]) / gigabytes,
                        "CPU-s/GB",
                    )
                    .result(
                        "ztunnel_server_side_cpu_s_per_gb",
                        (two - cpu_before[1]) / gigabytes,
                        "CPU-s/GB",
                    );
            }
            // 1 KiB at a fixed rate (every request finds an idle path), and 64 B back to back
            // (netperf TCP_RR style, the form of upstream's ping-pong figure).
            for (label, size, pace) in [("1024b_paced", 1024usize, rate), ("64b_back_to_back", 64, 0)] {
                let (p50, p99) = latency(client, server, size, requests, pace).await?;
                report
                    .result(&format!("{name}_{label}_latency_p50_us"), p50, "µs")
                    .result(&format!("{name}_{label}_latency_p99_us"), p99, "µs");
            }
            let per_second = connection_rate(client, server, Duration::from_secs(seconds)).await?;
            report.result(&format!("{name}_connections_per_s"), per_second, "conn/s");
        }
        let server: SocketAddr = MESH_SERVER.parse()?;
        // Let the connections of the rate test close everywhere before measuring memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = mesh.rss_kib()?;
        let held = open_idle(MESH_CLIENT, server, connections).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = mesh.rss_kib()?;
        let per_connection = |i: usize| (after[i] - before[i]) * 1024.0 / connections as f64;
        report
            .result("ztunnel_client_side_bytes_per_idle_connection", per_connection(0), "B")
            .result("ztunnel_server_side_bytes_per_idle_connection", per_connection(1), "B")
            .result("ztunnel_client_side_rss_mib_with_idle", after[0] / 1024.0, "MiB")
            .result("ztunnel_server_side_rss_mib_with_idle", after[1] / 1024.0, "MiB");
        drop(held);
        anyhow::Ok(())
    })?;
    report.write()?;
    Ok(())
}

/// The server: SINK reads to EOF and answers the byte count; ECHO echoes.
async fn serve(address: &str) {
    let listener = TcpListener::bind(address).await.expect("server address");
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let Ok(mode) = stream.read_u8().await else { return };
            if mode == SINK {
                let mut buffer = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                    total += n as u64;
                }
                let _ = stream.write_u64(total).await;
            } else {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            }
        });
    }
}

async fn connect(client: &str, server: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{client}:0").parse()?)?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends `bytes` one way and waits for the server's count: the time until every byte arrived.
async fn throughput(client: &str, server: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let mut stream = connect(client, server).await?;
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    stream.write_u8(SINK).await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    let received = stream.read_u64().await?;
    anyhow::ensure!(received == bytes, "server received {received} of {bytes} bytes");
    Ok(started.elapsed())
}

/// Request/response of `size` bytes on one connection, started at `rate` per second (a late
/// response delays the next start, so a slow path cannot hide its latency by batching), or back
/// to back when `rate` is 0.
async fn latency(
    client: &str,
    server: SocketAddr,
    size: usize,
    requests: u64,
    rate: u64,
) -> anyhow::Result<(f64, f64)> {
    let mut stream = connect(client, server).await?;
    stream.write_u8(ECHO).await?;
    let request = vec![0xa5u8; size];
    let mut response = vec![0u8; size];
    // Warm up the path (pool connection, certificates).
    for _ in 0..50 {
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
    }
    let mut interval = tokio::time::interval(Duration::from_secs(1) / rate.max(1) as u32);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples = Vec::with_capacity(requests as usize);
    for _ in 0..requests {
        if rate > 0 {
            interval.tick().await;
        }
        let started = Instant::now();
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.50), at(0.99)))
}

/// New connections per second from one client: connect, one byte there and back, close.
async fn connection_rate(client: &str, server: SocketAddr, duration: Duration) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < duration {
        let mut stream = connect(client, server).await?;
        stream.write_all(&[ECHO, 1]).await?;
        stream.read_u8().await?;
        count += 1;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Opens `count` connections through the path, each proven open by one echoed byte.
async fn open_idle(client: &str, server: SocketAddr, count: u64) -> anyhow::Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut stream = connect(client, server).await?;
        stream.write_all(&[ECHO, 1]).await?;
        stream.read_u8().await?;
        held.push(stream);
    }
    Ok(held)
}
