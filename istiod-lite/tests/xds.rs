//! The delta xDS server with real tonic clients: full state first, then only deltas; removals;
//! ACK/NACK; initial versions; many clients at once.

use std::sync::Arc;
use std::time::Duration;

use istiod_lite::xds::{Metrics, Publisher, Resource, ResourceType, Server, TypeLabels};
use mesh_core::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use mesh_core::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_core::proto::envoy::config::core::v3::Node;
use mesh_core::proto::google::rpc::Status as RpcStatus;
use mesh_core::proto::workload::{Address, Workload, address};
use mesh_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, security};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

fn workload(uid: &str, name: &str) -> Resource {
    let address = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: "demo".into(),
            ..Default::default()
        })),
    };
    Resource::new(ADDRESS_TYPE_URL, uid, &address)
}

fn policy(name: &str) -> Resource {
    let policy = security::Authorization {
        name: name.into(),
        namespace: "demo".into(),
        ..Default::default()
    };
    Resource::new(AUTHORIZATION_TYPE_URL, format!("demo/{name}"), &policy)
}

async fn start(publisher: &Publisher) -> (Channel, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    let server = Server::new(publisher, metrics.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(server))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (
        Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        metrics,
    )
}

/// One ADS stream: requests go in through `send`, responses come out of `next`.
struct Client {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    async fn connect(channel: Channel) -> Self {
        let (requests, queue) = mpsc::channel(16);
        let responses = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(ReceiverStream::new(queue))
            .await
            .unwrap()
            .into_inner();
        Self { requests, responses }
    }

    async fn subscribe(&self, type_url: &str, initial: &[(&str, &str)]) {
        self.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "ztunnel~10.0.0.1~node1".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            initial_resource_versions: initial.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.requests.send(request).await.unwrap();
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.responses.next())
            .await
            .expect("a response within 5s")
            .expect("stream open")
            .unwrap()
    }

    async fn nothing_more(&mut self) {
        let more = tokio::time::timeout(Duration::from_millis(200), self.responses.next()).await;
        assert!(more.is_err(), "unexpected response: {more:?}");
    }
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn full_state_first_then_only_changes_and_removals() {
    let publisher = Publisher::new();
    publisher.publish([
        (
            ADDRESS_TYPE_URL.to_owned(),
            vec![workload("c//Pod/demo/a", "a"), workload("c//Pod/demo/b", "b")],
        ),
        (AUTHORIZATION_TYPE_URL.to_owned(), vec![policy("allow-client")]),
    ]);
    let (channel, metrics) = start(&publisher).await;
    let mut client = Client::connect(channel).await;

    client.subscribe(ADDRESS_TYPE_URL, &[]).await;
    let full = client.next().await;
    assert_eq!(full.type_url, ADDRESS_TYPE_URL);
    assert_eq!(names(&full), ["c//Pod/demo/a", "c//Pod/demo/b"]);
    let decoded: Address = prost::Message::decode(&*full.resources[0].resource.as_ref().unwrap().value).unwrap();
    let Some(address::Type::Workload(w)) = decoded.r#type else {
        panic!("not a workload")
    };
    assert_eq!(w.name, "a");
    client.ack(&full).await;

    client.subscribe(AUTHORIZATION_TYPE_URL, &[]).await;
    let policies = client.next().await;
    assert_eq!(names(&policies), ["demo/allow-client"]);
    client.ack(&policies).await;

    // b changes, c appears, a is republished unchanged: only b and c are sent.
    publisher.publish([(
        ADDRESS_TYPE_URL.to_owned(),
        vec![
            workload("c//Pod/demo/a", "a"),
            workload("c//Pod/demo/b", "b2"),
            workload("c//Pod/demo/c", "c"),
        ],
    )]);
    let delta = client.next().await;
    assert_eq!(names(&delta), ["c//Pod/demo/b", "c//Pod/demo/c"]);
    assert!(delta.removed_resources.is_empty());
    client.ack(&delta).await;

    // a goes away.
    publisher.publish([(
        ADDRESS_TYPE_URL.to_owned(),
        vec![workload("c//Pod/demo/b", "b2"), workload("c//Pod/demo/c", "c")],
    )]);
    let removal = client.next().await;
    assert!(removal.resources.is_empty());
    assert_eq!(removal.removed_resources, ["c//Pod/demo/a"]);
    client.ack(&removal).await;

    // Republishing the same state sends nothing.
    publisher.publish([(
        ADDRESS_TYPE_URL.to_owned(),
        vec![workload("c//Pod/demo/b", "b2"), workload("c//Pod/demo/c", "c")],
    )]);
    client.nothing_more().await;
    assert_eq!(metrics.clients.get(), 1);
}

#[tokio::test]
async fn nack_is_counted_and_initial_versions_are_not_resent() {
    let publisher = Publisher::new();
    let a = workload("c//Pod/demo/a", "a");
    publisher.publish([(
        ADDRESS_TYPE_URL.to_owned(),
        vec![a.clone(), workload("c//Pod/demo/b", "b")],
    )]);
    let (channel, metrics) = start(&publisher).await;

    let mut client = Client::connect(channel.clone()).await;
    // The client already holds a at its current version, and a stale d.
    client
        .subscribe(
            ADDRESS_TYPE_URL,
            &[("c//Pod/demo/a", &a.version), ("c//Pod/demo/d", "old")],
        )
        .await;
    let first = client.next().await;
    assert_eq!(names(&first), ["c//Pod/demo/b"]);
    assert_eq!(first.removed_resources, ["c//Pod/demo/d"]);

    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            response_nonce: first.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "bad workload".into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    client.nothing_more().await;
    let nacks = metrics
        .nacks
        .get_or_create(&TypeLabels {
            r#type: ResourceType::Address,
        })
        .get();
    assert_eq!(nacks, 1);
}

#[tokio::test]
async fn no_answer_before_the_first_translation_then_even_an_empty_state_is_answered() {
    let publisher = Publisher::new();
    let (channel, _) = start(&publisher).await;
    let mut client = Client::connect(channel).await;
    client.subscribe(AUTHORIZATION_TYPE_URL, &[]).await;
    // Nothing translated yet: an empty answer would claim that nothing exists.
    client.nothing_more().await;
    publisher.publish([(AUTHORIZATION_TYPE_URL.to_owned(), Vec::new())]);
    let first = client.next().await;
    assert!(first.resources.is_empty() && first.removed_resources.is_empty());
    assert_eq!(first.type_url, AUTHORIZATION_TYPE_URL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_clients_each_get_the_full_state_and_the_delta() {
    let publisher = Publisher::new();
    let workloads: Vec<Resource> = (0..50)
        .map(|i| workload(&format!("c//Pod/demo/p{i:02}"), "p"))
        .collect();
    publisher.publish([(ADDRESS_TYPE_URL.to_owned(), workloads.clone())]);
    let (channel, metrics) = start(&publisher).await;
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut client = Client::connect(channel.clone()).await;
        client.subscribe(ADDRESS_TYPE_URL, &[]).await;
        assert_eq!(client.next().await.resources.len(), 50);
        clients.push(client);
    }
    assert_eq!(metrics.clients.get(), 100);
    let mut changed = workloads;
    changed[7] = workload("c//Pod/demo/p07", "changed");
    publisher.publish([(ADDRESS_TYPE_URL.to_owned(), changed)]);
    for client in &mut clients {
        assert_eq!(names(&client.next().await), ["c//Pod/demo/p07"]);
    }
    drop(clients);
    tokio::time::timeout(Duration::from_secs(5), async {
        while metrics.clients.get() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("disconnected clients are no longer counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_costs_a_bounded_queue_and_catches_up_with_the_latest_state() {
    let publisher = Publisher::new();
    let generation = |g: usize| -> Vec<Resource> {
        (0..300)
            .map(|i| workload(&format!("c//Pod/demo/p{i:03}"), &format!("gen-{g}")))
            .collect()
    };
    publisher.publish([(ADDRESS_TYPE_URL.to_owned(), generation(0))]);
    let (channel, _) = start(&publisher).await;
    let mut stalled = Client::connect(channel.clone()).await;
    stalled.subscribe(ADDRESS_TYPE_URL, &[]).await;
    assert_eq!(stalled.next().await.resources.len(), 300);
    let mut reader = Client::connect(channel).await;
    reader.subscribe(ADDRESS_TYPE_URL, &[]).await;
    reader.next().await;

    // 1,000 full changes (~24 KB each) while `stalled` reads nothing; the reader keeps up.
    for g in 1..=1000 {
        publisher.publish([(ADDRESS_TYPE_URL.to_owned(), generation(g))]);
        if g % 250 == 0 {
            let mut latest = String::new();
            while !latest.contains(&format!("gen-{g}")) {
                let response = reader.next().await;
                let last = response.resources.last().unwrap().resource.as_ref().unwrap();
                latest = String::from_utf8_lossy(&last.value).into_owned();
            }
        }
    }
    // The stalled client now reads what was held for it: the HTTP/2 windows' worth (about 2 MiB
    // on tonic's defaults) plus the small queue, not 1,000 responses; it ends at the latest state.
    let mut received = 0;
    let mut last = String::new();
    while let Ok(Some(Ok(response))) = tokio::time::timeout(Duration::from_millis(500), stalled.responses.next()).await
    {
        received += 1;
        if let Some(resource) = response.resources.last() {
            last = String::from_utf8_lossy(&resource.resource.as_ref().unwrap().value).into_owned();
        }
    }
    assert!(received < 150, "{received} responses were held for a stalled client");
    assert!(last.contains("gen-1000"), "caught up with the latest state");
}

/// Finding: one anonymous client subscribing to 1.6 M names grew istiod by 240 MB.
#[tokio::test]
async fn a_client_subscribing_to_too_many_names_is_refused_with_resource_exhausted() {
    let publisher = Publisher::new();
    publisher.publish([(ADDRESS_TYPE_URL.to_owned(), vec![workload("uid-1", "one")])]);
    let (channel, _) = start(&publisher).await;

    // Up to the limit, split over two types and two requests, is served.
    let mut client = Client::connect(channel.clone()).await;
    let many = |prefix: &str, count: usize| (0..count).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            resource_names_subscribe: many("a", 60_000),
            ..Default::default()
        })
        .await;
    client.next().await;
    client
        .send(DeltaDiscoveryRequest {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            resource_names_subscribe: many("p", 40_000),
            ..Default::default()
        })
        .await;
    client.next().await;
    // One more name is past it: the stream ends with the status, naming the limit.
    client
        .send(DeltaDiscoveryRequest {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            resource_names_subscribe: vec!["one-too-many".into()],
            ..Default::default()
        })
        .await;
    let status = refusal(&mut client).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit of 100000"), "{}", status.message());

    // One request naming more than the limit at once, or as initial versions, is refused too.
    let mut client = Client::connect(channel.clone()).await;
    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            resource_names_subscribe: many("a", 100_001),
            ..Default::default()
        })
        .await;
    assert_eq!(refusal(&mut client).await.code(), tonic::Code::ResourceExhausted);
    let mut client = Client::connect(channel.clone()).await;
    client
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            initial_resource_versions: many("a", 100_001).into_iter().map(|n| (n, "1".into())).collect(),
            ..Default::default()
        })
        .await;
    assert_eq!(refusal(&mut client).await.code(), tonic::Code::ResourceExhausted);

    // A wildcard subscription names nothing and is still served.
    let mut client = Client::connect(channel).await;
    client.subscribe(ADDRESS_TYPE_URL, &[]).await;
    assert_eq!(names(&client.next().await), ["uid-1"]);
}

async fn refusal(client: &mut Client) -> tonic::Status {
    tokio::time::timeout(Duration::from_secs(5), client.responses.next())
        .await
        .expect("an answer within 5s")
        .expect("a status before the stream ends")
        .expect_err("a refusal, not a response")
}
