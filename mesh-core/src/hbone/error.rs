use std::net::SocketAddr;

use crate::identity::{IdentityMismatch, SpiffeId, TlsError};

/// Why an HBONE tunnel could not be opened or served.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connect to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("HBONE to {address}: {mismatch}")]
    IdentityMismatch {
        address: SocketAddr,
        mismatch: IdentityMismatch,
    },
    #[error("TLS handshake with {address} (expecting {expected}): {source}")]
    Handshake {
        address: SocketAddr,
        expected: SpiffeId,
        source: std::io::Error,
    },
    #[error("TLS handshake from {peer}: {source}")]
    Accept { peer: SocketAddr, source: std::io::Error },
    #[error("handshake with {address} timed out")]
    Timeout { address: SocketAddr },
    #[error("connection from {address} refused: bound {limit:?} reached")]
    Refused { address: SocketAddr, limit: super::Limit },
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("HTTP/2 with {address}: {source}")]
    H2 { address: SocketAddr, source: h2::Error },
    #[error("CONNECT {authority} via {address} answered {status}")]
    Status {
        address: SocketAddr,
        authority: SocketAddr,
        status: http::StatusCode,
    },
    #[error("invalid CONNECT request for {authority}: {source}")]
    Request { authority: SocketAddr, source: http::Error },
}
