//! A SOCKS5 outbound listener (no authentication, CONNECT to an IP), as upstream ztunnel offers
//! for apps that are not redirected: the app names its destination, and the source workload is
//! the address it connects from. The handshake is a few bytes, so it is parsed here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::proxy::outbound::Outbound;
use mesh_core::certificates::CertificateSource;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const CONNECT: u8 = 1;
const IPV4: u8 = 1;
const IPV6: u8 = 4;
const SUCCEEDED: u8 = 0;
const COMMAND_NOT_SUPPORTED: u8 = 7;
const ADDRESS_NOT_SUPPORTED: u8 = 8;

/// Accepts SOCKS5 clients until the listener fails.
pub async fn serve<S: CertificateSource>(listener: TcpListener, outbound: Arc<Outbound<S>>) {
    while let Ok((stream, peer)) = listener.accept().await {
        let outbound = outbound.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(stream, peer, &outbound).await {
                debug!(%peer, %error, "SOCKS5 connection failed");
            }
        });
    }
}

async fn handle<S: CertificateSource>(
    mut stream: TcpStream,
    peer: SocketAddr,
    outbound: &Outbound<S>,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let destination = match handshake(&mut stream).await? {
        Ok(destination) => destination,
        Err(code) => {
            stream.write_all(&[VERSION, code, 0, IPV4, 0, 0, 0, 0, 0, 0]).await?;
            return Ok(());
        }
    };
    // Answer success before connecting, as upstream ztunnel does: the app's bytes are buffered by
    // the kernel meanwhile, and a refusal closes the connection.
    stream
        .write_all(&[VERSION, SUCCEEDED, 0, IPV4, 0, 0, 0, 0, 0, 0])
        .await?;
    match outbound.open(peer, destination).await {
        // The copying gets a task of its own, sized for it alone.
        Ok(opened) => drop(tokio::spawn(opened.carry(stream))),
        Err(error) => warn!(%peer, %destination, %error, "outbound connection failed"),
    }
    Ok(())
}

/// Reads the greeting and the request; the destination, or the reply code refusing it.
async fn handshake(stream: &mut TcpStream) -> std::io::Result<Result<SocketAddr, u8>> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    let mut methods = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut methods).await?;
    if head[0] != VERSION || !methods.contains(&NO_AUTH) {
        stream.write_all(&[VERSION, 0xff]).await?;
        return Err(std::io::Error::other("client offers no SOCKS5 no-auth method"));
    }
    stream.write_all(&[VERSION, NO_AUTH]).await?;
    let mut request = [0u8; 4];
    stream.read_exact(&mut request).await?;
    if request[1] != CONNECT {
        return Ok(Err(COMMAND_NOT_SUPPORTED));
    }
    let ip = match request[3] {
        IPV4 => {
            let mut octets = [0u8; 4];
            stream.read_exact(&mut octets).await?;
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        IPV6 => {
            let mut octets = [0u8; 16];
            stream.read_exact(&mut octets).await?;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Ok(Err(ADDRESS_NOT_SUPPORTED)),
    };
    let port = stream.read_u16().await?;
    Ok(Ok(SocketAddr::new(ip, port)))
}
