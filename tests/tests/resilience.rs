//! What must not break traffic: the controller going away and coming back (ztunnels keep their
//! last state, open connections carry on, new ones are made, and changes flow again after the
//! restart, including revoking open connections a new policy denies), and certificate renewal (open connections stay up while certificates are replaced).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_tests::greeting_echo_app;
use mesh_tests::lab::{Lab, demo_manifests, exchange, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BASE: u8 = 63;

/// Writes `data` on an open connection to the echo app and reads the same back.
async fn echo(stream: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    stream.write_all(data).await.expect("write on the open connection");
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .expect("echo within 5s")
        .expect("read on the open connection");
    back
}

/// The `notAfter` of node 1's certificate for the client, from /config_dump.
async fn client_certificate_expiry(lab: &Lab) -> u64 {
    let (_, dump) = http_get(format!("{}:15000", lab.node_host(1)).parse().unwrap(), "/config_dump")
        .await
        .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    dump["certificates"][0]["notAfter"]
        .as_u64()
        .expect("a ready certificate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_survive_certificate_renewal_and_a_controller_restart() {
    // 4 s certificates: renewed every 2 s.
    let mut lab = Lab::start_with(
        BASE,
        &demo_manifests(BASE),
        &["node-1", "node-2"],
        &["--cert-ttl=4s".into()],
    )
    .await
    .unwrap();
    let _one = greeting_echo_app(&format!("127.{BASE}.2.1:8080"), "one").await;
    let _two = greeting_echo_app(&format!("127.{BASE}.2.2:8080"), "two").await;
    let client = format!("127.{BASE}.1.1");
    let server: SocketAddr = format!("127.{BASE}.2.1:8080").parse().unwrap();
    let service: SocketAddr = format!("127.{BASE}.99.1:80").parse().unwrap();

    let mut open = lab.connect(1, &client, server).await.unwrap();
    let mut greeting = [0u8; 3];
    open.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"one");
    assert_eq!(echo(&mut open, b"before").await, b"before");

    // Renewal: the certificate is replaced (twice, to be sure) while the connection stays up.
    let first = client_certificate_expiry(&lab).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client_certificate_expiry(&lab).await < first + 2 {
        assert!(Instant::now() < deadline, "certificate not renewed within 10s");
        assert_eq!(echo(&mut open, b"tick").await, b"tick");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        echo(&mut open, b"renewed").await,
        b"renewed",
        "open connection survives renewal"
    );

    // The controller goes away: open connections carry on, new ones still work.
    lab.stop_istiod();
    assert_eq!(echo(&mut open, b"alone").await, b"alone");
    let received = exchange(lab.connect(1, &client, service).await.unwrap(), b"new")
        .await
        .unwrap();
    assert!(received == b"onenew" || received == b"twonew", "{received:?}");

    // It comes back: ztunnels reconnect, and a change made now reaches them.
    lab.start_istiod().await.unwrap();
    assert_eq!(echo(&mut open, b"back").await, b"back");
    lab.write_config(
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: demo}\nspec: {action: DENY, rules: [{}]}\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let received = exchange(lab.connect(1, &client, service).await.unwrap(), b"x")
            .await
            .unwrap_or_default();
        if received.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a policy written after the restart never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and the open connection, which that policy now denies, is closed.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the open connection was not revoked");
}
