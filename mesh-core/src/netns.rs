//! Network namespaces: held open by a file descriptor, entered for the moment a socket is created
//! (the socket then belongs to that namespace for good), and found by the pod IP they hold.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// One network namespace.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
    /// (device, inode): the namespace's identity, the same through any path to it.
    id: (u64, u64),
}

impl PartialEq for NetNs {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl NetNs {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let metadata = file.metadata()?;
        Ok(Self {
            file,
            path: path.to_owned(),
            id: (metadata.dev(), metadata.ino()),
        })
    }

    /// A namespace handed over as a descriptor (by the node agent over ZDS); `label` names it in
    /// logs. Fails when the descriptor is not a network namespace.
    pub fn from_fd(fd: OwnedFd, label: impl Into<PathBuf>) -> io::Result<Self> {
        let file = File::from(fd);
        let metadata = file.metadata()?;
        let netns = Self {
            file,
            path: label.into(),
            id: (metadata.dev(), metadata.ino()),
        };
        // Entering it proves what it is: setns refuses anything but a network namespace.
        netns.run(|| ())?;
        Ok(netns)
    }

    /// The descriptor, to hand the namespace to another process.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The addresses of the namespace's interfaces, loopback left out. Blocking.
    pub fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        let addresses = self.run(nix::ifaddrs::getifaddrs)?.map_err(io::Error::from)?;
        Ok(addresses
            .filter_map(|a| {
                let address = a.address?;
                let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                    (Some(v4), _) => IpAddr::V4(v4.ip()),
                    (_, Some(v6)) => IpAddr::V6(v6.ip()),
                    _ => return None,
                };
                (!ip.is_loopback() && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())).then_some(ip)
            })
            .collect())
    }

    /// The calling thread's namespace.
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this namespace, then moves the thread back. Keep
    /// `f` short and non-blocking when called on a runtime thread: the thread is not elsewhere
    /// while it runs.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = Self::current()?;
        if home.id == self.id {
            return Ok(f());
        }
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let result = f();
        // A thread stuck in a pod's namespace would send everything it opens later from there.
        setns(&home.file, CloneFlags::CLONE_NEWNET).expect("return to the thread's own network namespace");
        Ok(result)
    }

    /// Whether `ip` is an address of this namespace (binding to it succeeds only there).
    pub fn holds(&self, ip: IpAddr) -> bool {
        self.run(|| UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok())
            .unwrap_or(false)
    }

    /// The namespace holding `ip`: first among the files of `directory` (where `ip netns` and
    /// CNI plugins keep them), then among the namespaces of running processes. Blocking.
    pub fn find_by_ip(ip: IpAddr, directory: &Path) -> Option<Self> {
        let own = Self::current().ok()?;
        let mut seen = BTreeSet::from([own.id]);
        let named = std::fs::read_dir(directory).into_iter().flatten().flatten();
        let processes = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
            .map(|e| e.path().join("ns/net"));
        named
            .map(|e| e.path())
            .chain(processes)
            .filter_map(|path| Self::open(&path).ok())
            .filter(|ns| seen.insert(ns.id))
            .find(|ns| ns.holds(ip))
    }
}
