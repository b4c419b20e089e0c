//! Serving xDS and the CA over gRPC: plaintext on a loopback port, TLS with a serving certificate
//! from istiod-lite's own CA on the public one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_core::identity::{Authority, SpiffeId};
use mesh_core::proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use mesh_core::proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Router, TcpIncoming};
use tracing::{debug, info};

use crate::ca::{CertificateService, Placement};
use crate::xds;

/// The gRPC services, ready to be served on several listeners.
pub fn router<P: Placement>(xds: xds::Server, ca: CertificateService<P>) -> Router {
    tonic::transport::Server::builder()
        .add_service(AggregatedDiscoveryServiceServer::new(xds))
        .add_service(IstioCertificateServiceServer::new(ca))
}

/// Serves `router` in plaintext on `listener` until `drain` fires.
pub async fn serve_plaintext(router: Router, listener: TcpListener, drain: drain::Watch) {
    let shutdown = async move {
        let _ = drain.signaled().await;
    };
    if let Err(error) = router
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
    {
        tracing::error!(%error, "plaintext gRPC server failed");
    }
}

/// Serves `router` over TLS on `listener` until `drain` fires. Handshakes run concurrently so one
/// slow client cannot hold up the others.
pub async fn serve_tls(router: Router, listener: TcpListener, tls: Arc<ServerConfig>, drain: drain::Watch) {
    let (accepted, incoming) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let accept_loop = async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (acceptor, accepted) = (acceptor.clone(), accepted.clone());
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = accepted.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    };
    let shutdown = async move {
        let _ = drain.signaled().await;
    };
    tokio::select! {
        result = router.serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown) => {
            if let Err(error) = result {
                tracing::error!(%error, "TLS gRPC server failed");
            }
        }
        () = accept_loop => {}
    }
}

/// TLS 1.3 serving configuration with a certificate for istiod's identity and `dns_names`,
/// valid a year (re-issued at every start).
pub fn serving_config(authority: &Authority, trust_domain: &str, dns_names: &[String]) -> anyhow::Result<ServerConfig> {
    let identity = SpiffeId::new(trust_domain, "istio-system", "istiod")?;
    let now = SystemTime::now();
    let cert = authority.issue_with_dns_names(
        &identity,
        dns_names,
        now - Duration::from_secs(300),
        now + Duration::from_secs(365 * 24 * 3600),
    )?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(cert.chain().to_vec(), cert.key().clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    info!(%identity, dns_names = ?dns_names, "serving certificate issued");
    Ok(config)
}

/// Binds `address` with a message that says which flag to change when it fails.
pub async fn bind(address: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("{what}: cannot listen on {address}: {e}"))?;
    info!(server = what, address = %listener.local_addr()?, "listening");
    Ok(listener)
}
