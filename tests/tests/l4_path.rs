//! ztunnel's L4 path between two "nodes" on loopback addresses: outbound on node 1 carries a
//! client's connection over HBONE to inbound on node 2, which authorizes it and connects to the
//! app. Data intact both ways with half-close, service VIPs spread over endpoints, policies deny
//! with 401 before the app sees anything (DENY winning over ALLOW, open connections closed when
//! policy turns), waypoints get the original VIP, Istio metrics count it all, and the
//! per-connection futures stay small. Non-mesh destinations get plain TCP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use mesh_core::certificates::{CertificateError, CertificateManager, CertificateSource, Retry};
use mesh_core::hbone::{Pool, PoolConfig, Server};
use mesh_core::identity::{Authority, SpiffeId, WorkloadCertificate};
use mesh_core::proto::security::{Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match};
use mesh_core::proto::workload::{
    GatewayAddress, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload, WorkloadStatus, gateway_address,
};
use mesh_core::state::State;
use mesh_tests::greeting_echo_app;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use ztunnel::proxy::metrics::TcpMetrics;
use ztunnel::proxy::outbound::{Outbound, OutboundError, Route};
use ztunnel::proxy::{Context, inbound};

const SERVICE: &str = "demo/server.demo.svc.cluster.local";
// Measured in the test (debug) build: 640, 864 and 848 bytes.
const OUTBOUND_SETUP_LIMIT: usize = 768;
const INBOUND_SETUP_LIMIT: usize = 1024;
const COPYING_LIMIT: usize = 1024;

struct Direct(Arc<Authority>);

impl CertificateSource for Direct {
    async fn fetch(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, CertificateError> {
        let now = SystemTime::now();
        Ok(self
            .0
            .issue(identity, now - Duration::from_secs(60), now + Duration::from_secs(3600))
            .unwrap())
    }
}

fn ip(text: &str) -> Vec<u8> {
    text.parse::<std::net::Ipv4Addr>().unwrap().octets().to_vec()
}

fn workload(uid: &str, address: &str, node: &str, sa: &str, hbone: bool, service: bool) -> Workload {
    let services = if service {
        [(
            SERVICE.to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
            },
        )]
        .into()
    } else {
        Default::default()
    };
    Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "demo".into(),
        addresses: vec![ip(address)],
        node: node.into(),
        service_account: sa.into(),
        tunnel_protocol: if hbone {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        } as i32,
        status: WorkloadStatus::Healthy as i32,
        services,
        ..Default::default()
    }
}

struct Mesh {
    outbound: Outbound<Direct>,
    /// Node 2, where the servers are.
    inbound: Arc<Context<Direct>>,
    registry: Registry,
    authority: Arc<Authority>,
    state: Arc<RwLock<State>>,
    apps: Vec<Arc<AtomicUsize>>,
    _signals: Vec<drain::Signal>,
}

async fn mesh(base: u8) -> Mesh {
    let authority = Arc::new(Authority::self_signed("cluster.local").unwrap());
    let state = Arc::new(RwLock::new(State::default()));
    let addr = |host: u8, last: u8| format!("127.{base}.{host}.{last}");
    {
        let mut state = state.write().unwrap();
        state
            .insert_workload(workload("client", &addr(10, 1), "node-1", "client", true, false))
            .unwrap();
        state
            .insert_workload(workload("server-1", &addr(20, 1), "node-2", "server", true, true))
            .unwrap();
        state
            .insert_workload(workload("server-2", &addr(20, 2), "node-2", "server", true, true))
            .unwrap();
        state
            .insert_workload(workload("server-3", &addr(20, 3), "node-2", "server", true, true))
            .unwrap();
        state
            .insert_workload(workload("legacy", &addr(30, 1), "node-2", "legacy", false, false))
            .unwrap();
        state
            .insert_service(Service {
                name: "server".into(),
                namespace: "demo".into(),
                hostname: "server.demo.svc.cluster.local".into(),
                addresses: vec![NetworkAddress {
                    network: String::new(),
                    address: ip(&addr(99, 1)),
                }],
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .unwrap();
    }
    let mut registry = Registry::default();
    let mut context = |node: &str| {
        let mut context = Context::new(
            state.clone(),
            CertificateManager::new(Direct(authority.clone()), Retry::default()),
            node,
            "",
        );
        context.metrics =
            TcpMetrics::register(registry.sub_registry_with_label(("node".into(), node.to_owned().into())));
        Arc::new(context)
    };
    let (node1, node2) = (context("node-1"), context("node-2"));
    let mut signals = Vec::new();
    for host in [addr(20, 1), addr(20, 2), addr(20, 3)] {
        let listener = TcpListener::bind(format!("{host}:15008")).await.unwrap();
        let (signal, watch) = drain::channel();
        signals.push(signal);
        let context = node2.clone();
        let handler = move |request| inbound::handle_hbone(context.clone(), request);
        tokio::spawn(Server::new(inbound::WorkloadCertificates(node2.clone())).serve(listener, handler, watch));
    }
    let apps = vec![
        greeting_echo_app(&format!("{}:8080", addr(20, 1)), "one").await,
        greeting_echo_app(&format!("{}:8080", addr(20, 2)), "two").await,
        greeting_echo_app(&format!("{}:9000", addr(30, 1)), "legacy").await,
        greeting_echo_app(&format!("{}:8080", addr(20, 3)), "tri").await,
    ];
    Mesh {
        outbound: Outbound::new(node1, Pool::new(PoolConfig::default())),
        inbound: node2,
        registry,
        authority,
        state,
        apps,
        _signals: signals,
    }
}

/// Sends `data` from the client through outbound to `destination`; returns what came back.
async fn send(mesh: &Mesh, base: u8, destination: &str, data: &[u8]) -> Result<Vec<u8>, OutboundError> {
    let (mut client, proxied) = tokio::io::duplex(64 * 1024);
    let source: SocketAddr = format!("127.{base}.10.1:40000").parse().unwrap();
    let destination: SocketAddr = destination.parse().unwrap();
    let exchange = async {
        // A refused connection closes the pipe: the client's writes may then fail.
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut received = Vec::new();
        let _ = client.read_to_end(&mut received).await;
        received
    };
    let (carried, received) = tokio::join!(mesh.outbound.proxy(proxied, source, destination), exchange);
    carried.map(|_| received)
}

#[tokio::test]
async fn pod_to_pod_over_hbone_carries_data_both_ways_with_half_close() {
    let mesh = mesh(41).await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let received = send(&mesh, 41, "127.41.20.1:8080", &data).await.unwrap();
    assert_eq!(&received[..3], b"one");
    assert!(received[3..] == data[..], "echo intact");
}

#[tokio::test]
async fn service_vip_spreads_over_three_endpoints() {
    let mesh = mesh(42).await;
    let mut seen = Vec::new();
    for _ in 0..9 {
        let received = send(&mesh, 42, "127.42.99.1:80", b"hi").await.unwrap();
        seen.push(String::from_utf8_lossy(&received[..3]).into_owned());
    }
    for greeting in ["one", "two", "tri"] {
        assert_eq!(seen.iter().filter(|s| *s == greeting).count(), 3, "{seen:?}");
    }
}

#[tokio::test]
async fn an_allow_policy_for_someone_else_denies_with_401_before_the_app() {
    let mesh = mesh(43).await;
    let only_admin = Authorization {
        name: "admin-only".into(),
        namespace: "demo".into(),
        scope: Scope::Namespace as i32,
        action: Action::Allow as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![StringMatch {
                        match_type: Some(string_match::MatchType::Exact("cluster.local/ns/demo/sa/admin".into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
    };
    mesh.state.write().unwrap().insert_policy(only_admin);
    let error = send(&mesh, 43, "127.43.20.1:8080", b"hi").await.unwrap_err();
    assert!(error.to_string().contains("401"), "{error}");
    assert_eq!(
        mesh.apps[0].load(Ordering::SeqCst),
        0,
        "the app never saw the denied client"
    );
}

#[tokio::test]
async fn non_mesh_destinations_get_plain_tcp_and_missing_endpoints_are_refused() {
    let mesh = mesh(44).await;
    let received = send(&mesh, 44, "127.44.30.1:9000", b"plain").await.unwrap();
    assert_eq!(received, b"legacyplain");
    for uid in ["server-1", "server-2", "server-3"] {
        mesh.state.write().unwrap().remove_address(uid);
    }
    let error = send(&mesh, 44, "127.44.99.1:80", b"hi").await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "no healthy endpoint for service server.demo.svc.cluster.local:80"
    );
}

fn policy(name: &str, action: Action, principal: &str) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: "demo".into(),
        scope: Scope::Namespace as i32,
        action: action as i32,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![StringMatch {
                        match_type: Some(string_match::MatchType::Exact(principal.into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
    }
}

#[tokio::test]
async fn deny_wins_over_allow_for_the_same_principal() {
    let mesh = mesh(45).await;
    let client = "cluster.local/ns/demo/sa/client";
    mesh.state
        .write()
        .unwrap()
        .insert_policy(policy("allow-client", Action::Allow, client));
    assert_eq!(
        send(&mesh, 45, "127.45.20.1:8080", b"hi").await.unwrap(),
        b"onehi",
        "ALLOW alone admits"
    );
    mesh.state
        .write()
        .unwrap()
        .insert_policy(policy("deny-client", Action::Deny, client));
    let error = send(&mesh, 45, "127.45.20.1:8080", b"hi").await.unwrap_err();
    assert!(error.to_string().contains("401"), "{error}");
    assert_eq!(
        mesh.apps[0].load(Ordering::SeqCst),
        1,
        "only the admitted connection reached the app"
    );
}

#[tokio::test]
async fn a_policy_change_closes_open_connections_it_now_denies() {
    let mesh = mesh(46).await;
    let (mut client, proxied) = tokio::io::duplex(1024);
    let source: SocketAddr = "127.46.10.1:40000".parse().unwrap();
    let carried = mesh
        .outbound
        .proxy(proxied, source, "127.46.20.1:8080".parse().unwrap());
    let conversation = async {
        client.write_all(b"first").await.unwrap();
        let mut reply = [0u8; 8];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"onefirst");
        assert_eq!(mesh.inbound.connections.len(), 1);
        // Unrelated policy: the connection stays.
        let other = "cluster.local/ns/demo/sa/other";
        mesh.state
            .write()
            .unwrap()
            .insert_policy(policy("deny-other", Action::Deny, other));
        assert_eq!(mesh.inbound.recheck_connections(), 0);
        client.write_all(b"x").await.unwrap();
        let mut echo = [0u8; 1];
        client.read_exact(&mut echo).await.unwrap();
        // A DENY for this client closes it.
        let this = "cluster.local/ns/demo/sa/client";
        mesh.state
            .write()
            .unwrap()
            .insert_policy(policy("deny-client", Action::Deny, this));
        assert_eq!(mesh.inbound.recheck_connections(), 1);
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the revoked connection ends");
    };
    let (_, ()) = tokio::join!(carried, conversation);
    // The inbound side's copying task ends on its own schedule.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !mesh.inbound.connections.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "closed connections leave the table"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_service_bound_to_a_waypoint_goes_to_the_waypoint_with_the_original_vip() {
    let mesh = mesh(47).await;
    let waypoint_identity: SpiffeId = "spiffe://cluster.local/ns/demo/sa/waypoint".parse().unwrap();
    {
        let mut state = mesh.state.write().unwrap();
        let mut waypoint = workload("waypoint", "127.47.40.1", "node-2", "waypoint", true, false);
        waypoint.services = [(
            "demo/waypoint.demo.svc.cluster.local".to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 15008,
                    target_port: 15008,
                    ..Default::default()
                }],
            },
        )]
        .into();
        state.insert_workload(waypoint).unwrap();
        state
            .insert_service(Service {
                name: "waypoint".into(),
                namespace: "demo".into(),
                hostname: "waypoint.demo.svc.cluster.local".into(),
                addresses: vec![NetworkAddress {
                    network: String::new(),
                    address: ip("127.47.98.1"),
                }],
                ..Default::default()
            })
            .unwrap();
        let mut server = state.service(SERVICE).unwrap().as_ref().clone();
        server.waypoint = Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: String::new(),
                address: ip("127.47.98.1"),
            })),
            hbone_mtls_port: 15008,
        });
        state.insert_service(server).unwrap();
    }
    // The waypoint: an HBONE server that records what it was asked for and answers.
    let now = SystemTime::now();
    let certificate = mesh
        .authority
        .issue(
            &waypoint_identity,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap();
    let config = Arc::new(mesh_core::identity::tls::server_config(&certificate).unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = TcpListener::bind("127.47.40.1:15008").await.unwrap();
    let (_signal, watch) = drain::channel();
    let recorded = seen.clone();
    let handler = move |request: mesh_core::hbone::InboundRequest| {
        recorded
            .lock()
            .unwrap()
            .push((request.authority, request.peer_identity.to_string()));
        async move {
            let mut stream = request.accept().unwrap();
            // Read the client's (empty) request to its end first: dropping a stream the peer
            // still writes to resets it, which could discard the answer.
            stream.read_to_end(&mut Vec::new()).await.unwrap();
            stream.write_all(b"waypoint").await.unwrap();
            stream.shutdown().await.unwrap();
        }
    };
    tokio::spawn(Server::new(config).serve(listener, handler, watch));

    let received = send(&mesh, 47, "127.47.99.1:80", b"").await.unwrap();
    assert_eq!(received, b"waypoint");
    assert_eq!(
        *seen.lock().unwrap(),
        [(
            "127.47.99.1:80".parse::<SocketAddr>().unwrap(),
            "spiffe://cluster.local/ns/demo/sa/client".to_owned()
        )],
        "CONNECT to the waypoint names the original VIP:port, from the client's identity"
    );
    // Pods reached directly are not bound to the waypoint (waypoint-for: service).
    assert_eq!(send(&mesh, 47, "127.47.20.1:8080", b"!").await.unwrap(), b"one!");
    // The waypoint's own traffic to the service goes to an endpoint, not back to itself.
    let waypoint = mesh.state.read().unwrap().workload("waypoint").unwrap().clone();
    let route = mesh
        .outbound
        .route(&waypoint, "127.47.99.1:80".parse().unwrap())
        .unwrap();
    assert!(
        matches!(route, Route::Hbone { gateway, .. } if gateway.port() == 15008 && gateway.ip().to_string().starts_with("127.47.20.")),
        "{route:?}"
    );
}

#[tokio::test]
async fn metrics_count_connections_and_bytes_with_istio_labels() {
    let mesh = mesh(48).await;
    send(&mesh, 48, "127.48.20.1:8080", &[7u8; 1000]).await.unwrap();
    mesh.state
        .write()
        .unwrap()
        .insert_policy(policy("deny-client", Action::Deny, "cluster.local/ns/demo/sa/client"));
    send(&mesh, 48, "127.48.20.1:8080", b"no").await.unwrap_err();
    let text = mesh_core::telemetry::encode_metrics(&mesh.registry);
    let line = |name: &str, reporter: &str, flags: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(name)
                    && l.contains(&format!("reporter=\"{reporter}\""))
                    && l.contains(&format!("response_flags=\"{flags}\""))
            })
            .unwrap_or_else(|| panic!("no {name} {reporter} {flags} in\n{text}"))
            .to_owned()
    };
    let opened = line("istio_tcp_connections_opened_total", "destination", "-");
    for label in [
        "source_workload=\"client\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        "destination_workload=\"server-1\"",
        "destination_workload_namespace=\"demo\"",
        "destination_principal=\"spiffe://cluster.local/ns/demo/sa/server\"",
        "destination_service=\"server.demo.svc.cluster.local\"",
        "connection_security_policy=\"mutual_tls\"",
        "request_protocol=\"tcp\"",
    ] {
        assert!(opened.contains(label), "{label} missing from {opened}");
    }
    assert!(opened.ends_with(" 1"), "{opened}");
    // Request bytes are "received", the response ("one" + echo) "sent", on both sides.
    for reporter in ["source", "destination"] {
        assert!(line("istio_tcp_received_bytes_total", reporter, "-").ends_with(" 1000"));
        assert!(line("istio_tcp_sent_bytes_total", reporter, "-").ends_with(" 1003"));
        assert!(line("istio_tcp_connections_closed_total", reporter, "-").ends_with(" 1"));
    }
    assert!(line("istio_tcp_connections_opened_total", "destination", "DENY").ends_with(" 1"));
    assert!(line("istio_tcp_connections_opened_total", "source", "DENY").ends_with(" 1"));
}

#[tokio::test]
async fn per_connection_futures_stay_small() {
    let mesh = mesh(49).await;
    let (source, destination) = ("127.49.10.1:1".parse().unwrap(), "127.49.20.1:8080".parse().unwrap());
    let listener = TcpListener::bind("127.49.10.1:0").await.unwrap();
    let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let setup = (
        std::mem::size_of_val(&mesh.outbound.open(source, destination)),
        std::mem::size_of_val(&inbound::handle_plaintext(mesh.inbound.clone(), stream, destination)),
    );
    // What an idle connection holds for its whole life: the copying task alone.
    let opened = mesh.outbound.open(source, destination).await.unwrap();
    let (client, _app_side) = tokio::io::duplex(64);
    let copying = std::mem::size_of_val(&opened.carry(client));
    println!(
        "setup futures: outbound {} B, inbound {} B; outbound copying future {copying} B",
        setup.0, setup.1
    );
    // Bounds, so that growth is noticed.
    assert!(setup.0 <= OUTBOUND_SETUP_LIMIT, "outbound setup future {} B", setup.0);
    assert!(setup.1 <= INBOUND_SETUP_LIMIT, "inbound setup future {} B", setup.1);
    assert!(copying <= COPYING_LIMIT, "outbound copying future {copying} B");
}
