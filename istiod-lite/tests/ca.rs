//! The CA over real gRPC: a node gets certificates for the pods it runs, and each kind of bad
//! request is refused with a status that says why.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use istiod_lite::auth::{Authenticators, NodeTokens};
use istiod_lite::ca::{CertificateService, IMPERSONATED_IDENTITY, Lifetimes, Placement, PodPlace};
use mesh_core::identity::{Authority, CertificateRequest, SpiffeId};
use mesh_core::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_core::proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use mesh_core::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use prost_types::{Struct, Value, value::Kind};
use tonic::Code;
use tonic::transport::Channel;

struct Pods(HashSet<(String, SpiffeId)>);

impl Placement for Pods {
    fn identity_runs_on_node(&self, identity: &SpiffeId, node: &str) -> bool {
        self.0.contains(&(node.to_owned(), identity.clone()))
    }

    fn pod(&self, _namespace: &str, _name: &str) -> Option<PodPlace> {
        None
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

async fn start() -> (IstioCertificateServiceClient<Channel>, Arc<Authority>) {
    let authority = Arc::new(Authority::self_signed("cluster.local").unwrap());
    let tokens = NodeTokens::new([
        ("node1".to_owned(), "token-1".to_owned()),
        ("node2".to_owned(), "token-2".to_owned()),
    ]);
    let pods = Pods(HashSet::from([
        ("node1".to_owned(), id("demo", "client")),
        ("node2".to_owned(), id("demo", "server")),
    ]));
    let lifetimes = Lifetimes {
        default: Duration::from_secs(24 * 3600),
        max: Duration::from_secs(48 * 3600),
    };
    let service = CertificateService::new(
        authority.clone(),
        Authenticators::new(vec![Arc::new(tokens)]),
        pods,
        "cluster.local",
        lifetimes,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(service))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (IstioCertificateServiceClient::new(channel), authority)
}

fn request(
    csr: &str,
    identity: Option<&str>,
    token: Option<&str>,
    validity: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let metadata = identity.map(|identity| Struct {
        fields: BTreeMap::from([(
            IMPERSONATED_IDENTITY.to_owned(),
            Value {
                kind: Some(Kind::StringValue(identity.to_owned())),
            },
        )]),
    });
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: validity,
        metadata,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

async fn ask(
    client: &mut IstioCertificateServiceClient<Channel>,
    request: tonic::Request<IstioCertificateRequest>,
) -> Result<IstioCertificateResponse, tonic::Status> {
    client
        .create_certificate(request)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_node_gets_the_identity_of_a_pod_it_runs() {
    let (mut client, authority) = start().await;
    let identity = id("demo", "client");
    let csr = CertificateRequest::new(&identity).unwrap();
    let response = ask(
        &mut client,
        request(&csr.csr_pem, Some(&identity.to_string()), Some("token-1"), 0),
    )
    .await
    .unwrap();
    assert_eq!(response.cert_chain.len(), 2, "leaf then root");
    assert_eq!(
        response.root_cert.unwrap().ca_cert,
        vec![authority.pem().root_cert.clone()]
    );
    let cert = csr
        .into_certificate(&response.cert_chain, authority.roots().clone())
        .unwrap();
    assert_eq!(cert.identity(), &identity);
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    // 24 h by default, plus the few minutes the CA backdates for clock skew.
    assert!(
        lifetime >= Duration::from_secs(24 * 3600) && lifetime < Duration::from_secs(24 * 3600 + 600),
        "{lifetime:?}"
    );
}

#[tokio::test]
async fn each_bad_request_is_refused_with_its_reason() {
    let (mut client, _) = start().await;
    let client_id = id("demo", "client").to_string();
    let csr = CertificateRequest::new(&id("demo", "client")).unwrap().csr_pem;
    let cases: Vec<(&str, tonic::Request<IstioCertificateRequest>, Code, &str)> = vec![
        (
            "no token",
            request(&csr, Some(&client_id), None, 0),
            Code::Unauthenticated,
            "missing `authorization",
        ),
        (
            "unknown token",
            request(&csr, Some(&client_id), Some("guess"), 0),
            Code::Unauthenticated,
            "not a known node token",
        ),
        (
            "someone else's identity",
            request(&csr, Some(&id("demo", "server").to_string()), Some("token-1"), 0),
            Code::Unauthenticated,
            "node node1 runs no pod with service account demo/server",
        ),
        (
            "another trust domain",
            request(
                &csr,
                Some("spiffe://evil.example/ns/demo/sa/client"),
                Some("token-1"),
                0,
            ),
            Code::Unauthenticated,
            "outside this mesh's trust domain",
        ),
        (
            "no impersonated identity",
            request(&csr, None, Some("token-1"), 0),
            Code::Unauthenticated,
            IMPERSONATED_IDENTITY,
        ),
        (
            "unparsable identity",
            request(&csr, Some("demo/client"), Some("token-1"), 0),
            Code::InvalidArgument,
            "must start with",
        ),
        (
            "malformed CSR",
            request(
                "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n",
                Some(&client_id),
                Some("token-1"),
                0,
            ),
            Code::InvalidArgument,
            "malformed",
        ),
        (
            "too long",
            request(&csr, Some(&client_id), Some("token-1"), 72 * 3600),
            Code::InvalidArgument,
            "exceeds the maximum 2days",
        ),
    ];
    for (case, request, code, message) in cases {
        let status = ask(&mut client, request).await.expect_err(case);
        assert_eq!(status.code(), code, "{case}: {status:?}");
        assert!(
            status.message().contains(message),
            "{case}: {:?} lacks {message:?}",
            status.message()
        );
    }
}
