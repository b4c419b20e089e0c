//! The sockets a proxy opens and the destinations it recovers from redirected ones.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

/// Opens the proxy's own outgoing connections: Nagle off (a proxy must not add 40 ms stalls to
/// small writes), and marked when the capture rules skip a mark, so they are not captured again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connector {
    pub mark: Option<u32>,
}

impl Connector {
    /// Connects to `address`, from `local` when given (a workload's own IP, so the peer sees it).
    pub async fn connect(&self, address: SocketAddr, local: Option<IpAddr>) -> io::Result<TcpStream> {
        let socket = match address {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(mark) = self.mark {
            SockRef::from(&socket).set_mark(mark)?;
        }
        if let Some(ip) = local {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.set_nodelay(true)?;
        socket.connect(address).await
    }
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
