//! ztunnel's CA client against istiod-lite's CA over gRPC: a certificate for a pod on this node,
//! a refusal (with the CA's reason) for one that is not.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use istiod_lite::auth::{Authenticators, NodeTokens};
use istiod_lite::ca::{CertificateService, Lifetimes, Placement, PodPlace};
use mesh_core::certificates::{CaClient, CertificateSource};
use mesh_core::identity::{Authority, SpiffeId};
use mesh_core::proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;

struct Pods(HashSet<(String, SpiffeId)>);

impl Placement for Pods {
    fn identity_runs_on_node(&self, identity: &SpiffeId, node: &str) -> bool {
        self.0.contains(&(node.to_owned(), identity.clone()))
    }

    fn pod(&self, _namespace: &str, _name: &str) -> Option<PodPlace> {
        None
    }
}

#[tokio::test]
async fn gets_certificates_for_its_pods_only() {
    let mine = SpiffeId::new("cluster.local", "demo", "client").unwrap();
    let elsewhere = SpiffeId::new("cluster.local", "demo", "server").unwrap();
    let authority = Arc::new(Authority::self_signed("cluster.local").unwrap());
    let tokens = NodeTokens::new([("node-1".to_owned(), "token-1".to_owned())]);
    let pods = Pods(HashSet::from([
        ("node-1".to_owned(), mine.clone()),
        ("node-2".to_owned(), elsewhere.clone()),
    ]));
    let service = CertificateService::new(
        authority.clone(),
        Authenticators::new(vec![Arc::new(tokens)]),
        pods,
        "cluster.local",
        Lifetimes::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_lazy();
    let client = CaClient::new(
        channel,
        Some("token-1".into()),
        authority.roots().clone(),
        Duration::from_secs(3600),
    )
    .unwrap();

    let certificate = client.fetch(&mine).await.unwrap();
    assert_eq!(certificate.identity(), &mine);
    let lifetime = certificate
        .not_after()
        .duration_since(certificate.not_before())
        .unwrap();
    assert!(
        lifetime >= Duration::from_secs(3600) && lifetime < Duration::from_secs(3600 + 600),
        "{lifetime:?}"
    );

    let error = client.fetch(&elsewhere).await.unwrap_err().to_string();
    assert!(
        error.contains("Unauthenticated") && error.contains("node node-1 runs no pod with service account demo/server"),
        "{error}"
    );
}
