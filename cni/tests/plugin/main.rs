//! `mesh-cni` run as a container runtime runs it (env vars, netconf on stdin, stdout and exit code
//! read back), against the real `mesh-node-agent` binary and a ZDS client standing in for
//! ztunnel, in network namespaces of the tests' own.

mod kubernetes;
mod support;
mod zds;
mod ztunnel;

use std::time::Duration;

use serde_json::json;
use support::{Agent, Invocation, MANIFESTS, PodNetns, TempDir, privileged};
use ztunnel::Ztunnel;

pub(crate) fn add(pod: &PodNetns, agent: &Agent, name: &str, uid: &str) -> Invocation {
    Invocation::pod("ADD", &pod.path, "demo", name, uid, agent.netconf())
}

#[tokio::test]
async fn add_returns_only_once_the_rules_are_in_and_ztunnel_acked() {
    if !privileged("add_returns_only_once_the_rules_are_in_and_ztunnel_acked") {
        return;
    }
    let pod = PodNetns::new();
    let agent = Agent::start(MANIFESTS, &["--ack-timeout", "20s"]).await;
    let ztunnel = Ztunnel::connect(&agent.zds_socket).await;
    assert!(ztunnel.snapshot().await.is_empty(), "nothing held yet");

    let mut plugin = add(&pod, &agent, "client", "uid-client").spawn().await;
    let (uid, info, fd) = ztunnel.expect_add().await;
    assert_eq!(uid, "uid-client", "the uid is K8S_POD_UID");
    assert_eq!(
        (
            info.name.as_str(),
            info.namespace.as_str(),
            info.service_account.as_str()
        ),
        ("client", "demo", "client")
    );
    assert!(pod.is(fd), "the descriptor is the pod's network namespace");
    assert!(pod.captured(), "the rules are in before ztunnel is asked");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(plugin.try_wait().unwrap().is_none(), "ADD waits for ztunnel's ack");

    ztunnel.ack(None).await;
    let ran = support::Ran::from(plugin.wait_with_output().await.unwrap());
    ran.assert_passed_through();
    assert!(pod.captured());
}

#[tokio::test]
async fn add_without_ztunnel_fails_and_leaves_no_rules() {
    if !privileged("add_without_ztunnel_fails_and_leaves_no_rules") {
        return;
    }
    let pod = PodNetns::new();
    let agent = Agent::start(MANIFESTS, &[]).await;
    let ran = add(&pod, &agent, "client", "uid-client").run().await;
    let expected = format!(
        "ztunnel is not connected to the node agent (ZDS socket {})",
        agent.zds_socket.display()
    );
    ran.assert_error(11, &expected);
    assert!(!pod.captured(), "no rules left behind");
}

#[tokio::test]
async fn del_removes_the_rules_and_tells_ztunnel() {
    if !privileged("del_removes_the_rules_and_tells_ztunnel") {
        return;
    }
    let pod = PodNetns::new();
    let agent = Agent::start(MANIFESTS, &[]).await;
    let ztunnel = Ztunnel::connect(&agent.zds_socket).await;
    ztunnel.snapshot().await;
    let plugin = add(&pod, &agent, "server", "uid-server").spawn().await;
    ztunnel.expect_add().await;
    ztunnel.ack(None).await;
    support::Ran::from(plugin.wait_with_output().await.unwrap()).assert_passed_through();

    let del = Invocation::pod("DEL", &pod.path, "demo", "server", "uid-server", agent.netconf());
    let plugin = del.spawn().await;
    assert_eq!(ztunnel.expect_del().await, "uid-server");
    ztunnel.ack(None).await;
    let ran = support::Ran::from(plugin.wait_with_output().await.unwrap());
    assert_eq!((ran.code, ran.stdout.as_str()), (0, ""), "{ran:?}");
    assert!(!pod.captured(), "DEL removes the rules");

    let ran = del.run().await;
    assert_eq!(ran.code, 0, "DEL of a pod the agent no longer holds succeeds: {ran:?}");
    let ran = del.clone().set("CNI_NETNS", None).run().await;
    assert_eq!(ran.code, 0, "DEL without CNI_NETNS succeeds: {ran:?}");
    let again = Ztunnel::connect(&agent.zds_socket).await;
    assert!(again.snapshot().await.is_empty(), "the pod is forgotten");
}

#[tokio::test]
async fn check_reports_a_missing_table() {
    if !privileged("check_reports_a_missing_table") {
        return;
    }
    let pod = PodNetns::new();
    let agent = Agent::start(MANIFESTS, &[]).await;
    let ztunnel = Ztunnel::connect(&agent.zds_socket).await;
    ztunnel.snapshot().await;
    let plugin = add(&pod, &agent, "client", "uid-client").spawn().await;
    ztunnel.expect_add().await;
    ztunnel.ack(None).await;
    support::Ran::from(plugin.wait_with_output().await.unwrap()).assert_passed_through();

    let check = Invocation::pod("CHECK", &pod.path, "demo", "client", "uid-client", agent.netconf());
    let ran = check.run().await;
    assert_eq!((ran.code, ran.stdout.as_str()), (0, ""), "{ran:?}");

    mesh_core::capture::remove(&mesh_core::netns::NetNs::open(&pod.path).unwrap()).unwrap();
    let ran = check.run().await;
    ran.assert_error(
        105,
        &format!(
            "CNI_NETNS={}: the capture rules (nftables table inet ztunnel) of pod demo/client are missing",
            pod.path.display()
        ),
    );

    let other = PodNetns::new();
    let ran = Invocation::pod("CHECK", &other.path, "legacy", "old", "uid-old", agent.netconf())
        .run()
        .await;
    assert_eq!(ran.code, 0, "a pod that is not ambient checks out: {ran:?}");
}

#[tokio::test]
async fn bad_input_is_a_cni_error_naming_the_field_and_installs_nothing() {
    if !privileged("bad_input_is_a_cni_error_naming_the_field_and_installs_nothing") {
        return;
    }
    let pod = PodNetns::new();
    let agent = Agent::start(MANIFESTS, &[]).await;
    let ztunnel = Ztunnel::connect(&agent.zds_socket).await;
    ztunnel.snapshot().await;
    let good = add(&pod, &agent, "client", "uid-client");
    let not_a_netns = agent.dir.0.join("not-a-netns");
    std::fs::write(&not_a_netns, "").unwrap();
    let without_prev = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
                              "agentSocket": agent.cni_socket});
    let cases = [
        (
            Invocation {
                stdin: "{\"cniVersion\":".into(),
                ..good.clone()
            },
            6,
            "the netconf on stdin is not JSON",
        ),
        (
            Invocation {
                stdin: without_prev.to_string(),
                ..good.clone()
            },
            7,
            "netconf field prevResult is missing",
        ),
        (good.clone().set("CNI_NETNS", None), 4, "CNI_NETNS not set"),
        (
            good.clone()
                .set("CNI_NETNS", Some("/var/run/netns/mcni-does-not-exist")),
            4,
            "CNI_NETNS=/var/run/netns/mcni-does-not-exist: ",
        ),
        (
            good.clone().set("CNI_NETNS", not_a_netns.to_str()),
            4,
            "cannot open it as a network namespace",
        ),
        (
            good.clone()
                .set("CNI_ARGS", Some("K8S_POD_NAMESPACE=demo;K8S_POD_NAME")),
            4,
            "CNI_ARGS=\"K8S_POD_NAMESPACE=demo;K8S_POD_NAME\"",
        ),
        (
            add(&pod, &agent, "ghost", "uid-ghost"),
            101,
            "K8S_POD_NAME=ghost: no Pod demo/ghost in --config-dir ",
        ),
        (good.clone().set("CNI_IFNAME", None), 4, "CNI_IFNAME not set"),
    ];
    for (invocation, code, text) in cases {
        invocation.run().await.assert_error(code, text);
        assert!(!pod.captured(), "nothing installed for {text:?}");
    }

    // Nothing reached ztunnel either: the next request it sees is the good ADD's.
    let plugin = good.spawn().await;
    let (uid, _, _) = ztunnel.expect_add().await;
    assert_eq!(uid, "uid-client");
    ztunnel.ack(None).await;
    support::Ran::from(plugin.wait_with_output().await.unwrap()).assert_passed_through();
}

#[tokio::test]
async fn pods_outside_the_mesh_pass_through_untouched() {
    if !privileged("pods_outside_the_mesh_pass_through_untouched") {
        return;
    }
    let pod = PodNetns::new();
    let agent = Agent::start(MANIFESTS, &[]).await;
    let ztunnel = Ztunnel::connect(&agent.zds_socket).await;
    ztunnel.snapshot().await;
    let outside = [
        ("legacy", "old"),      // namespace not ambient
        ("demo", "waypoint"),   // istio.io/dataplane-mode=none
        ("kube-system", "dns"), // an excluded namespace (not even looked up)
    ];
    for (namespace, name) in outside {
        let ran = Invocation::pod("ADD", &pod.path, namespace, name, "uid-x", agent.netconf())
            .run()
            .await;
        ran.assert_passed_through();
        assert!(!pod.captured(), "{namespace}/{name} not captured");
    }
    let ran = add(&pod, &agent, "client", "uid-client")
        .set("CNI_ARGS", Some("IgnoreUnknown=1"))
        .run()
        .await;
    ran.assert_passed_through();
    assert!(ran.stderr.contains("names no Kubernetes pod"), "{ran:?}");

    let plugin = add(&pod, &agent, "client", "uid-client").spawn().await;
    assert_eq!(ztunnel.expect_add().await.0, "uid-client", "nothing was sent before");
    ztunnel.ack(None).await;
    support::Ran::from(plugin.wait_with_output().await.unwrap()).assert_passed_through();
}

#[tokio::test]
async fn without_the_agent_add_fails_and_del_succeeds() {
    let dir = TempDir::new("no-agent");
    let netns = dir.0.join("netns");
    std::fs::write(&netns, "").unwrap();
    let socket = dir.0.join("agent.sock");
    let add = Invocation::pod("ADD", &netns, "demo", "client", "uid-client", support::netconf(&socket));
    let expected = format!("cannot reach the mesh node agent at {}: ", socket.display());
    add.run().await.assert_error(11, &expected);

    let mut agent = Agent::start(MANIFESTS, &[]).await;
    let add = Invocation {
        stdin: agent.netconf(),
        ..add
    };
    agent.stop().await;
    let expected = format!("cannot reach the mesh node agent at {}: ", agent.cni_socket.display());
    add.run().await.assert_error(11, &expected);

    let del = add.clone().set("CNI_COMMAND", Some("DEL")).run().await;
    assert_eq!(del.code, 0, "DEL succeeds when the agent holds nothing: {del:?}");
    assert!(del.stderr.contains("cannot reach the mesh node agent"), "{del:?}");
}

#[test]
fn the_agent_refuses_a_bad_start_with_a_clear_message() {
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-node-agent"))
            .args(args)
            .env_clear()
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("<--config-dir <DIR>|--kubernetes>"), "{stderr}");
    let (code, stderr) = run(&["--config-dir", "/nonexistent/mesh-cni"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr.lines().next(),
        Some("Error: --config-dir /nonexistent/mesh-cni: not a directory")
    );
    let (code, stderr) = run(&["--kubernetes", "--ack-timeout", "soon"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--ack-timeout <ACK_TIMEOUT>"), "{stderr}");
}

#[tokio::test]
async fn version_answers_the_spec_versions() {
    let ran = Invocation {
        env: vec![("CNI_COMMAND".into(), "VERSION".into())],
        stdin: r#"{"cniVersion":"1.0.0"}"#.into(),
    }
    .run()
    .await;
    assert_eq!(ran.code, 0, "{ran:?}");
    let answer: serde_json::Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(
        answer,
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );

    let ran = Invocation {
        env: vec![("CNI_COMMAND".into(), "ADD".into())],
        stdin: r#"{"cniVersion":"0.2.0","name":"n","type":"mesh-cni"}"#.into(),
    }
    .run()
    .await;
    ran.assert_error(1, "cniVersion=\"0.2.0\"");
}
