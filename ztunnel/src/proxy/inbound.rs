//! Inbound HBONE (15008): TLS with the destination workload's certificate (chosen by the address
//! the connection arrived on), then per CONNECT: the target must be a workload of this node, L4
//! authorization (401 when denied), a connection to the app (503 when it refuses), then bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use mesh_core::hbone::{InboundRequest, ServerCertificates};
use mesh_core::identity::tls;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{Context, identity_of};
use crate::certificates::CertificateSource;
use crate::state::authorization::{self, Connection};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Picks the certificate of the workload whose address the client connected to.
#[derive(Debug)]
pub struct WorkloadCertificates<S>(pub Arc<Context<S>>);

impl<S: CertificateSource> ServerCertificates for WorkloadCertificates<S> {
    async fn server_config(&self, local: SocketAddr) -> Result<Arc<ServerConfig>, BoxError> {
        let workload = self
            .0
            .workload_at(local.ip())
            .ok_or_else(|| format!("no workload at {}", local.ip()))?;
        let certificate = self.0.certificates.get(&identity_of(&workload)?).await?;
        Ok(Arc::new(tls::server_config(&certificate)?))
    }
}

/// Handles one CONNECT stream.
pub async fn handle<S: CertificateSource>(context: Arc<Context<S>>, request: InboundRequest) {
    let target = request.authority;
    let source = request.peer_identity.clone();
    let Some(workload) = context.workload_at(target.ip()).filter(|w| w.node == context.node) else {
        warn!(%target, %source, "HBONE target is not a workload on this node");
        return request.reject(StatusCode::BAD_REQUEST);
    };
    let connection = Connection {
        source_ip: request.peer_address.ip(),
        source_identity: Some(&source),
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    let verdict = {
        let state = context.state.read().expect("not poisoned");
        authorization::check(state.policies_for(&workload).map(|p| p.as_ref()), &connection)
    };
    if let Err(denied) = verdict {
        info!(%target, %source, reason = %denied, "connection denied");
        return request.reject(StatusCode::UNAUTHORIZED);
    }
    let app = match TcpStream::connect(target).await {
        Ok(app) => app,
        Err(error) => {
            warn!(%target, %source, %error, "app refused the connection");
            return request.reject(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let _ = app.set_nodelay(true);
    let Ok(mut tunnel) = request.accept() else {
        return;
    };
    let mut app = app;
    match tokio::io::copy_bidirectional(&mut tunnel, &mut app).await {
        Ok((from_client, to_client)) => {
            info!(%target, %source, from_client, to_client, "connection closed")
        }
        Err(error) => info!(%target, %source, %error, "connection ended with an error"),
    }
}
