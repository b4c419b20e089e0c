//! Inbound: connections to this node's workloads. HBONE (15008) arrives in TLS with the
//! destination workload's certificate (chosen by the address the connection arrived on) and names
//! its target per CONNECT; plaintext (15006) is a redirected connection whose original destination
//! is the target. Both then go through the same steps: the target must be a workload of this node,
//! L4 authorization (a plaintext source has no identity, so STRICT mTLS denies it), a connection
//! to the app, then bytes until either side ends or a policy change revokes the connection.
//!
//! A tunnel is bound to its listener: a CONNECT must name the workload whose certificate the
//! listener presented (the pod it serves), never another pod (ztunnel would relay for the peer)
//! nor one of ztunnel's own ports (a tunnel in the tunnel). Both are refused with 400, as
//! upstream ztunnel does, before authorization.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use mesh_core::hbone::{H2Stream, InboundRequest, ServerCertificates};
use mesh_core::identity::{SpiffeId, tls};
use mesh_core::proto::workload::Workload;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::connection::{Accounting, Description, Endpoint, Registration};
use super::copy::copy_bidirectional;
use super::metrics::{Reporter, ResponseFlags, SecurityPolicy};
use super::{Context, identity_of};
use mesh_core::certificates::CertificateSource;
use mesh_core::state::authorization::{self, Connection};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// ztunnel's own ports (outbound, inbound plaintext, HBONE, DNS, metrics, readiness, admin): never
/// a target of a tunnel or of a redirected connection.
pub const ZTUNNEL_PORTS: [u16; 7] = [15001, 15006, 15008, 15053, 15020, 15021, 15000];

/// Why an inbound connection's target is refused before it is authorized.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetRefused {
    #[error("target {target} is one of ztunnel's own ports")]
    ZtunnelPort { target: SocketAddr },
    #[error("target {target} is not a workload on this node")]
    NotLocal { target: SocketAddr },
    #[error("target {target} is not the workload this listener serves ({listener}); ztunnel does not relay")]
    OtherWorkload { target: SocketAddr, listener: SocketAddr },
}

/// Picks the certificate of the workload whose address the client connected to.
#[derive(Debug)]
pub struct WorkloadCertificates<S>(pub Arc<Context<S>>);

impl<S: CertificateSource> ServerCertificates for WorkloadCertificates<S> {
    async fn server_config(&self, local: SocketAddr) -> Result<Arc<ServerConfig>, BoxError> {
        let workload = self
            .0
            .local_workload_at(local.ip())
            .ok_or_else(|| format!("no workload of this node at {}", local.ip()))?;
        let certificate = self.0.certificates.get(&identity_of(&workload)?).await?;
        Ok(Arc::new(tls::server_config(&certificate)?))
    }
}

/// The client side of an inbound connection, before it is admitted.
enum Client {
    /// Boxed: the request is large, and the connection's future holds this for its whole life.
    Hbone(Box<InboundRequest>),
    Plaintext(TcpStream),
}

impl Client {
    /// HBONE answers with a status; a plaintext connection is closed, which is all TCP can say.
    fn refuse(self, status: StatusCode) {
        match self {
            Self::Hbone(request) => request.reject(status),
            Self::Plaintext(stream) => drop(stream),
        }
    }
}

/// The workload a tunnel that arrived on `listener` (the address the client connected to) may
/// reach at `target`: the one the listener serves, on one of its ports that is not ztunnel's.
pub fn tunnel_target<S>(
    context: &Context<S>,
    listener: SocketAddr,
    target: SocketAddr,
) -> Result<Arc<Workload>, TargetRefused> {
    if ZTUNNEL_PORTS.contains(&target.port()) {
        return Err(TargetRefused::ZtunnelPort { target });
    }
    let workload = context
        .local_workload_at(target.ip())
        .ok_or(TargetRefused::NotLocal { target })?;
    // The certificate was chosen by the listener's address: the target must be that workload
    // (any of its addresses).
    match context.local_workload_at(listener.ip()) {
        Some(served) if served.uid == workload.uid => Ok(workload),
        _ => Err(TargetRefused::OtherWorkload { target, listener }),
    }
}

/// Handles one CONNECT stream (15008).
pub async fn handle_hbone<S: CertificateSource>(context: Arc<Context<S>>, request: InboundRequest) {
    let target = request.authority;
    let workload = match tunnel_target(&context, request.local_address, target) {
        Ok(workload) => workload,
        Err(refused) => {
            warn!(
                listener = %request.local_address, dst.addr = %target, src.addr = %request.peer_address,
                src.identity = %request.peer_identity, reason = %refused, "HBONE CONNECT refused with 400"
            );
            return request.reject(StatusCode::BAD_REQUEST);
        }
    };
    let (peer, identity) = (request.peer_address, request.peer_identity.clone());
    serve(
        context,
        Client::Hbone(Box::new(request)),
        peer,
        Some(identity),
        workload,
        target,
    )
    .await
}

/// Handles one redirected plaintext connection (15006) that was headed for `target`.
pub async fn handle_plaintext<S: CertificateSource>(context: Arc<Context<S>>, stream: TcpStream, target: SocketAddr) {
    let peer = match stream.peer_addr() {
        Ok(peer) => peer,
        Err(error) => return debug!(%error, "plaintext connection gone before it was served"),
    };
    if ZTUNNEL_PORTS.contains(&target.port()) {
        let refused = TargetRefused::ZtunnelPort { target };
        return warn!(dst.addr = %target, src.addr = %peer, reason = %refused, "plaintext connection refused; closing");
    }
    let Some(workload) = context.local_workload_at(target.ip()) else {
        return warn!(dst.addr = %target, src.addr = %peer, "plaintext target is not a workload on this node; closing");
    };
    serve(context, Client::Plaintext(stream), peer, None, workload, target).await
}

async fn serve<S: CertificateSource>(
    context: Arc<Context<S>>,
    client: Client,
    peer: SocketAddr,
    peer_identity: Option<SpiffeId>,
    workload: Arc<Workload>,
    target: SocketAddr,
) {
    let connection = Connection {
        source_ip: peer.ip(),
        source_identity: peer_identity.as_ref(),
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    let (verdict, source_workload, service) = {
        let state = context.state.read().expect("not poisoned");
        let verdict = authorization::check(state.policies_for(&workload).map(|p| p.as_ref()), &connection);
        let source_workload = state
            .workload_by_ip(&mesh_core::state::NetworkAddress {
                network: context.network.clone(),
                ip: peer.ip(),
            })
            .cloned();
        (
            verdict,
            source_workload,
            state.service_serving(&workload, target.port()).cloned(),
        )
    };
    let description = Description {
        reporter: Reporter::destination,
        source: Endpoint {
            address: peer,
            workload: source_workload,
            identity: peer_identity.clone(),
        },
        destination: Endpoint {
            address: target,
            identity: identity_of(&workload).ok(),
            workload: Some(workload.clone()),
        },
        service,
        security: match client {
            Client::Hbone(_) => SecurityPolicy::MutualTls,
            Client::Plaintext(_) => SecurityPolicy::Unknown,
        },
    };
    if let Err(denied) = verdict {
        description.refused(&context.metrics, ResponseFlags::Denied, &format!("denied: {denied}"));
        return client.refuse(StatusCode::UNAUTHORIZED);
    }
    let app = match mesh_core::net::connect(&*context.sockets, target, None).await {
        Ok(app) => app,
        Err(error) => {
            let reason = format!("app refused the connection: {error}");
            description.refused(&context.metrics, ResponseFlags::ConnectFailure, &reason);
            return client.refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let client = match client {
        Client::Hbone(request) => match request.accept() {
            Ok(tunnel) => Accepted::Hbone(tunnel),
            Err(error) => return debug!(%target, %error, "HBONE stream gone before it was accepted"),
        },
        Client::Plaintext(stream) => Accepted::Plaintext(stream),
    };
    let registration = context.connections.register(&workload, &connection);
    let accounting = description.open(&context.metrics, context.in_flight.token());
    // The copying gets a task of its own, sized for it alone: an idle connection holds no setup state.
    tokio::spawn(carry(client, app, accounting, registration));
}

/// The client side of an admitted connection.
enum Accepted {
    Hbone(H2Stream),
    Plaintext(TcpStream),
}

/// Copies until both sides are done or a policy change revokes the connection, then logs it. A
/// revoked or failed tunnel is reset, so the client sees an abort rather than an orderly end.
async fn carry(mut client: Accepted, mut app: TcpStream, accounting: Accounting, registration: Registration) {
    let (received, sent) = (&accounting.received, &accounting.sent);
    let outcome = {
        let copied = async {
            match &mut client {
                Accepted::Hbone(tunnel) => copy_bidirectional(tunnel, &mut app, received, sent).await,
                Accepted::Plaintext(stream) => copy_bidirectional(stream, &mut app, received, sent).await,
            }
        };
        tokio::select! {
            copied = copied => copied.map_err(|error| error.to_string()),
            () = registration.revoked() => Err("closed: a policy change denies it".to_owned()),
        }
    };
    drop(registration);
    if outcome.is_err()
        && let Accepted::Hbone(tunnel) = client
    {
        tunnel.reset();
    }
    accounting.close(outcome);
}
