//! One stream through HBONE over loopback (client pool → server → echo) against plain TCP to the
//! same echo, in the same run. Each side runs on one single-threaded runtime (one core each).
//!
//! Figures are the median of `--runs` (default 3) alternating runs.
//!
//! `cargo bench -p benches --bench hbone_throughput [-- --bytes N] [--runs N] [--max-frame-size N]
//! [--stream-window N] [--connection-window N]` (default 1 GiB each way, default HTTP/2 settings).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use benches::{Report, arg, mb_per_s, spawn_on_own_thread};
use mesh_core::hbone::{H2Settings, InboundRequest, Pool, PoolConfig, PoolKey, Server};
use mesh_core::identity::{Authority, SpiffeId, tls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const CHUNK: usize = 256 * 1024;

fn main() -> anyhow::Result<()> {
    let bytes: u64 = arg("--bytes").map(|b| b.parse()).transpose()?.unwrap_or(1 << 30);
    let runs: usize = arg("--runs").map(|b| b.parse()).transpose()?.unwrap_or(3).max(1);
    let mut settings = H2Settings::default();
    for (flag, field) in [
        ("--max-frame-size", &mut settings.max_frame_size),
        ("--stream-window", &mut settings.stream_window),
        ("--connection-window", &mut settings.connection_window),
    ] {
        if let Some(value) = arg(flag) {
            *field = value.parse()?;
        }
    }
    let mut report = Report::new("hbone_throughput");
    report
        .setup("bytes_each_way", bytes)
        .setup("streams", 1)
        .setup("runs", runs as u64)
        .setup("chunk_bytes", CHUNK as u64)
        .setup("h2_settings", format!("{settings:?}"))
        .setup("threads", "client 1, server 1 (current-thread runtimes)");
    report.print_setup();

    // Runs alternate so both see the same machine state; the median damps scheduler noise.
    let (mut plain, mut hbone) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        plain.push(mb_per_s(bytes, plain_tcp(bytes)?));
        hbone.push(mb_per_s(bytes, hbone_echo(bytes, settings)?));
        println!(
            "  run {run}: plain {:.0} MB/s, hbone {:.0} MB/s",
            plain[run - 1],
            hbone[run - 1]
        );
    }
    let (plain, hbone) = (median(plain), median(hbone));
    report
        .result("plain_tcp_mb_per_s_median", plain, "MB/s")
        .result("hbone_mb_per_s_median", hbone, "MB/s")
        .result("hbone_over_plain_ratio", hbone / plain, "x");
    report.write()?;
    Ok(())
}

/// Copies everything read back to the writer, then half-closes.
async fn echo(read: impl AsyncRead + Unpin, mut write: impl AsyncWrite + Unpin) {
    let mut read = BufReader::with_capacity(CHUNK, read);
    let _ = tokio::io::copy_buf(&mut read, &mut write).await;
    let _ = write.shutdown().await;
}

/// Sends `bytes` and reads the echo; returns the time until the last echoed byte arrived.
async fn drive(stream: impl AsyncRead + AsyncWrite, bytes: u64) -> anyhow::Result<Duration> {
    let (mut read, mut write) = tokio::io::split(stream);
    let started = Instant::now();
    let send = async {
        let chunk = vec![0x5a_u8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            write.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        write.shutdown().await
    };
    let receive = async {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = read.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(total);
            }
            total += n as u64;
        }
    };
    let (sent, received) = tokio::join!(send, receive);
    sent?;
    let received = received?;
    anyhow::ensure!(received == bytes, "echoed {received} of {bytes} bytes");
    Ok(started.elapsed())
}

fn plain_tcp(bytes: u64) -> anyhow::Result<Duration> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let _server = spawn_on_own_thread("plain-server", async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        let (stream, _) = listener.accept().await.expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let (read, write) = stream.into_split();
        echo(read, write).await;
    });
    spawn_on_own_thread("plain-client", async move {
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        drive(stream, bytes).await
    })
    .join()
    .expect("client thread")
}

fn hbone_echo(bytes: u64, settings: H2Settings) -> anyhow::Result<Duration> {
    let ca = Authority::self_signed("cluster.local")?;
    let (client_id, server_id) = (
        SpiffeId::new("cluster.local", "bench", "client")?,
        SpiffeId::new("cluster.local", "bench", "server")?,
    );
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let client_cert = ca.issue(&client_id, now - hour, now + hour)?;
    let server_config = Arc::new(tls::server_config(&ca.issue(&server_id, now - hour, now + hour)?)?);

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let (_signal, watch) = drain::channel();
    let _server = spawn_on_own_thread("hbone-server", async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        let handler = |request: InboundRequest| async move {
            if let Ok(stream) = request.accept() {
                let (read, write) = tokio::io::split(stream);
                echo(read, write).await;
            }
        };
        Server::new(server_config)
            .with_settings(settings)
            .serve(listener, handler, watch)
            .await;
    });
    spawn_on_own_thread("hbone-client", async move {
        let pool = Pool::new(PoolConfig {
            settings,
            ..PoolConfig::default()
        });
        let key = PoolKey {
            source: client_id,
            destination: server_id,
            address,
            source_address: None,
        };
        let target: SocketAddr = "10.0.0.1:8080".parse()?;
        let stream = pool.connect(&key, &client_cert, target, http::HeaderMap::new()).await?;
        drive(stream, bytes).await
    })
    .join()
    .expect("client thread")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
