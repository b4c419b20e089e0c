//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams inside mutual TLS 1.3 (port 15008).
//!
//! [`Server`] terminates TLS and hands each CONNECT to a handler; [`Pool`] keeps client
//! connections keyed by identities and address and multiplexes streams over them. Both carry the
//! tunnelled bytes as an [`H2Stream`].

mod error;
mod limits;
mod pool;
mod server;
mod stream;
mod transport;

use std::time::Duration;

pub use error::HboneError;
pub use limits::{Admission, EVICTION_AGE, Limit, LimitArgs, ServerLimits};
pub use pool::{Pool, PoolConfig, PoolKey};
pub use server::{InboundRequest, Server, ServerCertificates, connect_target};
pub use stream::H2Stream;

/// The well-known HBONE port.
pub const PORT: u16 = 15008;

/// HTTP/2 settings tuned for bulk throughput: windows of several MiB so one stream can fill a fast
/// link. Frames of 32 KiB (two TLS records) measured best in `benches/hbone_throughput`: larger
/// frames must be buffered whole before the receiver sees a byte, smaller ones cost per-frame work.
#[derive(Clone, Copy, Debug)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_concurrent_streams: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 32 * 1024,
            max_concurrent_streams: 1000,
        }
    }
}

use transport::Transport;

/// What the server's HTTP/2 runs on.
type TlsTransport = tokio_rustls::server::TlsStream<Transport>;

/// How long a client's TLS + HTTP/2 handshake may take before the attempt is abandoned (the
/// server's is one of its [`ServerLimits`]).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
