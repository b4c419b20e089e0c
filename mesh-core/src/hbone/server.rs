//! The HBONE server: TLS with a certificate chosen by the local address, HTTP/2, and a handler
//! per CONNECT stream, within the bounds of an [`Admission`] (shared by every listener of a
//! process): a connection past the total or the handshakes in progress is reset at once; one
//! whose handshake outlasts the timeout is closed; a peer identity past its connections gets
//! GOAWAY `ENHANCE_YOUR_CALM`, past its streams `429`; a header block past its size `431`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};

use super::limits::{Admitted, Handshaking, StreamPermit};
use super::{Admission, H2Settings, H2Stream, HboneError, Limit, Transport};
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
    /// The stream's place among its peer's; the tunnel holds it.
    permit: StreamPermit,
}

impl InboundRequest {
    /// Answers 200 and returns the tunnel's byte stream.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok(H2Stream::new(send, self.body, Some(Box::new(self.permit))))
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
    admission: Arc<Admission>,
}

impl<C: ServerCertificates> Server<C> {
    pub fn new(certificates: C) -> Self {
        Self {
            certificates: Arc::new(certificates),
            settings: H2Settings::default(),
            admission: Arc::default(),
        }
    }

    /// Counts this server's connections and streams in `admission` (shared with the other
    /// listeners of the process); by default a server has default bounds of its own.
    pub fn with_admission(mut self, admission: Arc<Admission>) -> Self {
        self.admission = admission;
        self
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
                        let (admitted, handshaking) = match self.admission.admit(peer.ip()) {
                            Ok(slots) => slots,
                            Err(limit) => {
                                self.admission.refused(limit, peer, None);
                                reset(stream);
                                continue;
                            }
                        };
                        let connection = Connection {
                            certificates: self.certificates.clone(),
                            settings: self.settings,
                            admission: self.admission.clone(),
                            peer,
                            _admitted: admitted,
                        };
                        let span = info_span!("hbone_inbound", %peer);
                        let serve = connection.serve(stream, handshaking, handler.clone(), drain.clone());
                        connections.spawn(serve.instrument(span));
                    }
                    Err(error) => warn!(%error, "accept failed"),
                },
            }
        }
        // Closed now, not after the connections end: connections queued on it move to a successor
        // listening on the same port (SO_REUSEPORT, tcp_migrate_req) instead of waiting here.
        drop(listener);
        while connections.join_next().await.is_some() {}
    }
}

/// Closes a connection with a reset (no FIN): the peer learns at once that it was refused.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

struct Connection<C> {
    certificates: Arc<C>,
    settings: H2Settings,
    admission: Arc<Admission>,
    peer: SocketAddr,
    /// Its place in the total, for as long as it lives.
    _admitted: Admitted,
}

impl<C: ServerCertificates> Connection<C> {
    async fn serve<H, F>(self, stream: TcpStream, handshaking: Handshaking, handler: Arc<H>, drain: drain::Watch)
    where
        H: Fn(InboundRequest) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        if let Err(error) = self.run(stream, handshaking, handler, drain).await {
            debug!(%error, "HBONE connection ended with an error");
        }
    }

    /// Certificate, TLS and HTTP/2, all within the handshake timeout.
    async fn handshake(
        &self,
        stream: TcpStream,
        local: SocketAddr,
    ) -> Result<(SpiffeId, h2::server::Connection<super::TlsTransport, Bytes>), HboneError> {
        let peer = self.peer;
        let config = self
            .certificates
            .server_config(local)
            .await
            .map_err(|e| HboneError::Accept {
                peer,
                source: std::io::Error::other(e),
            })?;
        let mut tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(Transport::new(stream))
            .await
            .map_err(|source| HboneError::Accept { peer, source })?;
        tls.get_mut().0.buffer();
        let peer_identity = tls::peer_identity(tls.get_ref().1)?;
        let h2 = h2::server::Builder::new()
            .initial_window_size(self.settings.stream_window)
            .initial_connection_window_size(self.settings.connection_window)
            .max_frame_size(self.settings.max_frame_size)
            .max_concurrent_streams(self.settings.max_concurrent_streams)
            .max_header_list_size(self.admission.limits().max_header_list_size)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::H2 { address: peer, source })?;
        Ok((peer_identity, h2))
    }

    async fn run<H, F>(
        self,
        stream: TcpStream,
        handshaking: Handshaking,
        handler: Arc<H>,
        drain: drain::Watch,
    ) -> Result<(), HboneError>
    where
        H: Fn(InboundRequest) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let peer = self.peer;
        let local = stream
            .local_addr()
            .map_err(|source| HboneError::Accept { peer, source })?;
        let timeout = self.admission.limits().handshake_timeout;
        let handshake = tokio::time::timeout(timeout, Box::pin(self.handshake(stream, local)));
        let outcome = tokio::select! {
            outcome = handshake => outcome,
            () = handshaking.evicted() => {
                self.admission.refused(Limit::pending_handshakes, peer, None);
                return Err(HboneError::Refused { address: peer, limit: Limit::pending_handshakes });
            }
        };
        let Ok(handshake) = outcome else {
            self.admission.refused(Limit::handshake_timeout, peer, None);
            return Err(HboneError::Timeout { address: peer });
        };
        drop(handshaking);
        let (peer_identity, mut h2) = handshake?;
        let _peer_connection = match self.admission.peer_connection(&peer_identity) {
            Ok(slot) => slot,
            Err(limit) => {
                self.admission.refused(limit, peer, Some(&peer_identity));
                return refuse_connection(h2, peer).await;
            }
        };
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
            let permit = match self.admission.stream(&peer_identity) {
                Ok(permit) => permit,
                Err(limit) => {
                    self.admission.refused(limit, peer, Some(&peer_identity));
                    respond_status(respond, StatusCode::TOO_MANY_REQUESTS);
                    continue;
                }
            };
            if let Some(inbound) = self.inbound_request(request, respond, &peer_identity, local, permit) {
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
        respond: SendResponse<Bytes>,
        peer_identity: &SpiffeId,
        local: SocketAddr,
        permit: StreamPermit,
    ) -> Option<InboundRequest> {
        let Some(authority) = connect_target(request.method(), request.uri()) else {
            debug!(method = %request.method(), uri = %request.uri(), "malformed HBONE request: want CONNECT to ip:port");
            respond_status(respond, StatusCode::BAD_REQUEST);
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
            permit,
        })
    }
}

/// The target of an HBONE request: a CONNECT whose authority is `ip:port`; `None` for anything
/// else (answered 400). Pure, so it is fuzzed on its own (`fuzz/fuzz_targets/hbone_connect.rs`).
pub fn connect_target(method: &Method, uri: &Uri) -> Option<SocketAddr> {
    if method != Method::CONNECT {
        return None;
    }
    uri.authority()?.as_str().parse().ok()
}

/// Answers a stream with `status` alone and ends it.
fn respond_status(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .expect("status-only response is valid");
    if let Err(error) = respond.send_response(response, true) {
        debug!(%error, %status, "could not send the refusal");
    }
}

/// Refuses a whole connection whose peer is past its bound: GOAWAY `ENHANCE_YOUR_CALM`, flushed
/// (for at most a second); the socket then stays open a moment, so that what the peer sent
/// meanwhile does not reset the connection before the peer has read why it is closed.
async fn refuse_connection(
    mut h2: h2::server::Connection<super::TlsTransport, Bytes>,
    peer: SocketAddr,
) -> Result<(), HboneError> {
    const LINGER: std::time::Duration = std::time::Duration::from_millis(500);
    h2.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
    let flushed = async { while let Some(Ok(_)) = h2.accept().await {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), flushed).await;
    tokio::time::sleep(LINGER).await;
    drop(h2);
    Err(HboneError::Refused {
        address: peer,
        limit: Limit::peer_connections,
    })
}
