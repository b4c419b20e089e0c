//! ztunnel's L4 path between two "nodes" on loopback addresses: outbound on node 1 carries a
//! client's connection over HBONE to inbound on node 2, which authorizes it and connects to the
//! app. Data intact both ways with half-close, service VIPs spread over endpoints, policies deny
//! with 401 before the app sees anything, non-mesh destinations get plain TCP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use mesh_core::hbone::{Pool, PoolConfig, Server};
use mesh_core::identity::{Authority, SpiffeId, WorkloadCertificate};
use mesh_core::proto::security::{Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match};
use mesh_core::proto::workload::{NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload, WorkloadStatus};
use mesh_tests::greeting_echo_app;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use ztunnel::certificates::{CertificateError, CertificateManager, CertificateSource, Retry};
use ztunnel::proxy::outbound::{Outbound, OutboundError};
use ztunnel::proxy::{Context, inbound};
use ztunnel::state::State;

const SERVICE: &str = "demo/server.demo.svc.cluster.local";

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
    let context = |node: &str| {
        Arc::new(Context::new(
            state.clone(),
            CertificateManager::new(Direct(authority.clone()), Retry::default()),
            node,
            "",
        ))
    };
    let (node1, node2) = (context("node-1"), context("node-2"));
    let mut signals = Vec::new();
    for host in [addr(20, 1), addr(20, 2)] {
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
    ];
    Mesh {
        outbound: Outbound::new(node1, Pool::new(PoolConfig::default())),
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
async fn service_vip_spreads_over_endpoints() {
    let mesh = mesh(42).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let received = send(&mesh, 42, "127.42.99.1:80", b"hi").await.unwrap();
        seen.push(String::from_utf8_lossy(&received[..3]).into_owned());
    }
    assert_eq!(seen.iter().filter(|s| *s == "one").count(), 3, "{seen:?}");
    assert_eq!(seen.iter().filter(|s| *s == "two").count(), 3, "{seen:?}");
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
    for uid in ["server-1", "server-2"] {
        mesh.state.write().unwrap().remove_address(uid);
    }
    let error = send(&mesh, 44, "127.44.99.1:80", b"hi").await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "no healthy endpoint for service server.demo.svc.cluster.local:80"
    );
}
