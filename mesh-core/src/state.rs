//! What ztunnel knows from xDS: workloads, services and L4 policies, indexed the way the data path
//! asks (by address, VIP, uid, hostname), validated as they arrive so a bad resource is NACKed
//! instead of half-applied.

pub mod authorization;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use crate::proto::security::Authorization;
use crate::proto::workload::{Address, PortList, Service, TunnelProtocol, Workload, WorkloadStatus, address};
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::xds::{Handler, Rejection, Update};
use prost::Message;
use tokio::sync::watch;

/// An address within a network (the same IP may exist on two networks).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NetworkAddress {
    pub network: String,
    pub ip: IpAddr,
}

/// Everything received, indexed.
#[derive(Debug, Default)]
pub struct State {
    workloads: HashMap<String, Arc<Workload>>,
    workload_ips: HashMap<NetworkAddress, String>,
    services: HashMap<String, Arc<Service>>,
    service_vips: HashMap<NetworkAddress, String>,
    /// Service key (`ns/hostname`) → workload uid → the ports it serves for that service.
    endpoints: HashMap<String, BTreeMap<String, PortList>>,
    policies: HashMap<String, Arc<Authorization>>,
}

/// The IP in 4 or 16 raw bytes, as the protos carry it.
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

impl State {
    /// Adds or replaces a workload (by uid) after checking what the data path relies on.
    pub fn insert_workload(&mut self, workload: Workload) -> Result<(), String> {
        let ips = workload
            .addresses
            .iter()
            .map(|a| ip_from_bytes(a).ok_or_else(|| format!("address of {} bytes is not IPv4 or IPv6", a.len())))
            .collect::<Result<Vec<_>, _>>()?;
        TunnelProtocol::try_from(workload.tunnel_protocol)
            .map_err(|_| format!("unknown tunnel protocol {}", workload.tunnel_protocol))?;
        if let Some(key) = workload.services.keys().find(|k| !k.contains('/')) {
            return Err(format!("service key {key:?} is not namespace/hostname"));
        }
        if workload.waypoint.as_ref().is_some_and(|w| w.destination.is_none()) {
            return Err("waypoint without a destination".into());
        }
        self.remove_workload(&workload.uid);
        for ip in ips {
            self.workload_ips.insert(
                NetworkAddress {
                    network: workload.network.clone(),
                    ip,
                },
                workload.uid.clone(),
            );
        }
        for (service, ports) in &workload.services {
            self.endpoints
                .entry(service.clone())
                .or_default()
                .insert(workload.uid.clone(), ports.clone());
        }
        self.workloads.insert(workload.uid.clone(), Arc::new(workload));
        Ok(())
    }

    /// Adds or replaces a service (by `ns/hostname`).
    pub fn insert_service(&mut self, service: Service) -> Result<(), String> {
        let vips = service
            .addresses
            .iter()
            .map(|a| {
                let ip = ip_from_bytes(&a.address)
                    .ok_or_else(|| format!("VIP of {} bytes is not IPv4 or IPv6", a.address.len()))?;
                Ok(NetworkAddress {
                    network: a.network.clone(),
                    ip,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        if service.waypoint.as_ref().is_some_and(|w| w.destination.is_none()) {
            return Err("waypoint without a destination".into());
        }
        let key = service_key(&service);
        self.remove_service(&key);
        for vip in vips {
            self.service_vips.insert(vip, key.clone());
        }
        self.services.insert(key, Arc::new(service));
        Ok(())
    }

    /// Removes an Address resource: a workload uid, or a service's `ns/hostname`.
    pub fn remove_address(&mut self, name: &str) {
        if !self.remove_workload(name) {
            self.remove_service(name);
        }
    }

    fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        self.workload_ips.retain(|_, owner| owner != uid);
        for service in old.services.keys() {
            if let Some(endpoints) = self.endpoints.get_mut(service) {
                endpoints.remove(uid);
                if endpoints.is_empty() {
                    self.endpoints.remove(service);
                }
            }
        }
        true
    }

    fn remove_service(&mut self, key: &str) -> bool {
        let removed = self.services.remove(key).is_some();
        if removed {
            self.service_vips.retain(|_, owner| owner != key);
        }
        removed
    }

    pub fn insert_policy(&mut self, policy: Authorization) {
        self.policies
            .insert(format!("{}/{}", policy.namespace, policy.name), Arc::new(policy));
    }

    pub fn remove_policy(&mut self, name: &str) {
        self.policies.remove(name);
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn workload_by_ip(&self, address: &NetworkAddress) -> Option<&Arc<Workload>> {
        self.workloads.get(self.workload_ips.get(address)?)
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn service_by_vip(&self, address: &NetworkAddress) -> Option<&Arc<Service>> {
        self.services.get(self.service_vips.get(address)?)
    }

    /// The workloads behind a service, with the ports each serves for it.
    pub fn endpoints<'a>(&'a self, service: &Service) -> impl Iterator<Item = (&'a Arc<Workload>, &'a PortList)> + 'a {
        self.endpoints
            .get(&service_key(service))
            .into_iter()
            .flatten()
            .filter_map(|(uid, ports)| Some((self.workloads.get(uid)?, ports)))
    }

    /// The healthy endpoints of `service` for its port `port`, each with the address to reach it
    /// at (its first IP and the target port, a target port of 0 meaning the service port).
    pub fn healthy_endpoints(&self, service: &Service, port: u16) -> Vec<(Arc<Workload>, SocketAddr)> {
        let port = u32::from(port);
        self.endpoints(service)
            .filter(|(w, _)| w.status == WorkloadStatus::Healthy as i32)
            .filter_map(|(w, ports)| {
                let ip = ip_from_bytes(w.addresses.first()?)?;
                let target = ports
                    .ports
                    .iter()
                    .find(|p| p.service_port == port)
                    .map(|p| if p.target_port == 0 { port } else { p.target_port })?;
                Some((w.clone(), SocketAddr::new(ip, u16::try_from(target).ok()?)))
            })
            .collect()
    }

    /// A service `workload` serves on `port` (its target port), for metrics' destination_service.
    pub fn service_serving(&self, workload: &Workload, port: u16) -> Option<&Arc<Service>> {
        let port = u32::from(port);
        workload
            .services
            .iter()
            .find(|(_, ports)| {
                ports
                    .ports
                    .iter()
                    .any(|p| p.target_port == port || (p.target_port == 0 && p.service_port == port))
            })
            .and_then(|(key, _)| self.services.get(key))
    }

    /// The policies that apply to a workload: global ones, its namespace's, and those it lists.
    pub fn policies_for<'a>(&'a self, workload: &'a Workload) -> impl Iterator<Item = &'a Arc<Authorization>> + 'a {
        use crate::proto::security::Scope;
        let scoped = self.policies.values().filter(move |p| match Scope::try_from(p.scope) {
            Ok(Scope::Global) => true,
            Ok(Scope::Namespace) => p.namespace == workload.namespace,
            _ => false,
        });
        let listed = workload
            .authorization_policies
            .iter()
            .filter_map(|key| self.policies.get(key));
        scoped.chain(listed)
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        (self.workloads.len(), self.services.len(), self.policies.len())
    }
}

/// A workload's SPIFFE identity (Istio leaves the default trust domain and account empty).
pub fn identity_of(workload: &Workload) -> Result<crate::identity::SpiffeId, crate::identity::SpiffeIdError> {
    let trust_domain = if workload.trust_domain.is_empty() {
        "cluster.local"
    } else {
        &workload.trust_domain
    };
    let service_account = if workload.service_account.is_empty() {
        "default"
    } else {
        &workload.service_account
    };
    crate::identity::SpiffeId::new(trust_domain, workload.namespace.as_str(), service_account)
}

pub fn service_key(service: &Service) -> String {
    format!("{}/{}", service.namespace, service.hostname)
}

/// Applies xDS responses to shared state and tells watchers (the listener manager) it changed.
#[derive(Clone, Debug)]
pub struct StateHandler {
    pub state: Arc<RwLock<State>>,
    changed: watch::Sender<u64>,
}

impl StateHandler {
    /// The handler, and a receiver whose value counts the responses applied.
    pub fn new(state: Arc<RwLock<State>>) -> (Self, watch::Receiver<u64>) {
        let (changed, receiver) = watch::channel(0);
        (Self { state, changed }, receiver)
    }
}

impl Handler for StateHandler {
    fn apply(&mut self, type_url: &str, updates: Vec<Update>, removed: Vec<String>) -> Vec<Rejection> {
        let rejected = self.apply_to_state(type_url, updates, removed);
        self.changed.send_modify(|generation| *generation += 1);
        rejected
    }
}

impl StateHandler {
    fn apply_to_state(&mut self, type_url: &str, updates: Vec<Update>, removed: Vec<String>) -> Vec<Rejection> {
        let mut state = self.state.write().expect("not poisoned");
        let mut rejected = Vec::new();
        let mut reject = |name: String, reason: String| rejected.push(Rejection { name, reason });
        match type_url {
            ADDRESS_TYPE_URL => {
                for name in removed {
                    state.remove_address(&name);
                }
                for update in updates {
                    let result = match Address::decode(&*update.resource.value) {
                        Ok(Address {
                            r#type: Some(address::Type::Workload(w)),
                        }) => state.insert_workload(w),
                        Ok(Address {
                            r#type: Some(address::Type::Service(s)),
                        }) => state.insert_service(s),
                        Ok(Address { r#type: None }) => Err("Address has neither workload nor service".into()),
                        Err(e) => Err(format!("undecodable Address: {e}")),
                    };
                    if let Err(reason) = result {
                        reject(update.name, reason);
                    }
                }
            }
            AUTHORIZATION_TYPE_URL => {
                for name in removed {
                    state.remove_policy(&name);
                }
                for update in updates {
                    match Authorization::decode(&*update.resource.value) {
                        Ok(policy) => state.insert_policy(policy),
                        Err(e) => reject(update.name, format!("undecodable Authorization: {e}")),
                    }
                }
            }
            other => {
                for update in updates {
                    reject(update.name, format!("type {other} is not one ztunnel subscribes to"));
                }
            }
        }
        rejected
    }
}

#[cfg(test)]
mod tests {
    use crate::proto::workload::{GatewayAddress, NetworkAddress as ProtoAddress, Port};

    use super::*;

    fn ip(text: &str) -> Vec<u8> {
        match text.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }
    }

    fn at(text: &str) -> NetworkAddress {
        NetworkAddress {
            network: String::new(),
            ip: text.parse().unwrap(),
        }
    }

    fn pod(uid: &str, address: &str, service: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "demo".into(),
            addresses: vec![ip(address)],
            services: [(
                service.to_owned(),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: 8080,
                        ..Default::default()
                    }],
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    fn update(name: &str, message: &impl Message) -> Update {
        Update {
            name: name.into(),
            version: "1".into(),
            resource: prost_types::Any {
                type_url: String::new(),
                value: message.encode_to_vec(),
            },
        }
    }

    #[test]
    fn indexes_by_address_vip_and_service_and_forgets_removed() {
        let mut state = State::default();
        state
            .insert_workload(pod("a", "10.0.0.1", "demo/svc.demo.svc.cluster.local"))
            .unwrap();
        state
            .insert_workload(pod("b", "10.0.0.2", "demo/svc.demo.svc.cluster.local"))
            .unwrap();
        let service = Service {
            name: "svc".into(),
            namespace: "demo".into(),
            hostname: "svc.demo.svc.cluster.local".into(),
            addresses: vec![ProtoAddress {
                network: String::new(),
                address: ip("10.96.0.1"),
            }],
            ..Default::default()
        };
        state.insert_service(service.clone()).unwrap();
        assert_eq!(state.workload_by_ip(&at("10.0.0.2")).unwrap().uid, "b");
        assert_eq!(state.service_by_vip(&at("10.96.0.1")).unwrap().name, "svc");
        let endpoints: Vec<&str> = state.endpoints(&service).map(|(w, _)| w.uid.as_str()).collect();
        assert_eq!(endpoints, ["a", "b"]);

        // A workload that moves address is found only at the new one.
        state
            .insert_workload(pod("a", "10.0.0.9", "demo/svc.demo.svc.cluster.local"))
            .unwrap();
        assert!(state.workload_by_ip(&at("10.0.0.1")).is_none());
        assert_eq!(state.workload_by_ip(&at("10.0.0.9")).unwrap().uid, "a");

        state.remove_address("b");
        assert!(state.workload_by_ip(&at("10.0.0.2")).is_none());
        assert_eq!(state.endpoints(&service).count(), 1);
        state.remove_address("demo/svc.demo.svc.cluster.local");
        assert!(state.service_by_vip(&at("10.96.0.1")).is_none());
    }

    #[test]
    fn bad_resources_are_rejected_with_reasons_and_the_rest_applies() {
        let (mut handler, changes) = StateHandler::new(Arc::default());
        let good = Address {
            r#type: Some(address::Type::Workload(pod("good", "10.0.0.1", "demo/s"))),
        };
        let mut short = pod("short", "10.0.0.2", "demo/s");
        short.addresses = vec![vec![10, 0, 0]];
        let mut unkeyed = pod("unkeyed", "10.0.0.3", "nohostname");
        unkeyed.tunnel_protocol = 0;
        let mut waypointless = pod("wp", "10.0.0.4", "demo/s");
        waypointless.waypoint = Some(GatewayAddress {
            destination: None,
            hbone_mtls_port: 15008,
        });
        let updates = vec![
            update("good", &good),
            update(
                "short",
                &Address {
                    r#type: Some(address::Type::Workload(short)),
                },
            ),
            update(
                "unkeyed",
                &Address {
                    r#type: Some(address::Type::Workload(unkeyed)),
                },
            ),
            update(
                "wp",
                &Address {
                    r#type: Some(address::Type::Workload(waypointless)),
                },
            ),
            update("empty", &Address { r#type: None }),
        ];
        let rejected = handler.apply(ADDRESS_TYPE_URL, updates, Vec::new());
        let reasons: Vec<(String, String)> = rejected.into_iter().map(|r| (r.name, r.reason)).collect();
        assert_eq!(
            reasons,
            [
                ("short".to_owned(), "address of 3 bytes is not IPv4 or IPv6".to_owned()),
                (
                    "unkeyed".to_owned(),
                    "service key \"nohostname\" is not namespace/hostname".to_owned()
                ),
                ("wp".to_owned(), "waypoint without a destination".to_owned()),
                (
                    "empty".to_owned(),
                    "Address has neither workload nor service".to_owned()
                ),
            ]
        );
        assert_eq!(*changes.borrow(), 1, "watchers are told");
        let state = handler.state.read().unwrap();
        assert_eq!(state.counts(), (1, 0, 0));
        assert!(state.workload("good").is_some());
    }
}
