//! Waypoint deployment, as Istio's controller does it for a Gateway of class `istio-waypoint`: a
//! Gateway that no pod serves gets one, in a pod namespace of its own on the first node, with
//! its Service, written beside the configuration (so the controller knows the pod and the CA
//! signs for it); a Gateway that goes away takes its deployment with it.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::Context as _;

use crate::plan::{App, Pod};
use crate::runner::{Lab, wait_ready};

/// `(namespace, name)` of every Gateway of class `istio-waypoint` in `dir`.
pub fn declared(dir: &Path) -> anyhow::Result<BTreeSet<(String, String)>> {
    let mut gateways = BTreeSet::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .flatten()
    {
        let path = entry.path();
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let mut reader = text.as_bytes();
        for document in serde_saphyr::read::<_, serde_json::Value>(&mut reader) {
            let Ok(document) = document else { break };
            if document["kind"] == "Gateway" && document["spec"]["gatewayClassName"] == "istio-waypoint" {
                let field = |k: &str| document["metadata"][k].as_str().unwrap_or_default().to_owned();
                gateways.insert((field("namespace"), field("name")));
            }
        }
    }
    Ok(gateways)
}

fn file_name(namespace: &str, gateway: &str) -> String {
    format!("zz-lab-waypoint-{namespace}-{gateway}.yaml")
}

impl Lab {
    /// Deploys a waypoint for each declared Gateway no pod serves, removes the ones the lab
    /// deployed whose Gateway is gone. What it did, for the record.
    pub fn reconcile_waypoints(&mut self) -> anyhow::Result<Vec<String>> {
        let declared = declared(&self.config_dir())?;
        let served: BTreeSet<(String, String)> = self
            .pods
            .iter()
            .filter(|p| p.apps.contains(&App::Waypoint))
            .filter_map(|p| Some((p.namespace.clone(), p.gateway.clone()?)))
            .collect();
        let mut done = Vec::new();
        let gone: Vec<_> = self
            .deployed
            .keys()
            .filter(|k| !declared.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.undeploy(&key)?;
            done.push(format!("removed waypoint {}/{}", key.0, key.1));
        }
        for key in declared {
            if !served.contains(&key) {
                self.deploy(&key)?;
                done.push(format!("deployed waypoint {}/{}", key.0, key.1));
            }
        }
        Ok(done)
    }

    /// The first free address from .200 of the first node's pod CIDR.
    fn free_ip(&self) -> anyhow::Result<Ipv4Addr> {
        let node = &self.topology.nodes[0];
        let base = node
            .pod_cidr
            .split('/')
            .next()
            .unwrap_or_default()
            .parse::<Ipv4Addr>()?;
        (200u32..250)
            .map(|offset| Ipv4Addr::from(u32::from(base) + offset))
            .find(|ip| !self.pods.iter().any(|p| p.ip == *ip))
            .context("no free address for a waypoint")
    }

    fn deploy(&mut self, (namespace, gateway): &(String, String)) -> anyhow::Result<()> {
        let node = self.topology.nodes[0].name.clone();
        let ip = self.free_ip()?;
        let slot = u32::from(ip) & 0xff;
        let pod = Pod {
            namespace: namespace.clone(),
            name: format!("{gateway}-0"),
            uid: None,
            node: node.clone(),
            ip,
            apps: vec![App::Waypoint],
            service_account: gateway.clone(),
            gateway: Some(gateway.clone()),
        };
        let manifests = format!(
            "# Deployed by the lab for Gateway {namespace}/{gateway}.\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{gateway.networking.k8s.io/gateway-name: {gateway}, istio.io/dataplane-mode: none}}}}\nspec: {{serviceAccountName: {gateway}, nodeName: {node}, containers: [{{name: proxy, image: mesh-lab/waypoint}}]}}\nstatus: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {gateway}, namespace: {namespace}}}\nspec: {{selector: {{gateway.networking.k8s.io/gateway-name: {gateway}}}, clusterIP: 10.96.255.{slot}, ports: [{{name: mesh, port: 15008}}]}}\n",
            name = pod.name
        );
        // The manifest first: the node agent reads the pod from it at ADD (and istiod-lite signs
        // for it only once it knows the pod).
        let path = self.config_dir().join(file_name(namespace, gateway));
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, manifests)?;
        std::fs::rename(&temporary, &path)?;
        self.pods.push(pod.clone());
        self.start_pod(&pod)?;
        self.deployed
            .insert((namespace.clone(), gateway.clone()), pod.name.clone());
        wait_ready(
            &self.names.network(),
            SocketAddr::from((ip, 15021)),
            &format!("waypoint {namespace}/{gateway}"),
        )
    }

    fn undeploy(&mut self, key: &(String, String)) -> anyhow::Result<()> {
        let Some(name) = self.deployed.remove(key) else {
            return Ok(());
        };
        let (namespace, gateway) = key;
        self.stop_pod(namespace, &name)?;
        let _ = std::fs::remove_file(self.config_dir().join(file_name(namespace, gateway)));
        self.pods.retain(|p| !(p.namespace == *namespace && p.name == name));
        Ok(())
    }
}
