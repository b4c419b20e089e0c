//! Network namespaces: held open by a file descriptor, entered for the moment a socket is created
//! (the socket then belongs to that namespace for good), and found by the pod IP they hold.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
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
