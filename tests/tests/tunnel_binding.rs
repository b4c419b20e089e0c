//! A tunnel is bound to the listener it arrives on: on the two-node lab, an HBONE client with a
//! valid mesh identity CONNECTs to a pod's listener naming another pod, a non-mesh pod, or one of
//! ztunnel's own ports, and is refused with 400 and a log line naming both addresses; the apps
//! it named never see a connection. The same client reaching the listener's own pod is served.

use std::sync::atomic::Ordering;

use http::StatusCode;
use mesh_core::hbone::HboneError;
use mesh_tests::greeting_echo_app;
use mesh_tests::lab::{self, Lab};
use mesh_tests::peer::{Peer, demo_id, log_line, logs};

const BASE: u8 = 81;

fn manifests() -> String {
    let mut yaml = lab::demo_manifests(BASE);
    yaml += "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n";
    yaml += &lab::pod_yaml("legacy", "plain", "node-1", &format!("127.{BASE}.1.5"), "legacy");
    yaml
}

fn refused_with(result: Result<Vec<u8>, HboneError>) -> StatusCode {
    match result {
        Err(HboneError::Status { status, .. }) => status,
        other => panic!("expected a refusal status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_must_name_the_listeners_own_pod_and_never_a_ztunnel_port() {
    logs();
    let lab = Lab::start(BASE, &manifests(), &["node-1", "node-2"]).await.unwrap();
    let server_1 = format!("127.{BASE}.2.1");
    let (server_2, client, legacy) = (
        format!("127.{BASE}.2.2"),
        format!("127.{BASE}.1.1"),
        format!("127.{BASE}.1.5"),
    );
    let one = greeting_echo_app(&format!("{server_1}:8080"), "one").await;
    let two = greeting_echo_app(&format!("{server_2}:8080"), "two").await;
    let plain = greeting_echo_app(&format!("{legacy}:8080"), "legacy").await;
    let peer = Peer::new(&lab, demo_id("client")).unwrap();
    let (server, client_id) = (demo_id("server"), demo_id("client"));
    let listener = format!("{server_1}:15008");

    // The listener's own pod: served.
    let reply = peer
        .exchange(&listener, &server, &format!("{server_1}:8080"))
        .await
        .unwrap();
    assert_eq!(reply, b"one!");
    assert_eq!(one.load(Ordering::SeqCst), 1);

    // Another pod of the same node, behind server-1's certificate: 400, never relayed.
    let target = format!("{server_2}:8080");
    assert_eq!(
        refused_with(peer.exchange(&listener, &server, &target).await),
        StatusCode::BAD_REQUEST
    );
    let line = log_line(
        "HBONE CONNECT refused with 400",
        &[("listener", &listener), ("dst.addr", &target)],
    )
    .await;
    assert_eq!(
        line["reason"],
        format!("target {target} is not the workload this listener serves ({listener}); ztunnel does not relay")
    );
    assert_eq!(line["src.identity"], "spiffe://cluster.local/ns/demo/sa/client");
    assert_eq!(two.load(Ordering::SeqCst), 0, "server-2 never saw it");

    // ztunnel's own ports on the listener's pod: 400 each (no tunnel in the tunnel).
    for port in [15008, 15006, 15001, 15053, 15020, 15021, 15000] {
        let target = format!("{server_1}:{port}");
        assert_eq!(
            refused_with(peer.exchange(&listener, &server, &target).await),
            StatusCode::BAD_REQUEST,
            "{target}"
        );
        let line = log_line(
            "HBONE CONNECT refused with 400",
            &[("listener", &listener), ("dst.addr", &target)],
        )
        .await;
        assert_eq!(line["reason"], format!("target {target} is one of ztunnel's own ports"));
    }

    // The client pod's listener does not open a way to the non-mesh pod beside it.
    let listener = format!("{client}:15008");
    let target = format!("{legacy}:8080");
    assert_eq!(
        refused_with(peer.exchange(&listener, &client_id, &target).await),
        StatusCode::BAD_REQUEST
    );
    let line = log_line(
        "HBONE CONNECT refused with 400",
        &[("listener", &listener), ("dst.addr", &target)],
    )
    .await;
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .starts_with(&format!("target {target} is not")),
        "{line}"
    );
    assert_eq!(plain.load(Ordering::SeqCst), 0, "the non-mesh pod never saw it");

    // Outbound, a pod naming its own ztunnel ports is refused too (and said so).
    let stream = lab
        .connect(1, &client, format!("{client}:15008").parse().unwrap())
        .await
        .unwrap();
    assert!(lab::exchange(stream, b"x").await.unwrap().is_empty());
    let line = log_line("connection refused", &[("destination", &format!("{client}:15008"))]).await;
    assert_eq!(
        line["error"],
        format!("{client}:15008 is one of ztunnel's own ports on the source itself")
    );
}
