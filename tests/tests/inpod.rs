//! In-pod redirection for real: each pod is a network namespace wired to its node with a veth
//! pair, and ztunnel (in `inpod` mode) finds each ambient pod's namespace by its IP, installs its
//! capture rules and listens inside it. The apps know nothing of the mesh.
//!
//! Ambient → ambient goes over HBONE (mTLS metrics on the receiving side), non-ambient → ambient
//! is admitted as plaintext on 15006, ambient → non-ambient passes through; labelling a namespace
//! ambient enrols its running pods and removing the label unenrols them; after a ztunnel crash
//! the rules stay and a restarted ztunnel serves new connections again; a clean exit removes them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_lab::topology::{self, Namespace};
use mesh_tests::greeting_echo_app_on;
use mesh_tests::lab::{Lab, connect_in, exchange, http_get, listen_in, pod_yaml};
use mesh_tests::netns;

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

/// Polls `check` until it holds or 15 s pass.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within 15s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn captured(pod: &Namespace) -> bool {
    pod.exec("nft", &["list", "table", "inet", "ztunnel"], None).is_ok()
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

#[test]
fn ztunnel_enrols_pods_in_their_own_namespaces() {
    if !netns::privileged("ztunnel_enrols_pods_in_their_own_namespaces") {
        return;
    }
    netns::isolated(|| async {
        // The test's own namespace is the node; each pod gets a named namespace wired to it.
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
        let _server_app = greeting_echo_app_on(listen_in(&server, at(SERVER, 8080))?, "srv");
        let _legacy_app = greeting_echo_app_on(listen_in(&legacy, at(LEGACY, 8080))?, "leg");

        let mut lab = Lab::start_with(
            BASE,
            &manifests(false),
            &["node-1"],
            &[
                "--redirect=inpod".into(),
                format!("--netns-dir={}", topology::NETNS_DIR),
            ],
        )
        .await?;
        eventually("client and server enrolled", || captured(&client) && captured(&server)).await;
        assert!(!captured(&legacy), "a pod outside the mesh gets no rules");

        // Ambient → ambient: captured in the client's namespace, HBONE into the server's.
        let received = exchange(connect_in(&client, at(SERVER, 8080)).await?, b"hello").await?;
        assert_eq!(received, b"srvhello");
        assert!(
            inbound_from(&lab, "client", "mutual_tls").await,
            "client → server went over mTLS"
        );

        // Non-ambient → ambient: plaintext, admitted on 15006 (PERMISSIVE).
        let received = exchange(connect_in(&legacy, at(SERVER, 8080)).await?, b"plain").await?;
        assert_eq!(received, b"srvplain");
        assert!(
            inbound_from(&lab, "legacy", "unknown").await,
            "legacy → server counted as plaintext"
        );

        // Ambient → non-ambient: passed through.
        let received = exchange(connect_in(&client, at(LEGACY, 8080)).await?, b"out").await?;
        assert_eq!(received, b"legout");

        // Labelling the legacy namespace ambient enrols its running pod; its traffic turns mTLS.
        lab.write_config("lab.yaml", &manifests(true))?;
        eventually("legacy pod enrolled", || captured(&legacy)).await;
        let received = exchange(connect_in(&legacy, at(SERVER, 8080)).await?, b"tls").await?;
        assert_eq!(received, b"srvtls");
        assert!(
            inbound_from(&lab, "legacy", "mutual_tls").await,
            "legacy → server now over mTLS"
        );

        // Removing the label unenrols it.
        lab.write_config("lab.yaml", &manifests(false))?;
        eventually("legacy pod unenrolled", || !captured(&legacy)).await;

        // A crash leaves the rules in place; the restarted ztunnel takes the pods back.
        lab.crash_ztunnel(1);
        assert!(captured(&client) && captured(&server), "rules survive a crash");
        lab.start_ztunnel(1)?;
        lab.wait_ztunnel(1).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let attempt = async { exchange(connect_in(&client, at(SERVER, 8080)).await?, b"again").await };
            if attempt.await.is_ok_and(|r| r == b"srvagain") {
                break;
            }
            assert!(Instant::now() < deadline, "no traffic after the restart within 15s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // A clean exit removes every rule it installed.
        let admin: SocketAddr = format!("{}:15000", lab.node_host(1)).parse()?;
        let mut stream = tokio::net::TcpStream::connect(admin).await?;
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"POST /quitquitquit HTTP/1.1\r\nhost: lab\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await?;
        eventually("rules removed on a clean exit", || {
            !captured(&client) && !captured(&server)
        })
        .await;
        Ok(())
    })
    .unwrap();
}
