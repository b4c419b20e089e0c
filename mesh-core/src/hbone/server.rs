//! The HBONE server: TLS with a certificate chosen by the local address, HTTP/2, and a handler
//! per CONNECT stream.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};

use super::{H2Settings, H2Stream, HANDSHAKE_TIMEOUT, HboneError, transport};
use crate::identity::{SpiffeId, tls};

/// Chooses the TLS configuration for a connection by the address it arrived on (ztunnel serves
/// each local pod with that pod's certificate).
pub trait ServerCertificates: Send + Sync + 'static {
    fn server_config(
        &self,
        local: SocketAddr,
    ) -> impl Future<Output = Result<Arc<ServerConfig>, Box<dyn std::error::Error + Send + Sync>>> + Send;
}

/// One certificate for every address.
impl ServerCertificates for Arc<ServerConfig> {
    async fn server_config(
        &self,
        _local: SocketAddr,
    ) -> Result<Arc<ServerConfig>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.clone())
    }
}

/// A CONNECT request, to be accepted (200, then bytes) or rejected with a status.
#[derive(Debug)]
pub struct InboundRequest {
    /// The real target, from `:authority`.
    pub authority: SocketAddr,
    /// The client's identity, from its certificate.
    pub peer_identity: SpiffeId,
    pub peer_address: SocketAddr,
    pub local_address: SocketAddr,
    pub headers: HeaderMap,
    respond: SendResponse<Bytes>,
    body: RecvStream,
}

impl InboundRequest {
    /// Answers 200 and returns the tunnel's byte stream.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok(H2Stream::new(send, self.body, None))
    }

    /// Answers `status` (401 denied, 503 app unreachable, 400 malformed) and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let response = Response::builder()
            .status(status)
            .body(())
            .expect("status-only response is valid");
        if let Err(error) = self.respond.send_response(response, true) {
            debug!(%error, "could not send rejection");
        }
    }
}

/// Serves HBONE on a listener until drained.
#[derive(Debug)]
pub struct Server<C> {
    certificates: Arc<C>,
    settings: H2Settings,
}

impl<C: ServerCertificates> Server<C> {
    pub fn new(certificates: C) -> Self {
        Self {
            certificates: Arc::new(certificates),
            settings: H2Settings::default(),
        }
    }

    pub fn with_settings(mut self, settings: H2Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Accepts connections until `drain` fires, then stops accepting, sends GOAWAY on every
    /// connection and returns once their streams have ended. Dropping the future closes everything.
    pub async fn serve<H, F>(self, listener: TcpListener, handler: H, drain: drain::Watch)
    where
        H: Fn(InboundRequest) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let mut connections = JoinSet::new();
        let drained = drain.clone().signaled();
        tokio::pin!(drained);
        loop {
            tokio::select! {
                _ = &mut drained => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let connection = Connection {
                            certificates: self.certificates.clone(),
                            settings: self.settings,
                            peer,
                        };
                        let span = info_span!("hbone_inbound", %peer);
                        connections.spawn(connection.serve(stream, handler.clone(), drain.clone()).instrument(span));
                    }
                    Err(error) => warn!(%error, "accept failed"),
                },
            }
        }
        while connections.join_next().await.is_some() {}
    }
}

struct Connection<C> {
    certificates: Arc<C>,
    settings: H2Settings,
    peer: SocketAddr,
}

impl<C: ServerCertificates> Connection<C> {
    async fn serve<H, F>(self, stream: TcpStream, handler: Arc<H>, drain: drain::Watch)
    where
        H: Fn(InboundRequest) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        if let Err(error) = self.run(stream, handler, drain).await {
            debug!(%error, "HBONE connection ended with an error");
        }
    }

    async fn run<H, F>(self, stream: TcpStream, handler: Arc<H>, drain: drain::Watch) -> Result<(), HboneError>
    where
        H: Fn(InboundRequest) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let peer = self.peer;
        let local = stream
            .local_addr()
            .map_err(|source| HboneError::Accept { peer, source })?;
        let config = self
            .certificates
            .server_config(local)
            .await
            .map_err(|e| HboneError::Accept {
                peer,
                source: std::io::Error::other(e),
            })?;
        let handshake = async {
            let tls = tokio_rustls::TlsAcceptor::from(config)
                .accept(transport(stream))
                .await
                .map_err(|source| HboneError::Accept { peer, source })?;
            let peer_identity = tls::peer_identity(tls.get_ref().1)?;
            let h2 = h2::server::Builder::new()
                .initial_window_size(self.settings.stream_window)
                .initial_connection_window_size(self.settings.connection_window)
                .max_frame_size(self.settings.max_frame_size)
                .max_concurrent_streams(self.settings.max_concurrent_streams)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| HboneError::H2 { address: peer, source })?;
            Ok::<_, HboneError>((peer_identity, h2))
        };
        let (peer_identity, mut h2) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| HboneError::Timeout { address: peer })??;
        debug!(%peer_identity, "HBONE connection established");

        let drained = drain.signaled();
        tokio::pin!(drained);
        let mut release = None;
        loop {
            let next = tokio::select! {
                next = h2.accept() => next,
                shutdown = &mut drained, if release.is_none() => {
                    h2.graceful_shutdown();
                    release = Some(shutdown);
                    continue;
                }
            };
            let Some(next) = next else { break };
            let (request, respond) = next.map_err(|source| HboneError::H2 { address: peer, source })?;
            if let Some(inbound) = self.inbound_request(request, respond, &peer_identity, local) {
                tokio::spawn(handler(inbound).in_current_span());
            }
        }
        drop(release);
        Ok(())
    }

    /// Validates a request; a malformed one is answered 400 here and never reaches the handler.
    fn inbound_request(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer_identity: &SpiffeId,
        local: SocketAddr,
    ) -> Option<InboundRequest> {
        let authority = (request.method() == Method::CONNECT)
            .then(|| request.uri().authority()?.as_str().parse::<SocketAddr>().ok())
            .flatten();
        let Some(authority) = authority else {
            debug!(method = %request.method(), uri = %request.uri(), "malformed HBONE request: want CONNECT to ip:port");
            let response = Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(())
                .expect("valid");
            let _ = respond.send_response(response, true);
            return None;
        };
        let (parts, body) = request.into_parts();
        Some(InboundRequest {
            authority,
            peer_identity: peer_identity.clone(),
            peer_address: self.peer,
            local_address: local,
            headers: parts.headers,
            respond,
            body,
        })
    }
}
