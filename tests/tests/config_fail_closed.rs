//! Configuration mistakes fail closed, on the running lab: each typo that used to turn an ALLOW
//! policy into allow-all is rejected with an error naming the field, and the policy's last good
//! version stays in force (the client is still refused with 401); a policy file truncated to
//! 0 bytes keeps the policy for the grace period (reported), and only then is the removal applied.

use std::time::{Duration, Instant};

use http::StatusCode;
use mesh_core::hbone::HboneError;
use mesh_tests::greeting_echo_app;
use mesh_tests::lab::{self, Lab, http_get};
use mesh_tests::peer::{Peer, demo_id, log_line, log_matching, logs};

const BASE: u8 = 82;

/// The ALLOW policy admitting only `admin` to the servers, with its `from` entry as written.
fn policy(from: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: admin-only, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  rules:\n  - from:\n    - {from}\n"
    )
}

const GOOD: &str = "source: {principals: [cluster.local/ns/demo/sa/admin]}";

/// A counter of istiod-lite's metrics (the lab serves them on 16014).
async fn istiod_metric(name: &str) -> u64 {
    let (_, text) = http_get(format!("127.{BASE}.0.1:16014").parse().unwrap(), "/metrics")
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

async fn until(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typos_keep_the_last_good_policy_and_a_truncated_file_is_held_for_the_grace_period() {
    logs();
    let lab = Lab::start(BASE, &lab::demo_manifests(BASE), &["node-1", "node-2"])
        .await
        .unwrap();
    let _app = greeting_echo_app(&format!("127.{BASE}.2.1:8080"), "one").await;
    let peer = Peer::new(&lab, demo_id("client")).unwrap();
    let server = demo_id("server");
    let (listener, target) = (format!("127.{BASE}.2.1:15008"), format!("127.{BASE}.2.1:8080"));
    let call = async || peer.exchange(&listener, &server, &target).await;
    let refused = |result: Result<Vec<u8>, HboneError>| matches!(result, Err(HboneError::Status { status, .. }) if status == StatusCode::UNAUTHORIZED);
    assert_eq!(call().await.unwrap(), b"one!", "served before any policy");
    lab.write_config("policy.yaml", &policy(GOOD)).unwrap();
    until("the policy refuses the client", async || refused(call().await)).await;

    for (from, field) in [
        (
            "source: {principal: [cluster.local/ns/demo/sa/admin]}",
            "field spec.rules[0].from[0].source.principal: unknown field `principal`",
        ),
        (
            "source: {principals: []}",
            "field spec.rules[0].from[0].source.principals: written empty",
        ),
        (
            "sources: {principals: [cluster.local/ns/demo/sa/admin]}",
            "field spec.rules[0].from[0].sources: unknown field `sources`",
        ),
    ]
    .into_iter()
    .chain([("form", "field spec.rules[0].form: unknown field `form`")])
    {
        let yaml = match from {
            "form" => policy(GOOD).replace("- from:", "- form:"),
            from => policy(from),
        };
        let errors = istiod_metric("istiod_config_errors_total").await;
        lab.write_config("policy.yaml", &yaml).unwrap();
        until("the typo is rejected", async || {
            istiod_metric("istiod_config_errors_total").await > errors
        })
        .await;
        let line = log_matching(field, |line| {
            line["error"]
                .as_str()
                .is_some_and(|e| e.contains("AuthorizationPolicy/demo/admin-only") && e.contains(field))
        })
        .await;
        assert_eq!(
            line["message"],
            "configuration document rejected; the file's last good objects stay in force"
        );
        assert!(
            refused(call().await),
            "{from}: the last good policy still refuses the client"
        );
    }

    // Truncated to nothing: held (and said so) for the grace period, then applied.
    lab.write_config("policy.yaml", &policy(GOOD)).unwrap();
    let held = istiod_metric("istiod_config_held_total").await;
    std::fs::write(lab.path().join("config/policy.yaml"), "").unwrap();
    let truncated = Instant::now();
    until("the emptied file is noticed", async || {
        istiod_metric("istiod_config_held_total").await > held
    })
    .await;
    log_line(
        "its file is now empty: keeping it for the grace period (the file may still be being written); removed after it if still absent",
        &[("object", "AuthorizationPolicy/demo/admin-only")],
    )
    .await;
    assert!(refused(call().await), "held: still refused");
    until("the removal applies after the grace period", async || {
        call().await.is_ok()
    })
    .await;
    let after = truncated.elapsed();
    assert!(
        after >= Duration::from_millis(4_500),
        "applied after {after:?}, before the 5 s grace period"
    );
}
