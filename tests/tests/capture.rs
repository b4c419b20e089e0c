//! Captured traffic in a network namespace of the test's own: the apps connect to real addresses
//! and know nothing of the mesh; nftables rules (as the in-pod rules will) hand their connections
//! to ztunnel's 15001 (outbound) and 15006 (inbound plaintext). Ambient → service goes over
//! HBONE; ambient → non-mesh is passed through; non-mesh → ambient is admitted in PERMISSIVE and
//! refused in STRICT mode, and metrics tell mTLS from plaintext.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mesh_tests::greeting_echo_app;
use mesh_tests::lab::{Lab, connect_from, demo_manifests, exchange, http_get, pod_yaml};
use mesh_tests::netns;

const BASE: u8 = 71;

fn manifests() -> String {
    let mut yaml = demo_manifests(BASE);
    yaml += "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n";
    yaml += &pod_yaml("legacy-client", "legacy", "node-1", "127.71.1.50", "legacy-client");
    yaml += &pod_yaml("legacy-server", "legacy", "node-2", "127.71.2.50", "legacy-server");
    yaml
}

const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: mtls, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n";
const PERMISSIVE: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: mtls, namespace: demo}\nspec: {mtls: {mode: PERMISSIVE}}\n";

fn at(address: &str) -> SocketAddr {
    address.parse().expect("address")
}

/// Retries `attempt` until it returns true or 10 s pass (configuration takes a moment to arrive).
async fn eventually<F, Fut>(what: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !attempt().await {
        assert!(Instant::now() < deadline, "{what}: not within 10s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn captured_traffic_goes_over_hbone_and_strict_refuses_plaintext() {
    if !netns::privileged("captured_traffic_goes_over_hbone_and_strict_refuses_plaintext") {
        return;
    }
    netns::isolated(|| async {
        let lab = Lab::start_for_capture(BASE, &manifests(), &["node-1", "node-2"]).await?;
        lab.capture(&["127.71.1.1", "127.71.2.1", "127.71.2.2"])?;
        let one = greeting_echo_app("127.71.2.1:8080", "one").await;
        let _two = greeting_echo_app("127.71.2.2:8080", "two").await;
        let legacy = greeting_echo_app("127.71.2.50:8080", "legacy").await;

        // Ambient client → service VIP: captured, carried over HBONE to both endpoints.
        let mut greetings = Vec::new();
        for _ in 0..4 {
            let received = exchange(connect_from("127.71.1.1", at("127.71.99.1:80")).await?, b"hello").await?;
            greetings.push(String::from_utf8_lossy(&received).into_owned());
        }
        greetings.sort();
        assert_eq!(greetings, ["onehello", "onehello", "twohello", "twohello"]);

        // Ambient → non-mesh: passed through as plain TCP.
        let received = exchange(connect_from("127.71.1.1", at("127.71.2.50:8080")).await?, b"hi").await?;
        assert_eq!(received, b"legacyhi");
        assert_eq!(legacy.load(Ordering::SeqCst), 1);

        // Non-mesh → ambient, PERMISSIVE by default: admitted on 15006 as plaintext.
        let received = exchange(connect_from("127.71.1.50", at("127.71.2.1:8080")).await?, b"plain").await?;
        assert_eq!(received, b"oneplain");

        let metrics = http_get(format!("{}:15020", lab.node_host(2)).parse()?, "/metrics")
            .await?
            .1;
        let inbound = |security: &str, source: &str| {
            metrics.lines().any(|l| {
                l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains("reporter=\"destination\"")
                    && l.contains(&format!("connection_security_policy=\"{security}\""))
                    && l.contains(&format!("source_workload=\"{source}\""))
            })
        };
        assert!(
            inbound("mutual_tls", "client"),
            "HBONE inbound counted as mTLS:\n{metrics}"
        );
        assert!(
            inbound("unknown", "legacy-client"),
            "plaintext inbound counted:\n{metrics}"
        );

        // STRICT: plaintext is refused before the app, mTLS still flows.
        lab.write_config("mtls.yaml", STRICT)?;
        eventually("STRICT refuses plaintext", || async {
            let stream = connect_from("127.71.1.50", at("127.71.2.1:8080"))
                .await
                .expect("connect");
            exchange(stream, b"plain").await.unwrap_or_default().is_empty()
        })
        .await;
        // Once STRICT is in force, a new plaintext connection never reaches the app. (While it
        // arrives, one may be admitted and then revoked: that one the app did see.)
        let before = one.load(Ordering::SeqCst);
        let refused = exchange(connect_from("127.71.1.50", at("127.71.2.1:8080")).await?, b"plain").await;
        assert!(refused.unwrap_or_default().is_empty(), "STRICT refuses plaintext");
        assert_eq!(
            one.load(Ordering::SeqCst),
            before,
            "the app never saw the refused connection"
        );
        let received = exchange(connect_from("127.71.1.1", at("127.71.2.1:8080")).await?, b"tls").await?;
        assert_eq!(received, b"onetls", "mTLS is admitted under STRICT");

        // PERMISSIVE again: plaintext admitted.
        lab.write_config("mtls.yaml", PERMISSIVE)?;
        eventually("PERMISSIVE admits plaintext", || async {
            let stream = connect_from("127.71.1.50", at("127.71.2.1:8080"))
                .await
                .expect("connect");
            exchange(stream, b"p").await.unwrap_or_default() == b"onep"
        })
        .await;
        Ok(())
    })
    .unwrap();
}
