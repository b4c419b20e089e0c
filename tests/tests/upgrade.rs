//! A ztunnel upgrade that keeps every connection: a second ztunnel for the same node gets the
//! node's pods over ZDS and listens beside the first (SO_REUSEPORT in each pod's namespace); the
//! first is told to stop: it stops accepting at once but carries its open connections to their
//! end, and exits when the last one ends. A long-lived connection streaming both ways through the
//! first keeps flowing with no byte lost; new connections go to the second.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_lab::topology::{self, Namespace};
use mesh_tests::greeting_echo_app_on;
use mesh_tests::lab::{Lab, connect_in, exchange, http_get, listen_in, pod_yaml};
use mesh_tests::netns;
use mesh_tests::zds_peer::ZdsPeer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BASE: u8 = 74;
const CLIENT: &str = "10.74.0.1";
const SERVER: &str = "10.74.0.2";

fn manifests() -> String {
    let mut yaml =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n"
            .to_owned();
    yaml += &pod_yaml("client", "demo", "node-1", CLIENT, "client");
    yaml += &pod_yaml("server", "demo", "node-1", SERVER, "server");
    yaml
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// Connections the ztunnel at `host` counted as opened from the client, as the source.
async fn outbound_opened(host: &str) -> u64 {
    let Ok((_, metrics)) = http_get(format!("{host}:15020").parse().unwrap(), "/metrics").await else {
        return 0;
    };
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"source\"")
                && l.contains("source_workload=\"client\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn an_upgrade_hands_over_without_losing_a_connection() {
    if !netns::privileged("an_upgrade_hands_over_without_losing_a_connection") {
        return;
    }
    netns::isolated(|| async {
        let names = ["client", "server"].map(|p| format!("mu{}-{p}", std::process::id()));
        let [client, server] = names.each_ref().map(|n| Namespace::create(n));
        let (client, server) = (client?, server?);
        topology::attach(None, &client, "vclient", CLIENT.parse()?)?;
        topology::attach(None, &server, "vserver", SERVER.parse()?)?;
        topology::enable_forwarding(None)?;
        let _app = greeting_echo_app_on(listen_in(&server, at(SERVER, 8080))?, "srv");

        let socket = std::env::temp_dir().join(format!("mu-zds-{}.sock", std::process::id()));
        let mut agent = ZdsPeer::bind(&socket)?;
        let inpod = |deadline: &str| {
            vec![
                "--redirect=inpod".to_owned(),
                format!("--zds-socket={}", socket.display()),
                format!("--drain-deadline={deadline}"),
            ]
        };
        let first_args = inpod("60s");
        let lab = tokio::spawn(async move { Lab::start_with(BASE, &manifests(), &["node-1"], &first_args).await });
        let first = agent.accept().await?;
        assert_eq!(first.snapshot_sent().await?, Ok(()));
        let mut lab = lab.await??;
        first.capture(&client.path(), "demo", "client").await?;
        first.capture(&server.path(), "demo", "server").await?;

        // A long-lived connection through the first ztunnel, streaming both ways.
        let mut stream = connect_in(&client, at(SERVER, 8080)).await?;
        let mut greeting = [0u8; 3];
        stream.read_exact(&mut greeting).await?;
        assert_eq!(&greeting, b"srv");
        let (mut sent, mut echoed) = (0usize, 0usize);
        for i in 0..20 {
            let chunk = format!("chunk {i:06}|").into_bytes();
            stream.write_all(&chunk).await?;
            let mut back = vec![0u8; chunk.len()];
            stream.read_exact(&mut back).await?;
            assert_eq!(back, chunk);
            sent += chunk.len();
            echoed += back.len();
        }

        // The second ztunnel arrives and gets the snapshot; then the first is told to stop.
        let second_index = lab.add_ztunnel("node-1", &inpod("1s"))?;
        let second = agent.accept().await?;
        for (pod, name) in [(&client, "client"), (&server, "server")] {
            second.capture(&pod.path(), "demo", name).await?;
        }
        assert_eq!(second.snapshot_sent().await?, Ok(()));
        lab.wait_ztunnel(second_index).await?;
        let admin: SocketAddr = format!("{}:15000", lab.node_host(1)).parse()?;
        let mut stop = tokio::net::TcpStream::connect(admin).await?;
        stop.write_all(b"POST /quitquitquit HTTP/1.1\r\nhost: lab\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await?;

        // New connections go to the second ztunnel (the first no longer accepts)...
        let second_host = lab.node_host(second_index);
        let before = outbound_opened(&second_host).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let received = exchange(connect_in(&client, at(SERVER, 8080)).await?, b"new").await?;
            assert_eq!(received, b"srvnew", "a new connection during the handover failed");
            if outbound_opened(&second_host).await > before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "new connections never reached the second ztunnel"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...while the old connection keeps flowing through the first, byte for byte.
        for i in 20..60 {
            let chunk = format!("chunk {i:06}|").into_bytes();
            stream.write_all(&chunk).await?;
            let mut back = vec![0u8; chunk.len()];
            stream.read_exact(&mut back).await?;
            assert_eq!(back, chunk, "the old connection lost or changed bytes");
            sent += chunk.len();
            echoed += back.len();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !lab.ztunnel_exited(1),
            "the first ztunnel left before its last connection ended"
        );
        stream.shutdown().await?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await?;
        assert!(rest.is_empty(), "unexpected bytes after the half-close: {rest:?}");
        assert_eq!((sent, echoed), (60 * 13, 60 * 13), "13 bytes a chunk, 60 chunks");

        // The first exits once its last connection has ended.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lab.ztunnel_exited(1) {
            assert!(
                Instant::now() < deadline,
                "the first ztunnel did not exit after its last connection ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
    .unwrap();
}
