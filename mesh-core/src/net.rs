//! The sockets a proxy opens and the destinations it recovers from redirected ones.

use std::fmt::Debug;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

/// Creates the proxy's outgoing sockets: where they live (a pod's network namespace, say) and how
/// they are marked is the factory's business; connecting is the caller's.
pub trait SocketFactory: Send + Sync + Debug {
    /// A socket for a connection to `destination`, bound to `local` when given.
    fn tcp_socket(&self, destination: SocketAddr, local: Option<IpAddr>) -> io::Result<TcpSocket>;
}

/// Connects through `factory`.
pub async fn connect(
    factory: &dyn SocketFactory,
    destination: SocketAddr,
    local: Option<IpAddr>,
) -> io::Result<TcpStream> {
    factory.tcp_socket(destination, local)?.connect(destination).await
}

/// Sockets in this process's own network namespace: Nagle off (a proxy must not add 40 ms
/// stalls to small writes), and marked when capture rules skip a mark, so they are not captured
/// again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connector {
    pub mark: Option<u32>,
}

impl Connector {
    pub fn shared(self) -> Arc<dyn SocketFactory> {
        Arc::new(self)
    }
}

impl SocketFactory for Connector {
    fn tcp_socket(&self, destination: SocketAddr, local: Option<IpAddr>) -> io::Result<TcpSocket> {
        let socket = match destination {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        prepare(&socket, self.mark, local)?;
        Ok(socket)
    }
}

/// Connections a listener queues before they are accepted: bursts of SYNs (every peer
/// reconnecting after a restart) must not be dropped. `tokio::net::TcpListener::bind` and std's
/// use 128.
pub const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `address` with [`LISTEN_BACKLOG`] (SO_REUSEADDR set, as std and tokio do). The
/// kernel caps the backlog at `net.core.somaxconn` (4096 by default since Linux 5.4).
pub fn listen(address: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Nagle off, the mark, the local address: what every proxy socket gets.
pub fn prepare(socket: &TcpSocket, mark: Option<u32>, local: Option<IpAddr>) -> io::Result<()> {
    if let Some(mark) = mark {
        SockRef::from(socket).set_mark(mark)?;
    }
    socket.set_nodelay(true)?;
    if let Some(ip) = local {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    Ok(())
}

/// Where a redirected connection was going: the NAT's original destination (REDIRECT or DNAT
/// rules), or, when no NAT touched it (TPROXY), the address it was accepted on.
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    let socket = SockRef::from(stream);
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    };
    match original {
        Ok(address) => address
            .as_socket()
            .ok_or_else(|| io::Error::other("original destination is not an IP address")),
        // ENOENT: conntrack has no NAT entry for this connection.
        Err(error) if error.raw_os_error() == Some(2) => Ok(local),
        Err(error) => Err(error),
    }
}
