//! What the lab builds: the topology file (nodes, addresses, pod CIDRs) and, from the Kubernetes
//! manifests beside it, the pods to place (name, node, IP, what to run).

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use istiod_lite::objects::{self, Object};
use serde::Deserialize;

/// `topology.yaml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The bridge's address and prefix in `lab-net`, e.g. `10.10.0.254/24`.
    pub bridge: String,
    /// istiod-lite's address on the bridge.
    pub controller: Ipv4Addr,
    pub nodes: Vec<Node>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    pub address: Ipv4Addr,
    /// `a.b.c.d/len`: pods of this node take their IPs from here.
    pub pod_cidr: String,
}

/// A pod to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`, when the manifest gives one (`K8S_POD_UID`; else the lab makes one up).
    pub uid: Option<String>,
    pub node: String,
    pub ip: Ipv4Addr,
    /// What runs in the pod: an app per container the lab knows the image of.
    pub apps: Vec<App>,
    /// The pod's service account.
    pub service_account: String,
    /// `gateway.networking.k8s.io/gateway-name`: the pod serves that waypoint.
    pub gateway: Option<String>,
}

/// A container the lab runs, by its image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum App {
    /// `mesh-lab/echo`: answers `<pod>: ` on each port, then echoes.
    Echo(u16),
    /// `mesh-lab/http`: an HTTP/1.1 server on each port (see `component::http_response`).
    Http(u16),
    /// `mesh-lab/waypoint`: the waypoint of the pod's `gateway-name` label.
    Waypoint,
}

fn cidr(text: &str) -> anyhow::Result<(Ipv4Addr, u8)> {
    let (ip, len) = text
        .split_once('/')
        .with_context(|| format!("{text:?} is not a.b.c.d/len"))?;
    let len: u8 = len.parse().with_context(|| format!("{text:?}: bad prefix length"))?;
    ensure!(len <= 32, "{text:?}: prefix length over 32");
    Ok((ip.parse().with_context(|| format!("{text:?}: bad address"))?, len))
}

fn contains((network, len): (Ipv4Addr, u8), ip: Ipv4Addr) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(network) & mask == u32::from(ip) & mask
}

impl Topology {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("topology {}", path.display()))?;
        let topology: Self = serde_saphyr::from_str(&text).with_context(|| format!("topology {}", path.display()))?;
        cidr(&topology.bridge).context("bridge")?;
        ensure!(!topology.nodes.is_empty(), "topology {}: no nodes", path.display());
        for node in &topology.nodes {
            cidr(&node.pod_cidr).with_context(|| format!("node {}: podCidr", node.name))?;
        }
        Ok(topology)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pods of the manifests in `directory`, checked against the topology.
    pub fn pods(&self, directory: &Path) -> anyhow::Result<Vec<Pod>> {
        let mut pods = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(directory)
            .with_context(|| format!("manifests {}", directory.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file)?;
            let mut reader = text.as_bytes();
            for (index, document) in serde_saphyr::read::<_, serde_json::Value>(&mut reader).enumerate() {
                let document = document.with_context(|| format!("{} document {index}", file.display()))?;
                if document.is_null() {
                    continue;
                }
                let where_ = || format!("{} document {index}", file.display());
                if let Object::Pod(pod) = objects::parse(document).with_context(where_)? {
                    pods.push(self.pod(&pod).with_context(where_)?);
                }
            }
        }
        for (i, pod) in pods.iter().enumerate() {
            if let Some(other) = pods[..i].iter().find(|p| p.ip == pod.ip) {
                bail!(
                    "pods {}/{} and {}/{} both have IP {}",
                    other.namespace,
                    other.name,
                    pod.namespace,
                    pod.name,
                    pod.ip
                );
            }
        }
        Ok(pods)
    }

    fn pod(&self, pod: &k8s_openapi::api::core::v1::Pod) -> anyhow::Result<Pod> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let id = format!("Pod {namespace}/{name}");
        let spec = pod.spec.as_ref().with_context(|| format!("{id}: no spec"))?;
        let node = spec
            .node_name
            .clone()
            .with_context(|| format!("{id}: spec.nodeName is required in the lab"))?;
        let Some(topology_node) = self.node(&node) else {
            bail!("{id}: spec.nodeName {node:?} is not a node of the topology");
        };
        let ip_text = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .with_context(|| format!("{id}: status.podIP is required in the lab"))?;
        let ip: Ipv4Addr = ip_text
            .parse()
            .with_context(|| format!("{id}: status.podIP {ip_text:?} is not IPv4"))?;
        let range = cidr(&topology_node.pod_cidr)?;
        ensure!(
            contains(range, ip),
            "{id}: status.podIP {ip} is outside {node}'s podCidr {}",
            topology_node.pod_cidr
        );
        let gateway = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("gateway.networking.k8s.io/gateway-name"))
            .cloned();
        let mut apps = Vec::new();
        for container in &spec.containers {
            let ports = container
                .ports
                .iter()
                .flatten()
                .filter_map(|p| u16::try_from(p.container_port).ok());
            match container.image.as_deref() {
                Some("mesh-lab/echo") => apps.extend(ports.map(App::Echo)),
                Some("mesh-lab/http") => apps.extend(ports.map(App::Http)),
                Some("mesh-lab/waypoint") => {
                    ensure!(
                        gateway.is_some(),
                        "{id}: a mesh-lab/waypoint pod needs the label gateway.networking.k8s.io/gateway-name"
                    );
                    apps.push(App::Waypoint);
                }
                _ => {}
            }
        }
        Ok(Pod {
            namespace,
            name,
            uid: pod.metadata.uid.clone(),
            node,
            ip,
            apps,
            service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
            gateway,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_topology_and_demo_agree() {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let topology = Topology::load(&here.join("topology.yaml")).unwrap();
        let pods = topology.pods(&here.join("manifests")).unwrap();
        let names: Vec<_> = pods
            .iter()
            .map(|p| format!("{}/{}@{}", p.namespace, p.name, p.node))
            .collect();
        assert_eq!(
            names,
            [
                "demo/client@node-1",
                "demo/server-1@node-2",
                "demo/server-2@node-2",
                "legacy/legacy-client@node-1",
                "legacy/legacy-server@node-1"
            ]
        );
        assert_eq!(pods[1].apps, [App::Echo(8080)]);
    }

    #[test]
    fn a_pod_outside_its_nodes_cidr_is_named() {
        let topology: Topology = serde_saphyr::from_str(
            "bridge: 10.10.0.254/24\ncontroller: 10.10.0.100\nnodes: [{name: n1, address: 10.10.0.1, podCidr: 10.11.1.0/24}]\n",
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("mesh-lab-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("p.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {nodeName: n1, containers: []}\nstatus: {podIP: 10.12.0.1}\n",
        )
        .unwrap();
        let error = topology.pods(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            format!("{error:#}").contains("Pod x/a: status.podIP 10.12.0.1 is outside n1's podCidr 10.11.1.0/24"),
            "{error:#}"
        );
    }
}
