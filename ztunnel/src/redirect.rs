//! In-pod redirection: the node agent has installed the capture rules in a pod's network
//! namespace and handed the namespace over ZDS ([`crate::inpod`]); ztunnel opens the pod's
//! listeners (15001, 15006, 15008) inside it, and the connections it makes for the pod are
//! created there too ([`PodSockets`]), marked so the rules let them pass.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use mesh_core::net::{SocketFactory, prepare};
use tokio::net::{TcpListener, TcpSocket};

use mesh_core::netns::NetNs;

/// How a pod's traffic reaches ztunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RedirectMode {
    /// The node agent hands each pod's network namespace over ZDS (rules already in place);
    /// ztunnel listens inside it.
    Inpod,
    /// Pods share ztunnel's network namespace (a lab on loopback addresses): listeners on each
    /// pod's address, capture left to whoever set the addresses up.
    Shared,
}

pub use mesh_core::capture::DEFAULT_MARK;

/// Creates each socket in the network namespace of the pod it serves: the source pod for its
/// outbound connections, the destination pod for connections to its app.
#[derive(Debug, Default)]
pub struct PodSockets {
    mark: Option<u32>,
    pods: RwLock<HashMap<IpAddr, Arc<NetNs>>>,
}

impl PodSockets {
    pub fn new(mark: Option<u32>) -> Self {
        Self {
            mark,
            pods: RwLock::default(),
        }
    }

    pub fn insert(&self, ip: IpAddr, netns: Arc<NetNs>) {
        self.pods.write().expect("not poisoned").insert(ip, netns);
    }

    pub fn remove(&self, ip: IpAddr) {
        self.pods.write().expect("not poisoned").remove(&ip);
    }

    fn netns_of(&self, ip: IpAddr) -> Option<Arc<NetNs>> {
        self.pods.read().expect("not poisoned").get(&ip).cloned()
    }
}

fn new_socket(destination: SocketAddr) -> io::Result<TcpSocket> {
    match destination {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
}

impl SocketFactory for PodSockets {
    fn tcp_socket(&self, destination: SocketAddr, local: Option<IpAddr>) -> io::Result<TcpSocket> {
        let pod = local
            .and_then(|ip| self.netns_of(ip))
            .or_else(|| self.netns_of(destination.ip()));
        let socket = match pod {
            Some(netns) => netns.run(|| new_socket(destination))??,
            None => new_socket(destination)?,
        };
        prepare(&socket, self.mark, local)?;
        Ok(socket)
    }
}

/// Pending connections a pod's listener queues (SYN bursts are common at pod start).
const BACKLOG: i32 = 1024;

/// Binds a listener on `address` inside `netns`. SO_REUSEPORT lets the ztunnel that replaces
/// this one (an upgrade) listen beside it before this one stops accepting.
pub fn listen_in(netns: &NetNs, address: SocketAddr) -> io::Result<TcpListener> {
    let socket = netns.run(|| {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&address.into())?;
        socket.listen(BACKLOG)?;
        Ok::<_, io::Error>(socket)
    })??;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}
