//! The ztunnel side of ZDS: refusals and silence, reconnects and upgrades (snapshots), and an
//! agent restart that keeps every pod held.

use crate::add;
use crate::support::{self, Agent, Invocation, MANIFESTS, PodNetns, privileged};
use crate::ztunnel::Ztunnel;

#[tokio::test]
async fn a_refusing_or_silent_ztunnel_fails_add_and_the_rules_go() {
    if !privileged("a_refusing_or_silent_ztunnel_fails_add_and_the_rules_go") {
        return;
    }
    let pod = PodNetns::new();
    let agent = Agent::start(MANIFESTS, &["--ack-timeout", "1s"]).await;
    let ztunnel = Ztunnel::connect(&agent.zds_socket).await;
    ztunnel.snapshot().await;

    let plugin = add(&pod, &agent, "client", "uid-client").spawn().await;
    ztunnel.expect_add().await;
    assert!(pod.captured());
    ztunnel.ack(Some("no room for pod demo/client")).await;
    let ran = support::Ran::from(plugin.wait_with_output().await.unwrap());
    ran.assert_error(
        103,
        "ztunnel refused AddWorkload for pod demo/client (uid uid-client): no room for pod demo/client",
    );
    assert!(!pod.captured(), "the rules are removed again");

    // No answer at all: the timeout fails ADD, and the silent ztunnel is disconnected.
    let plugin = add(&pod, &agent, "client", "uid-client").spawn().await;
    ztunnel.expect_add().await;
    let ran = support::Ran::from(plugin.wait_with_output().await.unwrap());
    ran.assert_error(
        103,
        "ztunnel did not acknowledge AddWorkload for pod demo/client (uid uid-client) within 1s",
    );
    assert!(!pod.captured());
    assert!(ztunnel.closed().await, "a ztunnel that does not answer is disconnected");

    let again = Ztunnel::connect(&agent.zds_socket).await;
    assert!(again.snapshot().await.is_empty(), "a pod that failed ADD is not held");
}

#[tokio::test]
async fn a_reconnecting_ztunnel_gets_every_held_pod() {
    if !privileged("a_reconnecting_ztunnel_gets_every_held_pod") {
        return;
    }
    let (client, server) = (PodNetns::new(), PodNetns::new());
    let agent = Agent::start(MANIFESTS, &[]).await;
    let first = Ztunnel::connect(&agent.zds_socket).await;
    first.snapshot().await;
    for (pod, name) in [(&client, "client"), (&server, "server")] {
        let plugin = add(pod, &agent, name, &format!("uid-{name}")).spawn().await;
        first.expect_add().await;
        first.ack(None).await;
        support::Ran::from(plugin.wait_with_output().await.unwrap()).assert_passed_through();
    }

    // ztunnel restarts: the pods stay captured meanwhile, and the new one gets them all.
    drop(first);
    assert!(
        client.captured() && server.captured(),
        "fail closed while no ztunnel runs"
    );
    let second = Ztunnel::connect(&agent.zds_socket).await;
    let snapshot = second.snapshot().await;
    let uids: Vec<&str> = snapshot.iter().map(|(uid, _)| uid.as_str()).collect();
    assert_eq!(uids, ["uid-client", "uid-server"]);
    let mut fds = snapshot.into_iter().map(|(_, fd)| fd);
    assert!(
        client.is(fds.next().unwrap()) && server.is(fds.next().unwrap()),
        "each with its netns"
    );

    // An upgrade: a third ztunnel gets the snapshot and the new pods; the second keeps what it
    // has and still hears of deletions.
    let third = Ztunnel::connect(&agent.zds_socket).await;
    assert_eq!(third.snapshot().await.len(), 2);
    let late = PodNetns::new();
    let ran = Invocation::pod("ADD", &late.path, "demo", "client", "uid-late", agent.netconf())
        .set("CNI_CONTAINERID", Some("sandbox-late"))
        .spawn()
        .await;
    let (uid, _, fd) = third.expect_add().await;
    assert!(uid == "uid-late" && late.is(fd));
    third.ack(None).await;
    support::Ran::from(ran.wait_with_output().await.unwrap()).assert_passed_through();
    let del = Invocation::pod("DEL", &server.path, "demo", "server", "uid-server", agent.netconf())
        .spawn()
        .await;
    for ztunnel in [&second, &third] {
        assert_eq!(ztunnel.expect_del().await, "uid-server");
        ztunnel.ack(None).await;
    }
    assert_eq!(del.wait_with_output().await.unwrap().status.code(), Some(0));
}

#[tokio::test]
async fn a_restarted_agent_still_holds_its_pods() {
    if !privileged("a_restarted_agent_still_holds_its_pods") {
        return;
    }
    let (client, server) = (PodNetns::new(), PodNetns::new());
    let mut agent = Agent::start(MANIFESTS, &[]).await;
    let ztunnel = Ztunnel::connect(&agent.zds_socket).await;
    ztunnel.snapshot().await;
    for (pod, name) in [(&client, "client"), (&server, "server")] {
        let plugin = add(pod, &agent, name, &format!("uid-{name}")).spawn().await;
        ztunnel.expect_add().await;
        ztunnel.ack(None).await;
        support::Ran::from(plugin.wait_with_output().await.unwrap()).assert_passed_through();
    }

    // The agent dies; meanwhile the server pod goes away. The client stays captured throughout.
    agent.stop().await;
    assert!(ztunnel.closed().await, "ztunnel sees the agent go");
    drop(server);
    assert!(client.captured());
    agent.restart().await;
    let ztunnel = Ztunnel::connect(&agent.zds_socket).await;
    let snapshot = ztunnel.snapshot().await;
    assert_eq!(snapshot.len(), 1, "only the pod whose namespace is still there");
    let (uid, fd) = snapshot.into_iter().next().unwrap();
    assert!(uid == "uid-client" && client.is(fd));

    let del = Invocation::pod("DEL", &client.path, "demo", "client", "uid-client", agent.netconf())
        .spawn()
        .await;
    assert_eq!(
        ztunnel.expect_del().await,
        "uid-client",
        "the restarted agent knows the pod"
    );
    ztunnel.ack(None).await;
    assert_eq!(del.wait_with_output().await.unwrap().status.code(), Some(0));
    assert!(!client.captured());
}
