//! The HBONE server's bounds, each hit on purpose: a peer past its streams gets 429 and past its
//! connections GOAWAY ENHANCE_YOUR_CALM while another peer keeps being served; a header block past
//! 64 KiB is refused; connections past the total or the handshakes in progress are reset at once,
//! and half-open ones close when the handshake timeout ends. Every refusal is counted by bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode};
use mesh_core::hbone::{
    Admission, EVICTION_AGE, H2Stream, HboneError, InboundRequest, Limit, Pool, PoolConfig, PoolKey, Server,
    ServerLimits,
};
use mesh_core::identity::{Authority, SpiffeId, WorkloadCertificate, tls};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOUR: Duration = Duration::from_secs(3600);
const APP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3)), 8080);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "demo", sa).unwrap()
}

struct Mesh {
    ca: Authority,
    address: SocketAddr,
    admission: Arc<Admission>,
    _signal: drain::Signal,
}

impl Mesh {
    /// An echo server (each stream echoes until the client half-closes) within `limits`.
    async fn start(limits: ServerLimits) -> Self {
        let ca = Authority::self_signed("cluster.local").unwrap();
        let now = SystemTime::now();
        let server_cert = ca.issue(&id("server"), now - HOUR, now + HOUR).unwrap();
        let config = Arc::new(tls::server_config(&server_cert).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let admission = Arc::new(Admission::new(limits));
        let (signal, watch) = drain::channel();
        let handler = |request: InboundRequest| async move {
            let stream = request.accept().unwrap();
            let (mut read, mut write) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        };
        let server = Server::new(config).with_admission(admission.clone());
        tokio::spawn(server.serve(listener, handler, watch));
        Self {
            ca,
            address,
            admission,
            _signal: signal,
        }
    }

    /// A peer running as `sa`, whose pool puts `streams` streams on a connection.
    fn peer(&self, sa: &str, streams: usize) -> Peer {
        let now = SystemTime::now();
        Peer {
            pool: Pool::new(PoolConfig {
                max_streams_per_connection: streams,
                ..PoolConfig::default()
            }),
            certificate: self.ca.issue(&id(sa), now - HOUR, now + HOUR).unwrap(),
            key: PoolKey {
                source: id(sa),
                destination: id("server"),
                address: self.address,
                source_address: None,
            },
        }
    }
}

struct Peer {
    pool: Pool,
    certificate: WorkloadCertificate,
    key: PoolKey,
}

impl Peer {
    async fn open(&self, headers: HeaderMap) -> Result<H2Stream, HboneError> {
        self.pool.connect(&self.key, &self.certificate, APP, headers).await
    }

    /// One stream that carries a byte there and back.
    async fn round_trip(&self) -> Result<(), HboneError> {
        let mut stream = self.open(HeaderMap::new()).await?;
        stream.write_all(b"x").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut echo = Vec::new();
        stream.read_to_end(&mut echo).await.unwrap();
        assert_eq!(echo, b"x");
        Ok(())
    }
}

fn limits() -> ServerLimits {
    ServerLimits::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_past_its_streams_gets_429_while_another_peer_keeps_being_served() {
    let mesh = Mesh::start(ServerLimits {
        max_streams_per_peer: 20,
        ..limits()
    })
    .await;
    let (flooder, other) = (mesh.peer("flooder", 100), mesh.peer("other", 100));
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(flooder.open(HeaderMap::new()).await.unwrap());
    }
    let mut refused = 0;
    for _ in 0..10 {
        match flooder.open(HeaderMap::new()).await {
            Err(HboneError::Status { status, .. }) => {
                assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
                refused += 1;
            }
            other => panic!("expected 429, got {other:?}"),
        }
    }
    assert_eq!(refused, 10);
    // Meanwhile another identity is served, every time.
    for _ in 0..100 {
        other.round_trip().await.unwrap();
    }
    assert_eq!(mesh.admission.refusals(Limit::peer_streams), 10);
    // A stream that ends gives its place back.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    while flooder.round_trip().await.is_err() {
        assert!(Instant::now() < deadline, "the flooder's freed place never came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_past_its_connections_gets_goaway_while_another_peer_connects() {
    let mesh = Mesh::start(ServerLimits {
        max_connections_per_peer: 3,
        ..limits()
    })
    .await;
    // One stream per connection: every stream needs a connection of its own.
    let (flooder, other) = (mesh.peer("flooder", 1), mesh.peer("other", 1));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(flooder.open(HeaderMap::new()).await.unwrap());
    }
    match flooder.open(HeaderMap::new()).await {
        Err(HboneError::H2 { source, .. }) => {
            assert!(source.is_go_away(), "{source}");
            assert_eq!(source.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{source}");
        }
        other => panic!("expected GOAWAY ENHANCE_YOUR_CALM, got {other:?}"),
    }
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(other.open(HeaderMap::new()).await.unwrap());
    }
    assert_eq!(mesh.admission.refusals(Limit::peer_connections), 1);
    let mut registry = Registry::default();
    mesh.admission.register(&mut registry);
    let text = mesh_core::telemetry::encode_metrics(&registry);
    assert!(
        text.contains("hbone_server_limit_refusals_total{limit=\"peer_connections\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_past_64_kib_is_refused() {
    let mesh = Mesh::start(limits()).await;
    let peer = mesh.peer("client", 100);
    let header = |size: usize| {
        let mut headers = HeaderMap::new();
        headers.insert("x-padding", HeaderValue::from_str(&"a".repeat(size)).unwrap());
        headers
    };
    // Under the bound: served.
    drop(peer.open(header(32 * 1024)).await.unwrap());
    // Just over it: 431 for that stream.
    match peer.open(header(80 * 1024)).await {
        Err(HboneError::Status { status, .. }) => assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        other => panic!("expected 431, got {other:?}"),
    }
    // Far over it (1 MiB, 32 CONTINUATION frames): the connection is closed with GOAWAY
    // ENHANCE_YOUR_CALM before the block is buffered; the client, still writing it, may see the
    // close (a broken pipe or a reset) before it reads the GOAWAY.
    match peer.open(header(1024 * 1024)).await {
        Err(HboneError::H2 { source, .. }) if source.is_io() => {
            let kind = source.get_io().unwrap().kind();
            assert!(
                matches!(
                    kind,
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "{source}"
            );
        }
        Err(HboneError::H2 { source, .. }) => {
            assert!(source.is_go_away(), "{source}");
            assert_eq!(source.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{source}")
        }
        other => panic!("expected the connection closed, got {other:?}"),
    }
    // The peer's next connection is served.
    drop(peer.open(HeaderMap::new()).await.unwrap());
}

/// Reads until the server closes or resets the connection; which it was, and when.
async fn closed(mut stream: TcpStream) -> (std::io::Result<usize>, Instant) {
    let mut byte = [0u8; 1];
    let result = stream.read(&mut byte).await;
    (result, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_cap_are_reset_the_oldest_makes_room_and_all_close_within_the_timeout() {
    let timeout = Duration::from_secs(1);
    let mesh = Mesh::start(ServerLimits {
        max_pending_handshakes: 4,
        handshake_timeout: timeout,
        ..limits()
    })
    .await;
    let opened = Instant::now();
    let mut half_open = Vec::new();
    for _ in 0..4 {
        half_open.push(TcpStream::connect(mesh.address).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while mesh.admission.handshakes_in_progress() < 4 {
        assert!(Instant::now() < deadline, "the server never took the 4 handshakes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Past the cap, while the others are younger than the eviction age: reset at once.
    for _ in 0..3 {
        // The reset may even beat the connect's completion.
        let result = match TcpStream::connect(mesh.address).await {
            Ok(extra) => closed(extra).await.0,
            Err(error) => Err(error),
        };
        let error = result.expect_err("reset");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
        let elapsed = opened.elapsed();
        assert!(
            elapsed < EVICTION_AGE,
            "this machine was too slow to tell ({elapsed:?})"
        );
    }
    assert_eq!(mesh.admission.refusals(Limit::pending_handshakes), 3);
    // Once they had their time, a legitimate client takes the oldest one's place.
    tokio::time::sleep(EVICTION_AGE).await;
    mesh.peer("client", 100).round_trip().await.unwrap();
    let mut half_open = half_open.into_iter();
    let (result, at) = closed(half_open.next().unwrap()).await;
    assert_eq!(result.unwrap(), 0, "closed by the server");
    assert!(at - opened < timeout, "the oldest made room before its timeout");
    // The others are closed once the timeout ends, all of them.
    for stream in half_open {
        let (result, at) = closed(stream).await;
        assert_eq!(result.unwrap(), 0, "closed by the server");
        let after = at - opened;
        assert!(
            after >= timeout && after < timeout + Duration::from_millis(500),
            "closed after {after:?}"
        );
    }
    // Counted as the connection closes (the client may see the close first).
    let deadline = Instant::now() + Duration::from_secs(2);
    while mesh.admission.refusals(Limit::handshake_timeout) < 3 || mesh.admission.handshakes_in_progress() > 0 {
        assert!(Instant::now() < deadline, "3 timeouts counted, none left in progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(mesh.admission.refusals(Limit::handshake_timeout), 3);
    assert_eq!(
        mesh.admission.refusals(Limit::pending_handshakes),
        4,
        "3 refused, 1 made room"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flooding_address_cannot_take_every_handshake_place() {
    let mesh = Mesh::start(ServerLimits {
        max_pending_handshakes_per_source: 4,
        ..limits()
    })
    .await;
    let mut half_open = Vec::new();
    for _ in 0..4 {
        half_open.push(TcpStream::connect(mesh.address).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while mesh.admission.handshakes_in_progress() < 4 {
        assert!(Instant::now() < deadline, "the server never took the 4 handshakes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let result = match TcpStream::connect(mesh.address).await {
        Ok(extra) => closed(extra).await.0,
        Err(error) => Err(error),
    };
    assert_eq!(result.expect_err("reset").kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(mesh.admission.refusals(Limit::source_pending_handshakes), 1);
    // A peer from another address handshakes meanwhile.
    let mut peer = mesh.peer("client", 100);
    peer.key.source_address = Some("127.0.0.2".parse().unwrap());
    peer.round_trip().await.unwrap();
    assert_eq!(
        mesh.admission.handshakes_in_progress(),
        4,
        "the flood still waits for its timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_total_are_reset() {
    let mesh = Mesh::start(ServerLimits {
        max_connections: 2,
        ..limits()
    })
    .await;
    let (a, b) = (mesh.peer("a", 100), mesh.peer("b", 100));
    let _held = (
        a.open(HeaderMap::new()).await.unwrap(),
        b.open(HeaderMap::new()).await.unwrap(),
    );
    match mesh.peer("c", 100).open(HeaderMap::new()).await {
        Err(HboneError::Connect { source, .. } | HboneError::Handshake { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionReset, "{source}")
        }
        other => panic!("expected a reset handshake, got {other:?}"),
    }
    assert_eq!(mesh.admission.refusals(Limit::connections), 1);
    assert_eq!(mesh.admission.connections(), 2);
}
