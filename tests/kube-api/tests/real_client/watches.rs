//! Watches and reflectors: events, bookmarks, selectors, relists after compaction and outages.

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::{reflector, watcher};
use kube_api_double::{ADMIN_TOKEN, ApiServer};
use serde_json::json;

use crate::{Reflector, WAIT, client, pod, synced};

#[tokio::test]
async fn watch_and_reflector_see_added_modified_deleted() {
    let api = ApiServer::start().await.unwrap();
    let client = client(&api, ADMIN_TOKEN).await;
    let pods: Api<Pod> = Api::all(client.clone());
    let mut raw = pods.watch(&WatchParams::default(), "0").await.unwrap().boxed();
    let reflector = Reflector::start(client);
    reflector.reader.wait_until_ready().await.unwrap();

    api.apply(pod("web", json!({"app": "web"})));
    assert!(api.wait_until(|_| reflector.names() == ["web"], WAIT).await);
    api.apply(pod("web", json!({"app": "web", "version": "v2"})));
    let relabelled = |_: &ApiServer| {
        let state = reflector.reader.state();
        state
            .iter()
            .any(|p| p.labels().get("version").map(String::as_str) == Some("v2"))
    };
    assert!(api.wait_until(relabelled, WAIT).await);
    assert!(api.delete("v1", "Pod", Some("apps"), "web"));
    assert!(api.wait_until(|_| reflector.names().is_empty(), WAIT).await);

    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(match raw.try_next().await.unwrap().unwrap() {
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Added(p) => format!("ADDED {} {}", p.name_any(), p.resource_version().unwrap()),
            WatchEvent::Modified(p) => format!("MODIFIED {} {}", p.name_any(), p.resource_version().unwrap()),
            WatchEvent::Deleted(p) => format!("DELETED {} {}", p.name_any(), p.resource_version().unwrap()),
            other => format!("{other:?}"),
        });
    }
    let first = api.resource_version() - 2;
    let expected = [
        format!("ADDED web {first}"),
        format!("MODIFIED web {}", first + 1),
        format!("DELETED web {}", first + 2),
    ];
    assert_eq!(seen, expected);
    let log = reflector.log.lock().unwrap().clone();
    assert_eq!(log, ["init", "init-done", "apply web", "apply web", "delete web"]);
}

#[tokio::test]
async fn after_compaction_the_watcher_relists_to_the_servers_state() {
    let api = ApiServer::start().await.unwrap();
    let client = client(&api, ADMIN_TOKEN).await;
    for name in ["a", "b", "c"] {
        api.apply(pod(name, json!({})));
    }
    let reflector = Reflector::start(client.clone());
    assert!(synced(&api, &reflector).await);
    let before = api.resource_version();

    api.compact();
    api.delete("v1", "Pod", Some("apps"), "a");
    api.apply(pod("d", json!({})));
    api.apply(pod("b", json!({"changed": "yes"})));
    assert!(api.wait_until(|_| reflector.count("init-done") == 2, WAIT).await);
    assert!(synced(&api, &reflector).await);
    assert_eq!(
        reflector.reader.state().len(),
        3,
        "no duplicates: {:?}",
        reflector.names()
    );
    let b = reflector
        .reader
        .get(&reflector::ObjectRef::new("b").within("apps"))
        .unwrap();
    assert_eq!(b.labels()["changed"], "yes");
    let log = reflector.log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l.contains("too old resource version")), "{log:?}");

    // A new watch from before the compaction is refused the way the API server refuses it.
    let pods: Api<Pod> = Api::all(client);
    let stale_version = before - 1;
    let mut stale = pods
        .watch(&WatchParams::default(), &stale_version.to_string())
        .await
        .unwrap()
        .boxed();
    match stale.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert_eq!(
                status.message,
                format!("too old resource version: {stale_version} ({before})")
            );
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        stale.try_next().await.unwrap().is_none(),
        "the stream ends after the ERROR"
    );
}

#[tokio::test]
async fn the_watcher_recovers_from_an_outage_with_what_changed_meanwhile() {
    let mut api = ApiServer::start().await.unwrap();
    let client = client(&api, ADMIN_TOKEN).await;
    api.apply(pod("before", json!({})));
    let reflector = Reflector::start(client.clone());
    assert!(synced(&api, &reflector).await);
    assert!(api.wait_until(|api| api.open_watches() == 1, WAIT).await);

    api.stop().await;
    assert_eq!(api.open_watches(), 0, "the watch connection went with the server");
    let refused = Api::<Pod>::all(client.clone()).list(&ListParams::default()).await;
    assert!(
        matches!(refused, Err(kube::Error::HyperError(_) | kube::Error::Service(_))),
        "{refused:?}"
    );
    api.apply(pod("during", json!({})));
    api.delete("v1", "Pod", Some("apps"), "before");
    api.restart().await.unwrap();

    assert!(synced(&api, &reflector).await, "reflector has {:?}", reflector.names());
    assert_eq!(reflector.names(), ["during"]);
    let pods = Api::<Pod>::all(client).list(&ListParams::default()).await.unwrap();
    assert_eq!(pods.items.len(), 1);
}

#[tokio::test]
async fn bookmarks_come_on_demand_and_the_watch_ends_at_its_timeout() {
    let api = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::all(client(&api, ADMIN_TOKEN).await);
    let from = api.resource_version().to_string();
    let mut watch = pods
        .watch(&WatchParams::default().timeout(2), &from)
        .await
        .unwrap()
        .boxed();
    assert!(api.wait_until(|api| api.open_watches() == 1, WAIT).await);

    api.apply(pod("web", json!({})));
    match watch.try_next().await.unwrap() {
        Some(WatchEvent::Added(pod)) => assert_eq!(pod.name_any(), "web"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    api.bookmark();
    match watch.try_next().await.unwrap() {
        Some(WatchEvent::Bookmark(bookmark)) => {
            assert_eq!(bookmark.metadata.resource_version, api.resource_version().to_string());
            assert_eq!(
                (bookmark.types.kind.as_str(), bookmark.types.api_version.as_str()),
                ("Pod", "v1")
            );
        }
        other => panic!("expected a BOOKMARK, got {other:?}"),
    }
    let started = tokio::time::Instant::now();
    let mut periodic = 0;
    while let Some(event) = watch.try_next().await.unwrap() {
        assert!(matches!(event, WatchEvent::Bookmark(_)), "{event:?}");
        periodic += 1;
    }
    assert!(periodic >= 1, "a bookmark a second while the watch is open");
    assert!(
        started.elapsed() < WAIT,
        "the server closed the watch at timeoutSeconds"
    );
    assert!(api.wait_until(|api| api.open_watches() == 0, WAIT).await);
}

#[tokio::test]
async fn a_selected_watch_sees_objects_enter_and_leave_its_selection() {
    let api = ApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&api, ADMIN_TOKEN).await, "apps");
    api.apply(pod("web", json!({"app": "db"})));
    let selected = WatchParams::default().labels("app=web").disable_bookmarks();
    let mut watch = pods.watch(&selected, "0").await.unwrap().boxed();
    assert!(api.wait_until(|api| api.open_watches() == 1, WAIT).await);

    api.apply(pod("web", json!({"app": "web"})));
    api.apply(pod("web", json!({"app": "web", "v": "2"})));
    api.apply(pod("web", json!({"app": "db"})));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(match watch.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(p) => format!("ADDED {:?}", p.labels().get("v")),
            WatchEvent::Modified(p) => format!("MODIFIED {:?}", p.labels().get("v")),
            WatchEvent::Deleted(p) => format!("DELETED {:?}", p.labels().get("v")),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(seen, ["ADDED None", "MODIFIED Some(\"2\")", "DELETED Some(\"2\")"]);
    let listed = pods.list(&ListParams::default().labels("app=db")).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(
        pods.list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let by_field = pods
        .list(&ListParams::default().fields("metadata.name=web"))
        .await
        .unwrap();
    assert_eq!(by_field.items.len(), 1);
}

#[tokio::test]
async fn a_streaming_list_reflector_syncs_from_the_initial_events() {
    let api = ApiServer::start().await.unwrap();
    api.apply(pod("a", json!({})));
    api.apply(pod("b", json!({})));
    let reflector = Reflector::with_config(
        client(&api, ADMIN_TOKEN).await,
        watcher::Config::default().streaming_lists(),
    );
    assert!(synced(&api, &reflector).await);
    api.apply(pod("c", json!({})));
    assert!(synced(&api, &reflector).await);
    let log = reflector.log.lock().unwrap().clone();
    assert_eq!(log, ["init", "init-apply a", "init-apply b", "init-done", "apply c"]);
    let c = reflector.reader.get(&reflector::ObjectRef::new("c").within("apps"));
    assert!(c.is_some());
}
