//! HBONE end to end over loopback: pooled streams carry data intact with half-close, a wrong
//! identity is refused, idle and broken connections leave the pool, a dead server is an error.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use mesh_core::hbone::{HboneError, InboundRequest, Pool, PoolConfig, PoolKey, Server};
use mesh_core::identity::{Authority, SpiffeId, WorkloadCertificate, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const HOUR: Duration = Duration::from_secs(3600);
const APP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3)), 8080);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "demo", sa).unwrap()
}

struct Mesh {
    client_cert: WorkloadCertificate,
    server_cert: WorkloadCertificate,
}

impl Mesh {
    fn new() -> Self {
        let ca = Authority::self_signed("cluster.local").unwrap();
        let now = SystemTime::now();
        Self {
            client_cert: ca.issue(&id("client"), now - HOUR, now + HOUR).unwrap(),
            server_cert: ca.issue(&id("server"), now - HOUR, now + HOUR).unwrap(),
        }
    }

    fn key(&self, address: SocketAddr, destination: &str) -> PoolKey {
        PoolKey {
            source: id("client"),
            destination: id(destination),
            address,
            source_address: None,
        }
    }
}

/// What the server saw: the peers of its connections and the requests' identities.
#[derive(Default)]
struct Seen {
    peers: HashSet<SocketAddr>,
    identities: Vec<SpiffeId>,
}

/// Starts an HBONE server whose handler echoes every accepted stream (or rejects `/reject`-style
/// authorities with 401). Dropping the returned handle's task kills the server and its connections.
async fn echo_server(mesh: &Mesh, listener: TcpListener) -> (JoinHandle<()>, Arc<Mutex<Seen>>, drain::Signal) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let config = Arc::new(tls::server_config(&mesh.server_cert).unwrap());
    let (signal, watch) = drain::channel();
    let recorder = seen.clone();
    let handler = move |request: InboundRequest| {
        let seen = recorder.clone();
        async move {
            {
                let mut seen = seen.lock().unwrap();
                seen.peers.insert(request.peer_address);
                seen.identities.push(request.peer_identity.clone());
            }
            if request.authority.port() == 401 {
                return request.reject(StatusCode::UNAUTHORIZED);
            }
            let stream = request.accept().unwrap();
            let (mut read, mut write) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        }
    };
    let task = tokio::spawn(Server::new(config).serve(listener, handler, watch));
    (task, seen, signal)
}

async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    (listener, address)
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed * 7) % 251) as u8).collect()
}

/// Sends `data`, half-closes, and reads the echo until the server's half-close.
async fn round_trip(stream: mesh_core::hbone::H2Stream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut read, mut write) = tokio::io::split(stream);
    let send = async {
        write.write_all(data).await?;
        write.shutdown().await
    };
    let mut received = Vec::with_capacity(data.len());
    let (sent, got) = tokio::join!(send, read.read_to_end(&mut received));
    sent?;
    got?;
    Ok(received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_share_one_connection_and_arrive_intact() {
    let mesh = Mesh::new();
    let (listener, address) = listener().await;
    let (_server, seen, _signal) = echo_server(&mesh, listener).await;
    let pool = Pool::new(PoolConfig::default());
    let key = mesh.key(address, "server");

    let mut streams = Vec::new();
    for i in 0..100 {
        let (pool, key, cert) = (pool.clone(), key.clone(), mesh.client_cert.clone());
        streams.push(tokio::spawn(async move {
            let stream = pool.connect(&key, &cert, APP, HeaderMap::new()).await.unwrap();
            let data = pattern(i, 1024 * 1024);
            let echoed = round_trip(stream, &data).await.unwrap();
            assert!(
                echoed == data,
                "stream {i}: {} bytes back, content differs",
                echoed.len()
            );
        }));
    }
    for stream in streams {
        stream.await.unwrap();
    }
    assert_eq!(pool.connection_count(), 1);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.peers.len(), 1, "all streams on one TCP connection");
    assert_eq!(seen.identities.len(), 100);
    assert!(seen.identities.iter().all(|i| i == &id("client")));
}

#[tokio::test]
async fn a_full_connection_makes_the_pool_open_another() {
    let mesh = Mesh::new();
    let (listener, address) = listener().await;
    let (_server, seen, _signal) = echo_server(&mesh, listener).await;
    let pool = Pool::new(PoolConfig {
        max_streams_per_connection: 2,
        ..PoolConfig::default()
    });
    let key = mesh.key(address, "server");
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            pool.connect(&key, &mesh.client_cert, APP, HeaderMap::new())
                .await
                .unwrap(),
        );
    }
    assert_eq!(pool.connection_count(), 2);
    // A finished stream frees its slot: the next one reuses a connection.
    drop(open.pop());
    drop(open.pop());
    let again = pool
        .connect(&key, &mesh.client_cert, APP, HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(round_trip(again, b"ping").await.unwrap(), b"ping");
    assert_eq!(pool.connection_count(), 2);
    assert_eq!(seen.lock().unwrap().peers.len(), 2);
}

#[tokio::test]
async fn wrong_destination_identity_names_both_identities() {
    let mesh = Mesh::new();
    let (listener, address) = listener().await;
    let (_server, seen, _signal) = echo_server(&mesh, listener).await;
    let pool = Pool::new(PoolConfig::default());
    let error = pool
        .connect(&mesh.key(address, "impostor"), &mesh.client_cert, APP, HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(error, HboneError::IdentityMismatch { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("spiffe://cluster.local/ns/demo/sa/server"),
        "{message}"
    );
    assert!(
        message.contains("spiffe://cluster.local/ns/demo/sa/impostor"),
        "{message}"
    );
    assert_eq!(pool.connection_count(), 0);
    assert!(seen.lock().unwrap().identities.is_empty());
}

#[tokio::test]
async fn handler_rejection_reaches_the_client_as_its_status() {
    let mesh = Mesh::new();
    let (listener, address) = listener().await;
    let (_server, _seen, _signal) = echo_server(&mesh, listener).await;
    let pool = Pool::new(PoolConfig::default());
    let denied: SocketAddr = "10.1.2.3:401".parse().unwrap();
    let error = pool
        .connect(
            &mesh.key(address, "server"),
            &mesh.client_cert,
            denied,
            HeaderMap::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            HboneError::Status {
                status: StatusCode::UNAUTHORIZED,
                ..
            }
        ),
        "{error:?}"
    );
    // The connection stays usable for the next stream.
    let stream = pool
        .connect(&mesh.key(address, "server"), &mesh.client_cert, APP, HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(round_trip(stream, b"still here").await.unwrap(), b"still here");
    assert_eq!(pool.connection_count(), 1);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_timeout() {
    let mesh = Mesh::new();
    let (listener, address) = listener().await;
    let (_server, seen, _signal) = echo_server(&mesh, listener).await;
    let idle_timeout = Duration::from_secs(30);
    let pool = Pool::new(PoolConfig {
        idle_timeout,
        ..PoolConfig::default()
    });
    let key = mesh.key(address, "server");
    let stream = pool
        .connect(&key, &mesh.client_cert, APP, HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(round_trip(stream, b"hello").await.unwrap(), b"hello");
    assert_eq!(pool.connection_count(), 1);

    // The connection is up; from here on only timers matter.
    tokio::time::pause();
    tokio::time::advance(idle_timeout - Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(pool.connection_count(), 1, "not idle long enough yet");
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(pool.connection_count(), 0, "idle connection evicted");
    tokio::time::resume();

    let stream = pool
        .connect(&key, &mesh.client_cert, APP, HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(round_trip(stream, b"again").await.unwrap(), b"again");
    assert_eq!(seen.lock().unwrap().peers.len(), 2, "a new connection was dialed");
}

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_server_dying_mid_stream_is_an_error_and_the_connection_is_never_reused() {
    let mesh = Mesh::new();
    let (listener, address) = listener().await;
    let (server, _seen, _signal) = echo_server(&mesh, listener).await;
    let pool = Pool::new(PoolConfig::default());
    let key = mesh.key(address, "server");
    let stream = pool
        .connect(&key, &mesh.client_cert, APP, HeaderMap::new())
        .await
        .unwrap();
    let (mut read, mut write) = tokio::io::split(stream);
    write.write_all(b"first").await.unwrap();
    let mut echoed = [0u8; 5];
    read.read_exact(&mut echoed).await.unwrap();

    server.abort();
    let _ = server.await;
    let mut rest = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut rest))
        .await
        .expect("the client must not hang when the server dies");
    assert!(
        outcome.is_err(),
        "a dead server is an error, not a clean EOF: {outcome:?}"
    );

    // The broken connection leaves the pool; a new server on the same address gets a new one.
    wait_until(|| pool.connection_count() == 0).await;
    let listener = TcpListener::bind(address).await.unwrap();
    let (_server, seen, _signal) = echo_server(&mesh, listener).await;
    let stream = pool
        .connect(&key, &mesh.client_cert, APP, HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(round_trip(stream, b"new").await.unwrap(), b"new");
    assert_eq!(seen.lock().unwrap().peers.len(), 1);
}

async fn wait_until(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "condition not met within 5s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn drain_lets_open_streams_finish_and_refuses_new_connections() {
    let mesh = Mesh::new();
    let (listener, address) = listener().await;
    let (server, _seen, signal) = echo_server(&mesh, listener).await;
    let pool = Pool::new(PoolConfig::default());
    let key = mesh.key(address, "server");
    let stream = pool
        .connect(&key, &mesh.client_cert, APP, HeaderMap::new())
        .await
        .unwrap();
    let (mut read, mut write) = tokio::io::split(stream);
    write.write_all(b"before").await.unwrap();

    let drained = tokio::spawn(signal.drain());
    settle().await;
    // The open stream still works until it ends.
    write.write_all(b" and during drain").await.unwrap();
    write.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    read.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"before and during drain");
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .expect("drain completes")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops")
        .unwrap();
    let error = Pool::new(PoolConfig::default())
        .connect(&key, &mesh.client_cert, APP, HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(error, HboneError::Connect { .. }), "{error:?}");
}

#[tokio::test]
async fn malformed_requests_get_400_without_reaching_the_handler() {
    let mesh = Mesh::new();
    let (listener, address) = listener().await;
    let (_server, seen, _signal) = echo_server(&mesh, listener).await;
    // A hand-made HTTP/2 client, to send what the pool never would.
    let config = Arc::new(tls::client_config(&mesh.client_cert, vec![id("server")]).unwrap());
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let requests = [
        http::Request::get("http://10.1.2.3:8080/").body(()).unwrap(),
        http::Request::builder()
            .method("CONNECT")
            .uri("example.com:80")
            .body(())
            .unwrap(),
    ];
    for request in requests {
        let description = format!("{} {}", request.method(), request.uri());
        let mut sender = sender.clone().ready().await.unwrap();
        let (response, _body) = sender.send_request(request, true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{description}");
    }
    assert!(seen.lock().unwrap().identities.is_empty(), "handler never saw them");
}
