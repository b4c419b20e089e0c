//! In-pod redirection: ztunnel enrols each ambient pod of its node itself. It finds the pod's
//! network namespace by the pod's IP, installs capture rules there ([`rules`]), and opens its
//! listeners (15001, 15006, 15008) inside it; the connections it makes for the pod are created
//! there too ([`PodSockets`]), marked so the rules let them pass.

pub mod netns;
pub mod rules;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use mesh_core::net::{SocketFactory, prepare};
use tokio::net::{TcpListener, TcpSocket};

use self::netns::NetNs;

/// How a pod's traffic reaches ztunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RedirectMode {
    /// ztunnel enrols each pod: rules and listeners inside the pod's network namespace.
    Inpod,
    /// Pods share ztunnel's network namespace (a lab on loopback addresses): listeners on each
    /// pod's address, capture left to whoever set the addresses up.
    Shared,
}

/// The mark Istio's rules skip (0x539).
pub const DEFAULT_MARK: u32 = 1337;

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

/// Binds a listener on `address` inside `netns`.
pub fn listen_in(netns: &NetNs, address: SocketAddr) -> io::Result<TcpListener> {
    let listener = netns.run(|| std::net::TcpListener::bind(address))??;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}
