//! In-pod mode for real, driven over ZDS: each pod is a network namespace wired to its node with
//! a veth pair; the test plays the node agent (capture rules installed by it, the namespace handed
//! to ztunnel over ZDS with the protocol's messages, see `mesh_tests::zds_peer`) and ztunnel
//! listens inside each pod's namespace. The apps know nothing of the mesh.
//!
//! Ambient → ambient goes over HBONE (mTLS metrics on the receiving side), non-ambient → ambient
//! is admitted as plaintext on 15006, ambient → non-ambient passes through; a pod added later is
//! captured, a deleted one released; bad requests get an ack with the reason. A snapshot after a
//! reconnect drops the pods it does not name; while no ztunnel serves a pod (crash, graceful stop)
//! its captured connections are refused, never carried around the mesh; a restarted ztunnel
//! serves again once the agent sends its snapshot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mesh_core::netns::NetNs;
use mesh_lab::topology::{self, Namespace};
use mesh_tests::greeting_echo_app_on;
use mesh_tests::lab::{Lab, connect_in, exchange, http_get, listen_in, pod_yaml};
use mesh_tests::netns;
use mesh_tests::zds_peer::ZdsPeer;

const BASE: u8 = 73;
const CLIENT: &str = "10.73.0.1";
const SERVER: &str = "10.73.0.2";
const LEGACY: &str = "10.73.0.3";

fn manifests(legacy_ambient: bool) -> String {
    let legacy_labels = if legacy_ambient {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    let mut yaml =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n"
            .to_owned();
    yaml += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: legacy, labels: {legacy_labels}}}\n");
    yaml += &pod_yaml("client", "demo", "node-1", CLIENT, "client");
    yaml += &pod_yaml("server", "demo", "node-1", SERVER, "server");
    yaml += &pod_yaml("legacy", "legacy", "node-1", LEGACY, "legacy");
    yaml
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// The opened-connection lines of the node's inbound metrics from `source` secured by `security`.
async fn inbound_from(lab: &Lab, source: &str, security: &str) -> bool {
    let Ok((_, metrics)) = http_get(format!("{}:15020", lab.node_host(1)).parse().unwrap(), "/metrics").await else {
        return false;
    };
    metrics.lines().any(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"destination\"")
            && l.contains(&format!("source_workload=\"{source}\""))
            && l.contains(&format!("connection_security_policy=\"{security}\""))
    })
}

/// A connection from `pod` to `to` while nothing serves the pod: refused by the kernel (the rules
/// redirect it to a port nobody listens on), and the app never hears of it.
async fn refused_while_unserved(pod: &Namespace, to: SocketAddr, app_accepts: &AtomicUsize) {
    let before = app_accepts.load(Ordering::SeqCst);
    let error = connect_in(pod, to)
        .await
        .expect_err("nothing serves the pod: the connection must fail");
    let refused = error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
    assert!(refused, "expected a refusal, got {error:#}");
    assert_eq!(
        app_accepts.load(Ordering::SeqCst),
        before,
        "the app saw a connection around the mesh"
    );
}

/// A connection from `pod` to an unserved destination pod: the source's ztunnel takes it but
/// cannot open the tunnel, so the client sees its connection end without an answer, and the app
/// never hears of it.
async fn not_carried(pod: &Namespace, to: SocketAddr, app_accepts: &AtomicUsize) {
    let before = app_accepts.load(Ordering::SeqCst);
    let attempt = async { exchange(connect_in(pod, to).await?, b"sneak").await };
    match attempt.await {
        Ok(answer) => assert!(answer.is_empty(), "an unserved pod answered: {answer:?}"),
        Err(error) => assert!(
            error.downcast_ref::<std::io::Error>().is_some(),
            "expected a closed or reset connection, got {error:#}"
        ),
    }
    assert_eq!(
        app_accepts.load(Ordering::SeqCst),
        before,
        "the app saw a connection around the mesh"
    );
}

async fn eventually_carried(pod: &Namespace, to: SocketAddr, message: &[u8], expected: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = async { exchange(connect_in(pod, to).await?, message).await };
        if attempt.await.is_ok_and(|r| r == expected) {
            return;
        }
        assert!(Instant::now() < deadline, "not carried within 15s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_agent_hands_pods_to_ztunnel_over_zds() {
    if !netns::privileged("the_agent_hands_pods_to_ztunnel_over_zds") {
        return;
    }
    netns::isolated(|| async {
        let names = ["client", "server", "legacy"].map(|p| format!("mt{}-{p}", std::process::id()));
        let pods = names.each_ref().map(|n| Namespace::create(n));
        let [client, server, legacy] = pods;
        let (client, server, legacy) = (client?, server?, legacy?);
        for (pod, ip, link) in [
            (&client, CLIENT, "vclient"),
            (&server, SERVER, "vserver"),
            (&legacy, LEGACY, "vlegacy"),
        ] {
            topology::attach(None, pod, link, ip.parse()?)?;
        }
        topology::enable_forwarding(None)?;
        let server_accepts = greeting_echo_app_on(listen_in(&server, at(SERVER, 8080))?, "srv");
        let _legacy_app = greeting_echo_app_on(listen_in(&legacy, at(LEGACY, 8080))?, "leg");

        let socket = std::env::temp_dir().join(format!("mt-zds-{}.sock", std::process::id()));
        let mut agent = ZdsPeer::bind(&socket)?;
        let zds = format!("--zds-socket={}", socket.display());
        let lab = tokio::spawn(async move {
            Lab::start_with(BASE, &manifests(false), &["node-1"], &["--redirect=inpod".into(), zds]).await
        });
        // ztunnel is ready once it has the (empty) snapshot of a fresh agent.
        let session = agent.accept().await?;
        assert_eq!(session.snapshot_sent().await?, Ok(()));
        let mut lab = lab.await??;
        session.capture(&client.path(), "demo", "client").await?;
        session.capture(&server.path(), "demo", "server").await?;

        // Ambient → ambient: captured in the client's namespace, HBONE into the server's.
        let received = exchange(connect_in(&client, at(SERVER, 8080)).await?, b"hello").await?;
        assert_eq!(received, b"srvhello");
        assert!(
            inbound_from(&lab, "client", "mutual_tls").await,
            "client → server went over mTLS"
        );

        // Not (yet) in the mesh → ambient: plaintext, admitted on 15006 (PERMISSIVE).
        let received = exchange(connect_in(&legacy, at(SERVER, 8080)).await?, b"plain").await?;
        assert_eq!(received, b"srvplain");
        assert!(
            inbound_from(&lab, "legacy", "unknown").await,
            "legacy → server counted as plaintext"
        );
        // Ambient → outside the mesh: passed through.
        let received = exchange(connect_in(&client, at(LEGACY, 8080)).await?, b"out").await?;
        assert_eq!(received, b"legout");

        // A pod added later (its namespace labelled) is captured at once: its very first
        // connection is mTLS.
        lab.write_config("lab.yaml", &manifests(true))?;
        session.capture(&legacy.path(), "legacy", "legacy").await?;
        let received = exchange(connect_in(&legacy, at(SERVER, 8080)).await?, b"tls").await?;
        assert_eq!(received, b"srvtls");
        assert!(
            inbound_from(&lab, "legacy", "mutual_tls").await,
            "legacy → server now over mTLS"
        );

        // Requests ztunnel cannot honour are acked with the reason.
        let no_fd = session.add("uid-x", "demo", "x", "x", None).await?;
        assert!(
            no_fd
                .as_ref()
                .is_err_and(|e| e.contains("without its network namespace")),
            "{no_fd:?}"
        );
        let late_keep = session.keep("uid-client").await?;
        assert!(
            late_keep.as_ref().is_err_and(|e| e.contains("after SnapshotSent")),
            "{late_keep:?}"
        );

        // Deleted: ztunnel stops serving it; the agent removes its rules and it leaves the mesh.
        assert_eq!(session.delete("uid-legacy").await?, Ok(()));
        mesh_core::capture::remove(&NetNs::open(&legacy.path())?)?;
        let received = exchange(connect_in(&legacy, at(SERVER, 8080)).await?, b"left").await?;
        assert_eq!(received, b"srvleft");

        // The agent reconnects (its restart): a snapshot naming only the client drops the server;
        // the server's rules stay, so connections to it from outside are refused, never let in.
        drop(session);
        let session = agent.accept().await?;
        assert_eq!(session.keep("uid-client").await?, Ok(()), "a pod ztunnel holds is kept");
        assert!(
            session.keep("uid-unknown").await?.is_err(),
            "a keep for a pod it does not hold fails"
        );
        assert_eq!(session.snapshot_sent().await?, Ok(()));
        not_carried(&client, at(SERVER, 8080), &server_accepts).await;
        session.capture(&server.path(), "demo", "server").await?;
        eventually_carried(&client, at(SERVER, 8080), b"back", b"srvback").await;

        // A crash: the rules stay, the pods' connections are refused until ztunnel is back.
        lab.crash_ztunnel(1);
        refused_while_unserved(&client, at(SERVER, 8080), &server_accepts).await;
        lab.start_ztunnel(1)?;
        let session = agent.accept().await?;
        for (pod, namespace, name) in [(&client, "demo", "client"), (&server, "demo", "server")] {
            let netns = NetNs::open(&pod.path())?;
            assert_eq!(
                session
                    .add(&format!("uid-{name}"), namespace, name, name, Some(&netns))
                    .await?,
                Ok(())
            );
        }
        assert_eq!(session.snapshot_sent().await?, Ok(()));
        lab.wait_ztunnel(1).await?;
        eventually_carried(&client, at(SERVER, 8080), b"again", b"srvagain").await;

        // A graceful stop leaves the rules too (fail closed): nothing gets around the mesh.
        let admin: SocketAddr = format!("{}:15000", lab.node_host(1)).parse()?;
        let mut stream = tokio::net::TcpStream::connect(admin).await?;
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"POST /quitquitquit HTTP/1.1\r\nhost: lab\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while connect_in(&client, at(SERVER, 8080)).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "ztunnel still serving 15s after a stop request"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        refused_while_unserved(&client, at(SERVER, 8080), &server_accepts).await;
        assert!(
            mesh_core::capture::installed(&NetNs::open(&client.path())?),
            "rules survive a graceful stop"
        );
        drop(session);
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
    .unwrap();
}
