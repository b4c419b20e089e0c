//! mesh-core's delta xDS client against istiod-lite's server: full state, deltas, NACK with the
//! reason, readiness, and a controller restart during which the client keeps its state and after
//! which it re-subscribes with its versions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use istiod_lite::xds::{Publisher, Resource, ResourceType, TypeLabels};
use mesh_core::admin::Readiness;
use mesh_core::proto::envoy::config::core::v3::Node;
use mesh_core::proto::workload::{Address, Workload, address};
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_core::xds::{Backoff, Client, Handler, Rejection, Server, Update};
use mesh_tests::Controller;
use prost::Message;

/// Keeps workload names by resource name; refuses workloads named "bad".
#[derive(Clone, Default)]
struct Workloads(Arc<Mutex<BTreeMap<String, String>>>);

impl Handler for Workloads {
    fn apply(&mut self, type_url: &str, updates: Vec<Update>, removed: Vec<String>) -> Vec<Rejection> {
        if type_url != ADDRESS_TYPE_URL {
            return Vec::new();
        }
        let mut state = self.0.lock().unwrap();
        let mut rejected = Vec::new();
        for update in updates {
            let Ok(Address {
                r#type: Some(address::Type::Workload(workload)),
            }) = Address::decode(&*update.resource.value)
            else {
                rejected.push(Rejection {
                    name: update.name,
                    reason: "not a workload".into(),
                });
                continue;
            };
            if workload.name == "bad" {
                rejected.push(Rejection {
                    name: update.name,
                    reason: "workload is bad".into(),
                });
                continue;
            }
            state.insert(update.name, workload.name);
        }
        for name in removed {
            state.remove(&name);
        }
        rejected
    }
}

impl Workloads {
    fn snapshot(&self) -> BTreeMap<String, String> {
        self.0.lock().unwrap().clone()
    }

    async fn wait_for(&self, expected: &[(&str, &str)]) {
        let expected: BTreeMap<String, String> = expected.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.snapshot() != expected {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("state {:?}, expected {expected:?}", self.snapshot()));
    }
}

fn workload(uid: &str, name: &str) -> Resource {
    let address = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.into(),
            name: name.into(),
            ..Default::default()
        })),
    };
    Resource::new(ADDRESS_TYPE_URL, uid, &address)
}

fn publish(publisher: &Publisher, workloads: &[(&str, &str)]) {
    let resources = workloads.iter().map(|(uid, name)| workload(uid, name)).collect();
    publisher.publish([
        (ADDRESS_TYPE_URL.to_owned(), resources),
        (AUTHORIZATION_TYPE_URL.to_owned(), Vec::new()),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_controller_nacks_bad_resources_and_survives_a_restart() {
    let publisher = Publisher::new();
    publish(&publisher, &[("a", "alpha"), ("b", "beta")]);
    let controller = Controller::start("127.0.0.1:0".parse().unwrap(), &publisher).unwrap();
    let address = controller.address;

    let state = Workloads::default();
    let readiness = Readiness::new();
    let node = Node {
        id: "ztunnel~127.0.0.1~node-1".into(),
        ..Default::default()
    };
    let backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    let client = Client::new(
        Server::plaintext(&address.to_string()).unwrap(),
        node,
        &[ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL],
        backoff,
        state.clone(),
    );
    let running = tokio::spawn(client.run(Some(readiness.register("xds"))));

    state.wait_for(&[("a", "alpha"), ("b", "beta")]).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while !readiness.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("ready once both types answered");

    // A bad resource is NACKed with its reason; the good change in the same response applies.
    publish(&publisher, &[("a", "alpha2"), ("b", "beta"), ("x", "bad")]);
    state.wait_for(&[("a", "alpha2"), ("b", "beta")]).await;
    let nacks = || {
        controller
            .metrics
            .nacks
            .get_or_create(&TypeLabels {
                r#type: ResourceType::Address,
            })
            .get()
    };
    tokio::time::timeout(Duration::from_secs(5), async {
        while nacks() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("one NACK");

    // The controller dies; the client keeps serving its last state.
    drop(controller);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state.snapshot().len(), 2, "state kept while the controller is away");

    // Meanwhile b is removed and c added; the restarted controller on the same address sends
    // exactly that to the re-subscribing client (which declared the versions it holds).
    publish(&publisher, &[("a", "alpha2"), ("c", "gamma")]);
    let restarted = Controller::start(address, &publisher).unwrap();
    state.wait_for(&[("a", "alpha2"), ("c", "gamma")]).await;
    let pushes = restarted
        .metrics
        .pushes
        .get_or_create(&TypeLabels {
            r#type: ResourceType::Address,
        })
        .get();
    assert_eq!(pushes, 1, "one delta after reconnecting");
    running.abort();
}
