//! Mutual TLS between workloads: the right identities connect, and a wrong SAN, an expired
//! certificate or a certificate from another root is each refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_core::identity::tls::{client_config, identity_mismatch, peer_identity, server_config};
use mesh_core::identity::{Authority, SpiffeId, WorkloadCertificate};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOUR: Duration = Duration::from_secs(3600);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "demo", sa).unwrap()
}

fn valid(ca: &Authority, sa: &str) -> WorkloadCertificate {
    let now = SystemTime::now();
    ca.issue(&id(sa), now - HOUR, now + HOUR).unwrap()
}

fn expired(ca: &Authority, sa: &str) -> WorkloadCertificate {
    let now = SystemTime::now();
    ca.issue(&id(sa), now - 3 * HOUR, now - HOUR).unwrap()
}

/// Runs a handshake over an in-memory pipe; returns what each side saw.
async fn handshake(
    server_cert: &WorkloadCertificate,
    client_cert: &WorkloadCertificate,
    expected: SpiffeId,
) -> (Result<SpiffeId, String>, Result<(), String>) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(server_cert).unwrap()));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(client_cert, vec![expected]).unwrap()));
    let server = async move {
        let mut tls = acceptor.accept(server_io).await.map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok(peer)
    };
    let client = async move {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut tls = connector
            .connect(name, client_io)
            .await
            .map_err(|e| match identity_mismatch(&e) {
                Some(mismatch) => mismatch.to_string(),
                None => e.to_string(),
            })?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(())
    };
    tokio::join!(server, client)
}

#[tokio::test]
async fn mutual_tls_carries_both_identities() {
    let ca = Authority::self_signed("cluster.local").unwrap();
    let (server, client) = handshake(&valid(&ca, "server"), &valid(&ca, "client"), id("server")).await;
    assert_eq!(client, Ok(()));
    assert_eq!(server, Ok(id("client")));
}

#[tokio::test]
async fn wrong_server_identity_is_refused_naming_both() {
    let ca = Authority::self_signed("cluster.local").unwrap();
    let (_, client) = handshake(&valid(&ca, "server"), &valid(&ca, "client"), id("other")).await;
    let error = client.unwrap_err();
    assert!(error.contains("spiffe://cluster.local/ns/demo/sa/server"), "{error}");
    assert!(error.contains("spiffe://cluster.local/ns/demo/sa/other"), "{error}");
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let ca = Authority::self_signed("cluster.local").unwrap();
    let (_, client) = handshake(&expired(&ca, "server"), &valid(&ca, "client"), id("server")).await;
    let error = client.unwrap_err();
    assert!(error.contains("expired"), "{error}");
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = Authority::self_signed("cluster.local").unwrap();
    let (server, _) = handshake(&valid(&ca, "server"), &expired(&ca, "client"), id("server")).await;
    let error = server.unwrap_err();
    assert!(error.contains("expired"), "{error}");
}

#[tokio::test]
async fn server_from_another_root_is_refused() {
    let ca = Authority::self_signed("cluster.local").unwrap();
    let stranger = Authority::self_signed("cluster.local").unwrap();
    let (_, client) = handshake(&valid(&stranger, "server"), &valid(&ca, "client"), id("server")).await;
    let error = client.unwrap_err();
    // Both roots are named after the trust domain, so webpki finds the wrong one by name and the
    // signature check refuses it; with distinct names it would be UnknownIssuer.
    assert!(
        error.contains("BadSignature") || error.contains("UnknownIssuer"),
        "{error}"
    );
}

#[tokio::test]
async fn client_from_another_root_is_refused() {
    let ca = Authority::self_signed("cluster.local").unwrap();
    let stranger = Authority::self_signed("cluster.local").unwrap();
    // The client trusts the mesh root but presents a certificate signed by a stranger.
    let foreign = valid(&stranger, "client");
    let client =
        WorkloadCertificate::new(foreign.chain().to_vec(), foreign.key().clone_key(), ca.roots().clone()).unwrap();
    let (server, _) = handshake(&valid(&ca, "server"), &client, id("server")).await;
    let error = server.unwrap_err();
    // Both roots are named after the trust domain, so webpki finds the wrong one by name and the
    // signature check refuses it; with distinct names it would be UnknownIssuer.
    assert!(
        error.contains("BadSignature") || error.contains("UnknownIssuer"),
        "{error}"
    );
}

#[test]
fn csr_round_trip_through_the_authority() {
    use mesh_core::identity::CertificateRequest;
    let ca = Authority::self_signed("cluster.local").unwrap();
    let request = CertificateRequest::new(&id("client")).unwrap();
    // The CA decides the identity, whatever the CSR asked for.
    let chain = ca.sign_csr(&request.csr_pem, &id("granted"), HOUR).unwrap();
    assert_eq!(chain.len(), 2, "leaf and root");
    let cert = request.into_certificate(&chain, ca.roots().clone()).unwrap();
    assert_eq!(cert.identity(), &id("granted"));
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    assert!(
        lifetime >= HOUR && lifetime <= HOUR + Duration::from_secs(600),
        "{lifetime:?}"
    );
    assert!(cert.refresh_at() > cert.not_before() && cert.refresh_at() < cert.not_after());

    let error = ca.sign_csr(
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        &id("x"),
        HOUR,
    );
    assert!(error.unwrap_err().to_string().contains("malformed"));
}

#[test]
fn authority_round_trips_through_its_pem_files() {
    let ca = Authority::self_signed("cluster.local").unwrap();
    let reloaded = Authority::from_pem(ca.pem().clone()).unwrap();
    let (server, client) = (valid(&ca, "server"), valid(&reloaded, "client"));
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let (server_saw, client_saw) = runtime.block_on(handshake(&server, &client, id("server")));
    assert_eq!(client_saw, Ok(()));
    assert_eq!(server_saw, Ok(id("client")));

    let pem = WorkloadCertificate::from_pem("not pem", "", &ca.pem().root_cert).unwrap_err();
    assert!(pem.to_string().contains("certificate chain"), "{pem}");
}

/// A CSR made by openssl (a real client) with the given key and digest.
fn openssl_csr(key_options: &[&str], digest: &str) -> String {
    let output = std::process::Command::new("openssl")
        .args(["req", "-new", "-nodes", "-subj", "/O=test", "-keyout", "/dev/null"])
        .args(key_options)
        .arg(digest)
        .output()
        .expect("openssl (Debian package openssl) runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn csrs_with_other_keys_or_digests_are_refused_by_name() {
    let ca = Authority::self_signed("cluster.local").unwrap();
    let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let p384 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"];
    let rsa = ["-newkey", "rsa:2048"];
    ca.sign_csr(&openssl_csr(&p256, "-sha256"), &id("ok"), HOUR)
        .expect("P-256 with SHA-256 is what the mesh issues");
    for (key, digest, expected) in [
        (&p384[..], "-sha256", "the key is an EC P-384 (secp384r1) key"),
        (
            &p256[..],
            "-sha384",
            "the key is P-256 but the request is signed with ecdsa-with-SHA384",
        ),
        (&rsa[..], "-sha256", "the key is not an EC key"),
    ] {
        let error = ca
            .sign_csr(&openssl_csr(key, digest), &id("x"), HOUR)
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{key:?} {digest}: {error}");
        assert!(
            error.contains("only ECDSA P-256 keys signed with ecdsa-with-SHA256"),
            "{error}"
        );
    }
}
