//! Network namespaces and the links between them, with `ip` (iproute2). Pods are wired the way a
//! point-to-point CNI does it: a veth pair per pod, the pod's IP as a /32 on its end, a default
//! route via a link-local gateway that the node's end holds, and a /32 route back on the node.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nix::sched::{CloneFlags, setns};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
/// The gateway every pod routes through: the node's end of each pod's veth holds it.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Runs `program args` (stdin from `input`), failing with its stderr.
pub fn run(program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("{program}: {e} (is it installed?)"))?;
    if let Some(input) = input {
        child.stdin.take().expect("piped").write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A named network namespace; deleted when dropped (a namespace still used by a process lives on
/// until that process ends).
#[derive(Debug)]
pub struct Namespace {
    name: String,
    /// Deleted on drop; false once [`Namespace::keep`] hands it to someone else (a state file).
    owned: bool,
}

impl Namespace {
    /// Creates `name` (replacing a leftover of the same name) with `lo` up.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let _ = run("ip", &["netns", "del", name], None);
        run("ip", &["netns", "add", name], None)?;
        let namespace = Self {
            name: name.to_owned(),
            owned: true,
        };
        namespace.ip(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// A namespace that already exists (made by someone else); never deleted by this value.
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            owned: false,
        }
    }

    /// Keeps the namespace when this value is dropped: its owner deletes it later.
    pub fn keep(mut self) -> Self {
        self.owned = false;
        self
    }

    /// Deletes a namespace by name (no error if it is gone).
    pub fn delete(name: &str) {
        let _ = run("ip", &["netns", "del", name], None);
    }

    /// The named namespaces that exist now.
    pub fn list() -> Vec<String> {
        std::fs::read_dir(NETNS_DIR)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `ip -n <name> args…`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all, None)
    }

    /// Runs `program args` inside this namespace.
    pub fn exec(&self, program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all, input)
    }

    /// Runs `f` on a thread of its own inside this namespace: sockets it creates belong here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        self.spawn(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
    }

    /// Starts `f` on a thread of its own inside this namespace without waiting for it (a pod's
    /// process, say: it enters the namespace first and then waits for its cue).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>> {
        let file = std::fs::File::open(self.path())?;
        Ok(std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        }))
    }
}

/// `ip args…` in `node`, or in the calling thread's namespace when `None`.
fn node_ip(node: Option<&Namespace>, args: &[&str]) -> anyhow::Result<String> {
    match node {
        Some(node) => node.ip(args),
        None => run("ip", args, None),
    }
}

/// A veth pair: `link` in `near` (`None`: the calling thread's namespace) and `eth0` in `far`.
pub fn veth(near: Option<&Namespace>, link: &str, far: &Namespace) -> anyhow::Result<()> {
    node_ip(
        near,
        &[
            "link",
            "add",
            link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            far.name(),
        ],
    )?;
    Ok(())
}

/// Wires `pod` to its node (`None`: the calling thread's namespace): a veth pair named `link` on
/// the node and `eth0` in the pod, `ip` on the pod's end, routes both ways.
pub fn attach(node: Option<&Namespace>, pod: &Namespace, link: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    veth(node, link, pod)?;
    node_ip(node, &["addr", "add", &format!("{POD_GATEWAY}/32"), "dev", link])?;
    node_ip(node, &["link", "set", link, "up"])?;
    // `replace`: a previous sandbox of the same pod may linger (a socket still holds its
    // namespace) with its own link and route; the new one takes the pod's address over.
    node_ip(node, &["route", "replace", &format!("{ip}/32"), "dev", link])?;
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", &POD_GATEWAY.to_string(), "dev", "eth0", "scope", "link"])?;
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        &POD_GATEWAY.to_string(),
        "dev",
        "eth0",
    ])?;
    Ok(())
}

/// Lets a node (`None`: the calling thread's namespace) route between the links attached to it.
pub fn enable_forwarding(node: Option<&Namespace>) -> anyhow::Result<()> {
    match node {
        Some(node) => node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"], None)?,
        None => run("sysctl", &["-qw", "net.ipv4.ip_forward=1"], None)?,
    };
    Ok(())
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if self.owned {
            Self::delete(&self.name);
        }
    }
}
