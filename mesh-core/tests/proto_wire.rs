//! Wire-compatibility tests for the Istio-compatible protos.
//!
//! Every input here is protobuf bytes written BY HAND from the field numbers and enum
//! values published upstream (istio/ztunnel `proto/workload.proto` and
//! `proto/authorization.proto`, istio/istio `pkg/workloadapi`, envoyproxy/data-plane-api
//! `envoy/service/discovery/v3/discovery.proto`, istio/api `security/v1alpha1/ca.proto`).
//! Nothing is derived from our generated code, so a wrong field number, wire type or enum
//! value in our `.proto` files makes these tests fail. Every field gets a distinct value so
//! that two swapped numbers are caught too.

use std::collections::BTreeMap;

use prost::Message;

// ---------------------------------------------------------------------------------------------
// A tiny protobuf writer: tag = (field_number << 3) | wire_type.
// ---------------------------------------------------------------------------------------------

const WIRE_VARINT: u64 = 0;
const WIRE_LEN: u64 = 2;

/// Hand-rolled protobuf message writer.
#[derive(Debug, Default, Clone)]
struct Pb(Vec<u8>);

impl Pb {
    fn new() -> Self {
        Self::default()
    }

    fn raw_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire_type: u64) {
        self.raw_varint((u64::from(field) << 3) | wire_type);
    }

    /// Varint field (int32/int64/uint32/bool/enum).
    fn varint(mut self, field: u32, v: u64) -> Self {
        self.key(field, WIRE_VARINT);
        self.raw_varint(v);
        self
    }

    /// Length-delimited field (bytes/string/message/packed).
    fn bytes(mut self, field: u32, b: &[u8]) -> Self {
        self.key(field, WIRE_LEN);
        self.raw_varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    fn string(self, field: u32, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }

    fn msg(self, field: u32, m: Pb) -> Self {
        self.bytes(field, &m.0)
    }

    /// Packed repeated varints (the proto3 default encoding for repeated scalars/enums).
    fn packed(self, field: u32, vals: &[u64]) -> Self {
        let mut inner = Pb::new();
        for v in vals {
            inner.raw_varint(*v);
        }
        self.bytes(field, &inner.0)
    }

    fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Field numbers and enum values as published by Istio / Envoy (NOT taken from our protos).
mod istio {
    pub mod address {
        pub const WORKLOAD: u32 = 1;
        pub const SERVICE: u32 = 2;
    }
    pub mod workload {
        pub const NAME: u32 = 1;
        pub const NAMESPACE: u32 = 2;
        pub const ADDRESSES: u32 = 3;
        pub const NETWORK: u32 = 4;
        pub const TUNNEL_PROTOCOL: u32 = 5;
        pub const TRUST_DOMAIN: u32 = 6;
        pub const SERVICE_ACCOUNT: u32 = 7;
        pub const WAYPOINT: u32 = 8;
        pub const NODE: u32 = 9;
        pub const CANONICAL_NAME: u32 = 10;
        pub const CANONICAL_REVISION: u32 = 11;
        pub const WORKLOAD_TYPE: u32 = 12;
        pub const WORKLOAD_NAME: u32 = 13;
        pub const NATIVE_TUNNEL: u32 = 14;
        /// Removed upstream (old `virtual_ips` map); must be skipped, not misparsed.
        pub const RESERVED_VIRTUAL_IPS: u32 = 15;
        pub const AUTHORIZATION_POLICIES: u32 = 16;
        pub const STATUS: u32 = 17;
        pub const CLUSTER_ID: u32 = 18;
        pub const NETWORK_GATEWAY: u32 = 19;
        pub const UID: u32 = 20;
        pub const HOSTNAME: u32 = 21;
        pub const SERVICES: u32 = 22;
        pub const APPLICATION_TUNNEL: u32 = 23;
        pub const LOCALITY: u32 = 24;
        pub const NETWORK_MODE: u32 = 25;
        pub const EXTENSIONS: u32 = 26;
        pub const CAPACITY: u32 = 27;
    }
    pub mod service {
        pub const NAME: u32 = 1;
        pub const NAMESPACE: u32 = 2;
        pub const HOSTNAME: u32 = 3;
        pub const ADDRESSES: u32 = 4;
        pub const PORTS: u32 = 5;
        pub const SUBJECT_ALT_NAMES: u32 = 6;
        pub const WAYPOINT: u32 = 7;
        pub const LOAD_BALANCING: u32 = 8;
        pub const IP_FAMILIES: u32 = 9;
        pub const EXTENSIONS: u32 = 10;
        pub const CANONICAL: u32 = 11;
        pub const INGRESS_USE_WAYPOINT: u32 = 12;
    }
    pub mod load_balancing {
        pub const ROUTING_PREFERENCE: u32 = 1;
        pub const MODE: u32 = 2;
        pub const HEALTH_POLICY: u32 = 3;
        pub const DNS_CONNECT_STRATEGY: u32 = 4;
        // enum Scope
        pub const SCOPE_REGION: u64 = 1;
        pub const SCOPE_ZONE: u64 = 2;
        pub const SCOPE_NETWORK: u64 = 6;
        // enum Mode
        pub const MODE_FAILOVER: u64 = 2;
        // enum HealthPolicy
        pub const HEALTH_ALLOW_ALL: u64 = 1;
        // enum DnsConnectStrategy
        pub const DNS_FIRST_HEALTHY_RACE: u64 = 1;
    }
    pub mod port_list {
        pub const PORTS: u32 = 1;
    }
    pub mod port {
        pub const SERVICE_PORT: u32 = 1;
        pub const TARGET_PORT: u32 = 2;
        pub const APP_PROTOCOL: u32 = 3;
    }
    pub mod gateway_address {
        pub const HOSTNAME: u32 = 1;
        pub const ADDRESS: u32 = 2;
        pub const HBONE_MTLS_PORT: u32 = 3;
    }
    pub mod network_address {
        pub const NETWORK: u32 = 1;
        pub const ADDRESS: u32 = 2;
    }
    pub mod namespaced_hostname {
        pub const NAMESPACE: u32 = 1;
        pub const HOSTNAME: u32 = 2;
    }
    pub mod application_tunnel {
        pub const PROTOCOL: u32 = 1;
        pub const PORT: u32 = 2;
        pub const PROTOCOL_PROXY: u64 = 1;
    }
    pub mod locality {
        pub const REGION: u32 = 1;
        pub const ZONE: u32 = 2;
        pub const SUBZONE: u32 = 3;
    }
    pub mod extension {
        pub const NAME: u32 = 1;
        pub const CONFIG: u32 = 2;
    }
    /// google.protobuf.Any
    pub mod any {
        pub const TYPE_URL: u32 = 1;
        pub const VALUE: u32 = 2;
    }
    /// google.protobuf.UInt32Value / google.protobuf.Duration.seconds
    pub mod wrapper {
        pub const VALUE: u32 = 1;
    }
    /// Map entries are messages { key = 1; value = 2; }.
    pub mod map_entry {
        pub const KEY: u32 = 1;
        pub const VALUE: u32 = 2;
    }
    pub mod enums {
        pub const TUNNEL_HBONE: u64 = 1;
        pub const WORKLOAD_TYPE_POD: u64 = 2;
        pub const WORKLOAD_STATUS_UNHEALTHY: u64 = 1;
        pub const NETWORK_MODE_HOST_NETWORK: u64 = 1;
        pub const IP_FAMILIES_DUAL: u64 = 3;
        pub const APP_PROTOCOL_HTTP2: u64 = 2;
    }

    /// istio.security
    pub mod authz {
        pub const NAME: u32 = 1;
        pub const NAMESPACE: u32 = 2;
        pub const SCOPE: u32 = 3;
        pub const ACTION: u32 = 4;
        pub const RULES: u32 = 5;
        pub const SCOPE_NAMESPACE: u64 = 1;
        pub const ACTION_DENY: u64 = 1;
    }
    pub mod rule {
        pub const CLAUSES: u32 = 1;
    }
    pub mod clause {
        pub const MATCHES: u32 = 2;
    }
    pub mod matches {
        pub const NAMESPACES: u32 = 1;
        pub const NOT_NAMESPACES: u32 = 2;
        pub const PRINCIPALS: u32 = 3;
        pub const NOT_PRINCIPALS: u32 = 4;
        pub const SOURCE_IPS: u32 = 5;
        pub const NOT_SOURCE_IPS: u32 = 6;
        pub const DESTINATION_IPS: u32 = 7;
        pub const NOT_DESTINATION_IPS: u32 = 8;
        pub const DESTINATION_PORTS: u32 = 9;
        pub const NOT_DESTINATION_PORTS: u32 = 10;
        pub const SERVICE_ACCOUNTS: u32 = 11;
        pub const NOT_SERVICE_ACCOUNTS: u32 = 12;
    }
    pub mod cidr {
        pub const ADDRESS: u32 = 1;
        pub const LENGTH: u32 = 2;
    }
    pub mod sa_match {
        pub const NAMESPACE: u32 = 1;
        pub const SERVICE_ACCOUNT: u32 = 2;
    }
    pub mod string_match {
        pub const EXACT: u32 = 1;
        pub const PREFIX: u32 = 2;
        pub const SUFFIX: u32 = 3;
        pub const PRESENCE: u32 = 4;
    }
}

/// envoy.service.discovery.v3 / envoy.config.core.v3 / google.rpc field numbers.
mod envoy {
    pub mod delta_request {
        pub const NODE: u32 = 1;
        pub const TYPE_URL: u32 = 2;
        pub const RESOURCE_NAMES_SUBSCRIBE: u32 = 3;
        pub const RESOURCE_NAMES_UNSUBSCRIBE: u32 = 4;
        pub const INITIAL_RESOURCE_VERSIONS: u32 = 5;
        pub const RESPONSE_NONCE: u32 = 6;
        pub const ERROR_DETAIL: u32 = 7;
    }
    pub mod delta_response {
        pub const SYSTEM_VERSION_INFO: u32 = 1;
        pub const RESOURCES: u32 = 2;
        pub const TYPE_URL: u32 = 4;
        pub const NONCE: u32 = 5;
        pub const REMOVED_RESOURCES: u32 = 6;
        pub const CONTROL_PLANE: u32 = 7;
    }
    pub mod resource {
        pub const VERSION: u32 = 1;
        pub const RESOURCE: u32 = 2;
        pub const NAME: u32 = 3;
        pub const ALIASES: u32 = 4;
        pub const TTL: u32 = 6;
        pub const CACHE_CONTROL: u32 = 7;
        pub const DO_NOT_CACHE: u32 = 1;
    }
    pub mod node {
        pub const ID: u32 = 1;
        pub const CLUSTER: u32 = 2;
        pub const LOCALITY: u32 = 4;
        pub const USER_AGENT_NAME: u32 = 6;
        pub const CLIENT_FEATURES: u32 = 10;
        pub const LOCALITY_REGION: u32 = 1;
        pub const LOCALITY_ZONE: u32 = 2;
        pub const LOCALITY_SUB_ZONE: u32 = 3;
    }
    pub mod control_plane {
        pub const IDENTIFIER: u32 = 1;
    }
    pub mod status {
        pub const CODE: u32 = 1;
        pub const MESSAGE: u32 = 2;
    }
    pub mod ca_request {
        pub const CSR: u32 = 1;
        pub const VALIDITY_DURATION: u32 = 3;
    }
    pub mod ca_response {
        pub const CERT_CHAIN: u32 = 1;
        pub const ROOT_CERT: u32 = 2;
        pub const ROOTS_CA_CERT: u32 = 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

const WL_UID: &str = "Kubernetes//Pod/bookinfo/productpage-v1-7d9f8b6c5-x2k4p";
const WL_NAME: &str = "productpage-v1-7d9f8b6c5-x2k4p";
const WL_NAMESPACE: &str = "bookinfo";
const WL_IP4: [u8; 4] = [10, 244, 1, 17];
const WL_IP6: [u8; 16] = [0xfd, 0, 0x10, 0x2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x1, 0x11];
const WL_HOSTNAME: &str = "productpage-0.productpage.bookinfo.svc.cluster.local";
const WL_NETWORK: &str = "network-west";
const WL_TRUST_DOMAIN: &str = "td.example";
const WL_SA: &str = "bookinfo-productpage";
const WL_NODE: &str = "worker-node-3";
const WL_CANONICAL_NAME: &str = "productpage";
const WL_CANONICAL_REVISION: &str = "v1";
const WL_WORKLOAD_NAME: &str = "productpage-v1";
const WL_CLUSTER: &str = "cluster-west";
const WL_POLICY: &str = "bookinfo/allow-gateway";
const WL_SVC_KEY: &str = "bookinfo/productpage.bookinfo.svc.cluster.local";
const WAYPOINT_IP: [u8; 4] = [10, 244, 2, 99];
const WAYPOINT_NETWORK: &str = "network-waypoint";

const SVC_NAME: &str = "reviews";
const SVC_NAMESPACE: &str = "bookinfo";
const SVC_HOSTNAME: &str = "reviews.bookinfo.svc.cluster.local";
const SVC_VIP4: [u8; 4] = [10, 96, 12, 34];
const SVC_VIP6: [u8; 16] = [0xfd, 0, 0x10, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
const SVC_SAN_1: &str = "spiffe://td.example/ns/bookinfo/sa/reviews";
const SVC_SAN_2: &str = "spiffe://td.example/ns/bookinfo/sa/reviews-canary";

fn namespaced_hostname(ns: &str, host: &str) -> Pb {
    use istio::namespaced_hostname as f;
    Pb::new().string(f::NAMESPACE, ns).string(f::HOSTNAME, host)
}

fn network_address(network: &str, ip: &[u8]) -> Pb {
    use istio::network_address as f;
    Pb::new().string(f::NETWORK, network).bytes(f::ADDRESS, ip)
}

fn port(service_port: u64, target_port: u64) -> Pb {
    use istio::port as f;
    Pb::new()
        .varint(f::SERVICE_PORT, service_port)
        .varint(f::TARGET_PORT, target_port)
}

/// Address{workload: Workload{...}} exactly as istiod would put it on the wire.
fn workload_address_bytes() -> Vec<u8> {
    use istio::workload as f;

    let waypoint = Pb::new()
        .msg(
            istio::gateway_address::ADDRESS,
            network_address(WAYPOINT_NETWORK, &WAYPOINT_IP),
        )
        .varint(istio::gateway_address::HBONE_MTLS_PORT, 15008);
    let network_gateway = Pb::new()
        .msg(
            istio::gateway_address::HOSTNAME,
            namespaced_hostname("istio-system", "eastwest.istio-system.svc.cluster.local"),
        )
        .varint(istio::gateway_address::HBONE_MTLS_PORT, 15009);
    let services_entry = Pb::new().string(istio::map_entry::KEY, WL_SVC_KEY).msg(
        istio::map_entry::VALUE,
        Pb::new().msg(istio::port_list::PORTS, port(9080, 9081)),
    );
    let app_tunnel = Pb::new()
        .varint(
            istio::application_tunnel::PROTOCOL,
            istio::application_tunnel::PROTOCOL_PROXY,
        )
        .varint(istio::application_tunnel::PORT, 15088);
    let locality = Pb::new()
        .string(istio::locality::REGION, "us-west1")
        .string(istio::locality::ZONE, "us-west1-b")
        .string(istio::locality::SUBZONE, "rack-7");
    let extension = Pb::new().string(istio::extension::NAME, "example.com/ext").msg(
        istio::extension::CONFIG,
        Pb::new()
            .string(istio::any::TYPE_URL, "type.googleapis.com/google.protobuf.StringValue")
            .bytes(istio::any::VALUE, &[0x0a, 0x02, b'h', b'i']),
    );
    // What an older istiod sends in the now-reserved field 15 (virtual_ips map entry).
    let legacy_virtual_ip = Pb::new().string(istio::map_entry::KEY, "10.96.0.1").msg(
        istio::map_entry::VALUE,
        Pb::new().msg(istio::port_list::PORTS, port(1, 2)),
    );

    // Deliberately NOT in field-number order: decoders must not care.
    let workload = Pb::new()
        .string(f::UID, WL_UID)
        .string(f::NAME, WL_NAME)
        .string(f::NAMESPACE, WL_NAMESPACE)
        .bytes(f::ADDRESSES, &WL_IP4)
        .bytes(f::ADDRESSES, &WL_IP6)
        .string(f::HOSTNAME, WL_HOSTNAME)
        .string(f::NETWORK, WL_NETWORK)
        .varint(f::TUNNEL_PROTOCOL, istio::enums::TUNNEL_HBONE)
        .string(f::TRUST_DOMAIN, WL_TRUST_DOMAIN)
        .string(f::SERVICE_ACCOUNT, WL_SA)
        .msg(f::WAYPOINT, waypoint)
        .msg(f::NETWORK_GATEWAY, network_gateway)
        .string(f::NODE, WL_NODE)
        .string(f::CANONICAL_NAME, WL_CANONICAL_NAME)
        .string(f::CANONICAL_REVISION, WL_CANONICAL_REVISION)
        .varint(f::WORKLOAD_TYPE, istio::enums::WORKLOAD_TYPE_POD)
        .string(f::WORKLOAD_NAME, WL_WORKLOAD_NAME)
        .varint(f::NATIVE_TUNNEL, 1)
        .msg(f::APPLICATION_TUNNEL, app_tunnel)
        .msg(f::SERVICES, services_entry)
        .msg(f::RESERVED_VIRTUAL_IPS, legacy_virtual_ip)
        .string(f::AUTHORIZATION_POLICIES, WL_POLICY)
        .varint(f::STATUS, istio::enums::WORKLOAD_STATUS_UNHEALTHY)
        .string(f::CLUSTER_ID, WL_CLUSTER)
        .msg(f::LOCALITY, locality)
        .varint(f::NETWORK_MODE, istio::enums::NETWORK_MODE_HOST_NETWORK)
        .msg(f::EXTENSIONS, extension)
        .msg(f::CAPACITY, Pb::new().varint(istio::wrapper::VALUE, 7));

    Pb::new().msg(istio::address::WORKLOAD, workload).into_bytes()
}

/// Address{service: Service{...}} exactly as istiod would put it on the wire.
fn service_address_bytes() -> Vec<u8> {
    use istio::load_balancing as lb;
    use istio::service as f;

    let waypoint = Pb::new()
        .msg(
            istio::gateway_address::HOSTNAME,
            namespaced_hostname(SVC_NAMESPACE, "waypoint.bookinfo.svc.cluster.local"),
        )
        .varint(istio::gateway_address::HBONE_MTLS_PORT, 15008);
    let load_balancing = Pb::new()
        .packed(
            lb::ROUTING_PREFERENCE,
            &[lb::SCOPE_NETWORK, lb::SCOPE_REGION, lb::SCOPE_ZONE],
        )
        .varint(lb::MODE, lb::MODE_FAILOVER)
        .varint(lb::HEALTH_POLICY, lb::HEALTH_ALLOW_ALL)
        .varint(lb::DNS_CONNECT_STRATEGY, lb::DNS_FIRST_HEALTHY_RACE);
    let http_port = port(9080, 9090).varint(istio::port::APP_PROTOCOL, istio::enums::APP_PROTOCOL_HTTP2);

    let service = Pb::new()
        .string(f::NAME, SVC_NAME)
        .string(f::NAMESPACE, SVC_NAMESPACE)
        .string(f::HOSTNAME, SVC_HOSTNAME)
        .msg(f::ADDRESSES, network_address("network-west", &SVC_VIP4))
        .msg(f::ADDRESSES, network_address("network-east", &SVC_VIP6))
        .msg(f::PORTS, http_port)
        .msg(f::PORTS, port(15443, 8443))
        .string(f::SUBJECT_ALT_NAMES, SVC_SAN_1)
        .string(f::SUBJECT_ALT_NAMES, SVC_SAN_2)
        .msg(f::WAYPOINT, waypoint)
        .msg(f::LOAD_BALANCING, load_balancing)
        .varint(f::IP_FAMILIES, istio::enums::IP_FAMILIES_DUAL)
        .msg(f::EXTENSIONS, Pb::new().string(istio::extension::NAME, "svc-ext"))
        .varint(f::CANONICAL, 1)
        .varint(f::INGRESS_USE_WAYPOINT, 1);

    Pb::new().msg(istio::address::SERVICE, service).into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The writer itself must produce canonical protobuf (examples from the protobuf encoding docs).
#[test]
fn hand_writer_matches_protobuf_spec() {
    // field 1, varint 150 -> 08 96 01
    assert_eq!(Pb::new().varint(1, 150).into_bytes(), vec![0x08, 0x96, 0x01]);
    // field 2, string "testing" -> 12 07 74 65 73 74 69 6e 67
    assert_eq!(
        Pb::new().string(2, "testing").into_bytes(),
        vec![0x12, 0x07, 0x74, 0x65, 0x73, 0x74, 0x69, 0x6e, 0x67]
    );
    // field 20 (Workload.uid), LEN -> key 160|2 = 162 = a2 01
    assert_eq!(Pb::new().string(20, "").into_bytes(), vec![0xa2, 0x01, 0x00]);
    // packed [3, 270, 86942] in field 4 -> 22 06 03 8e 02 9e a7 05
    assert_eq!(
        Pb::new().packed(4, &[3, 270, 86942]).into_bytes(),
        vec![0x22, 0x06, 0x03, 0x8e, 0x02, 0x9e, 0xa7, 0x05]
    );
}

#[test]
fn decodes_istio_workload_address() {
    use mesh_core::proto::workload::{
        Address, NetworkMode, TunnelProtocol, WorkloadStatus, WorkloadType, address, application_tunnel,
        gateway_address,
    };

    let bytes = workload_address_bytes();
    let addr = Address::decode(bytes.as_slice()).expect("istiod workload bytes must decode");
    let w = match addr.r#type {
        Some(address::Type::Workload(w)) => w,
        other => panic!("expected Address.workload (field 1), got {other:?}"),
    };

    assert_eq!(w.uid, WL_UID);
    assert_eq!(w.name, WL_NAME);
    assert_eq!(w.namespace, WL_NAMESPACE);
    assert_eq!(w.addresses, vec![WL_IP4.to_vec(), WL_IP6.to_vec()]);
    assert_eq!(w.addresses[0].len(), 4, "IPv4 is carried as 4 raw bytes");
    assert_eq!(w.hostname, WL_HOSTNAME);
    assert_eq!(w.network, WL_NETWORK);
    assert_eq!(w.tunnel_protocol, istio::enums::TUNNEL_HBONE as i32);
    assert_eq!(w.tunnel_protocol(), TunnelProtocol::Hbone);
    assert_eq!(w.trust_domain, WL_TRUST_DOMAIN);
    assert_eq!(w.service_account, WL_SA);
    assert_eq!(w.node, WL_NODE);
    assert_eq!(w.canonical_name, WL_CANONICAL_NAME);
    assert_eq!(w.canonical_revision, WL_CANONICAL_REVISION);
    assert_eq!(w.workload_name, WL_WORKLOAD_NAME);
    assert_eq!(w.workload_type, istio::enums::WORKLOAD_TYPE_POD as i32);
    assert_eq!(w.workload_type(), WorkloadType::Pod);
    assert!(w.native_tunnel);
    assert_eq!(w.status, istio::enums::WORKLOAD_STATUS_UNHEALTHY as i32);
    assert_eq!(w.status(), WorkloadStatus::Unhealthy);
    assert_eq!(w.cluster_id, WL_CLUSTER);
    assert_eq!(w.authorization_policies, vec![WL_POLICY.to_string()]);
    assert_eq!(w.network_mode(), NetworkMode::HostNetwork);
    assert_eq!(w.capacity, Some(7));

    // services: map<string, PortList>
    assert_eq!(w.services.len(), 1, "reserved field 15 must not leak into services");
    let ports = &w.services.get(WL_SVC_KEY).expect("services entry").ports;
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].service_port, 9080);
    assert_eq!(ports[0].target_port, 9081);
    assert_eq!(ports[0].app_protocol, 0);

    // waypoint: GatewayAddress{address: NetworkAddress, hbone_mtls_port}
    let wp = w.waypoint.as_ref().expect("waypoint");
    assert_eq!(wp.hbone_mtls_port, 15008);
    match &wp.destination {
        Some(gateway_address::Destination::Address(na)) => {
            assert_eq!(na.network, WAYPOINT_NETWORK);
            assert_eq!(na.address, WAYPOINT_IP.to_vec());
        }
        other => panic!("expected GatewayAddress.address (field 2), got {other:?}"),
    }

    // network_gateway: GatewayAddress{hostname: NamespacedHostname}
    let gw = w.network_gateway.as_ref().expect("network_gateway");
    assert_eq!(gw.hbone_mtls_port, 15009);
    match &gw.destination {
        Some(gateway_address::Destination::Hostname(h)) => {
            assert_eq!(h.namespace, "istio-system");
            assert_eq!(h.hostname, "eastwest.istio-system.svc.cluster.local");
        }
        other => panic!("expected GatewayAddress.hostname (field 1), got {other:?}"),
    }

    let at = w.application_tunnel.as_ref().expect("application_tunnel");
    assert_eq!(at.protocol(), application_tunnel::Protocol::Proxy);
    assert_eq!(at.port, 15088);

    let loc = w.locality.as_ref().expect("locality");
    assert_eq!(
        (loc.region.as_str(), loc.zone.as_str(), loc.subzone.as_str()),
        ("us-west1", "us-west1-b", "rack-7")
    );

    assert_eq!(w.extensions.len(), 1);
    assert_eq!(w.extensions[0].name, "example.com/ext");
    let cfg = w.extensions[0].config.as_ref().expect("extension config");
    assert_eq!(cfg.type_url, "type.googleapis.com/google.protobuf.StringValue");
    assert_eq!(cfg.value, vec![0x0a, 0x02, b'h', b'i']);
}

#[test]
fn decodes_istio_service_address() {
    use mesh_core::proto::workload::{Address, AppProtocol, IpFamilies, address, gateway_address, load_balancing};

    let bytes = service_address_bytes();
    let addr = Address::decode(bytes.as_slice()).expect("istiod service bytes must decode");
    let s = match addr.r#type {
        Some(address::Type::Service(s)) => s,
        other => panic!("expected Address.service (field 2), got {other:?}"),
    };

    assert_eq!(s.name, SVC_NAME);
    assert_eq!(s.namespace, SVC_NAMESPACE);
    assert_eq!(s.hostname, SVC_HOSTNAME);

    assert_eq!(s.addresses.len(), 2);
    assert_eq!(s.addresses[0].network, "network-west");
    assert_eq!(s.addresses[0].address, SVC_VIP4.to_vec());
    assert_eq!(s.addresses[1].network, "network-east");
    assert_eq!(s.addresses[1].address, SVC_VIP6.to_vec());

    let ports: Vec<(u32, u32, i32)> = s
        .ports
        .iter()
        .map(|p| (p.service_port, p.target_port, p.app_protocol))
        .collect();
    assert_eq!(ports, vec![(9080, 9090, 2), (15443, 8443, 0)]);
    assert_eq!(s.ports[0].app_protocol(), AppProtocol::Http2);

    assert_eq!(s.subject_alt_names, vec![SVC_SAN_1.to_string(), SVC_SAN_2.to_string()]);

    let wp = s.waypoint.as_ref().expect("waypoint");
    assert_eq!(wp.hbone_mtls_port, 15008);
    match &wp.destination {
        Some(gateway_address::Destination::Hostname(h)) => {
            assert_eq!(h.namespace, SVC_NAMESPACE);
            assert_eq!(h.hostname, "waypoint.bookinfo.svc.cluster.local");
        }
        other => panic!("expected GatewayAddress.hostname (field 1), got {other:?}"),
    }

    let lb = s.load_balancing.as_ref().expect("load_balancing");
    assert_eq!(lb.routing_preference, vec![6, 1, 2]);
    assert_eq!(
        lb.routing_preference().collect::<Vec<_>>(),
        vec![
            load_balancing::Scope::Network,
            load_balancing::Scope::Region,
            load_balancing::Scope::Zone
        ]
    );
    assert_eq!(lb.mode(), load_balancing::Mode::Failover);
    assert_eq!(lb.health_policy(), load_balancing::HealthPolicy::AllowAll);
    assert_eq!(
        lb.dns_connect_strategy(),
        load_balancing::DnsConnectStrategy::FirstHealthyRace
    );

    assert_eq!(s.ip_families, istio::enums::IP_FAMILIES_DUAL as i32);
    assert_eq!(s.ip_families(), IpFamilies::Dual);
    assert_eq!(s.extensions.len(), 1);
    assert_eq!(s.extensions[0].name, "svc-ext");
    assert!(s.extensions[0].config.is_none());
    assert!(s.canonical);
    assert!(s.ingress_use_waypoint);
}

/// Unpacked repeated scalars are also legal on the wire and must be accepted.
#[test]
fn accepts_unpacked_routing_preference() {
    use mesh_core::proto::workload::{Address, address};

    let lb = Pb::new()
        .varint(
            istio::load_balancing::ROUTING_PREFERENCE,
            istio::load_balancing::SCOPE_ZONE,
        )
        .varint(
            istio::load_balancing::ROUTING_PREFERENCE,
            istio::load_balancing::SCOPE_REGION,
        );
    let svc = Pb::new()
        .string(istio::service::NAME, "x")
        .msg(istio::service::LOAD_BALANCING, lb);
    let bytes = Pb::new().msg(istio::address::SERVICE, svc).into_bytes();

    let addr = Address::decode(bytes.as_slice()).expect("decode");
    let Some(address::Type::Service(s)) = addr.r#type else {
        panic!("expected service");
    };
    assert_eq!(s.load_balancing.expect("lb").routing_preference, vec![2, 1]);
}

#[test]
fn decodes_istio_authorization() {
    use istio::{authz, cidr, clause, matches as m, rule, sa_match, string_match as sm};
    use mesh_core::proto::security::{Action, Authorization, Scope, string_match};

    let exact = |v: &str| Pb::new().string(sm::EXACT, v);
    let the_match = Pb::new()
        .msg(m::NAMESPACES, Pb::new().string(sm::SUFFIX, "-prod"))
        .msg(m::NOT_NAMESPACES, Pb::new().msg(sm::PRESENCE, Pb::new()))
        .msg(m::PRINCIPALS, exact("spiffe://td.example/ns/bookinfo/sa/productpage"))
        .msg(m::PRINCIPALS, exact("td.example/ns/istio-system/sa/ingress"))
        .msg(
            m::NOT_PRINCIPALS,
            Pb::new().string(sm::PREFIX, "td.example/ns/untrusted/"),
        )
        .msg(
            m::SOURCE_IPS,
            Pb::new().bytes(cidr::ADDRESS, &[10, 0, 0, 0]).varint(cidr::LENGTH, 8),
        )
        .msg(
            m::NOT_SOURCE_IPS,
            Pb::new().bytes(cidr::ADDRESS, &[10, 9, 0, 0]).varint(cidr::LENGTH, 16),
        )
        .msg(
            m::DESTINATION_IPS,
            Pb::new()
                .bytes(cidr::ADDRESS, &[192, 168, 1, 0])
                .varint(cidr::LENGTH, 24),
        )
        .msg(
            m::NOT_DESTINATION_IPS,
            Pb::new()
                .bytes(cidr::ADDRESS, &[192, 168, 1, 1])
                .varint(cidr::LENGTH, 32),
        )
        .packed(m::DESTINATION_PORTS, &[9080, 15021])
        // unpacked form of a repeated uint32
        .varint(m::NOT_DESTINATION_PORTS, 22)
        .msg(
            m::SERVICE_ACCOUNTS,
            Pb::new()
                .string(sa_match::NAMESPACE, "bookinfo")
                .string(sa_match::SERVICE_ACCOUNT, "reviews"),
        )
        .msg(
            m::NOT_SERVICE_ACCOUNTS,
            Pb::new()
                .string(sa_match::NAMESPACE, "default")
                .string(sa_match::SERVICE_ACCOUNT, "sleep"),
        );
    let the_rule = Pb::new().msg(rule::CLAUSES, Pb::new().msg(clause::MATCHES, the_match));
    let bytes = Pb::new()
        .string(authz::NAME, "deny-untrusted")
        .string(authz::NAMESPACE, "bookinfo")
        .varint(authz::SCOPE, authz::SCOPE_NAMESPACE)
        .varint(authz::ACTION, authz::ACTION_DENY)
        .msg(authz::RULES, the_rule)
        .into_bytes();

    let a = Authorization::decode(bytes.as_slice()).expect("authorization must decode");
    assert_eq!(a.name, "deny-untrusted");
    assert_eq!(a.namespace, "bookinfo");
    assert_eq!(a.scope, 1);
    assert_eq!(a.scope(), Scope::Namespace);
    assert_eq!(a.action, 1);
    assert_eq!(a.action(), Action::Deny);

    assert_eq!(a.rules.len(), 1);
    assert_eq!(a.rules[0].clauses.len(), 1);
    assert_eq!(a.rules[0].clauses[0].matches.len(), 1);
    let mm = &a.rules[0].clauses[0].matches[0];

    let principals: Vec<_> = mm.principals.iter().map(|p| p.match_type.clone()).collect();
    assert_eq!(
        principals,
        vec![
            Some(string_match::MatchType::Exact(
                "spiffe://td.example/ns/bookinfo/sa/productpage".to_string()
            )),
            Some(string_match::MatchType::Exact(
                "td.example/ns/istio-system/sa/ingress".to_string()
            )),
        ]
    );
    assert_eq!(
        mm.not_principals[0].match_type,
        Some(string_match::MatchType::Prefix("td.example/ns/untrusted/".to_string()))
    );
    assert_eq!(
        mm.namespaces[0].match_type,
        Some(string_match::MatchType::Suffix("-prod".to_string()))
    );
    assert_eq!(
        mm.not_namespaces[0].match_type,
        Some(string_match::MatchType::Presence(()))
    );

    let cidrs = |v: &[mesh_core::proto::security::Address]| -> Vec<(Vec<u8>, u32)> {
        v.iter().map(|c| (c.address.clone(), c.length)).collect()
    };
    assert_eq!(cidrs(&mm.source_ips), vec![(vec![10, 0, 0, 0], 8)]);
    assert_eq!(cidrs(&mm.not_source_ips), vec![(vec![10, 9, 0, 0], 16)]);
    assert_eq!(cidrs(&mm.destination_ips), vec![(vec![192, 168, 1, 0], 24)]);
    assert_eq!(cidrs(&mm.not_destination_ips), vec![(vec![192, 168, 1, 1], 32)]);
    assert_eq!(mm.destination_ports, vec![9080, 15021]);
    assert_eq!(mm.not_destination_ports, vec![22]);

    assert_eq!(mm.service_accounts.len(), 1);
    assert_eq!(mm.service_accounts[0].namespace, "bookinfo");
    assert_eq!(mm.service_accounts[0].service_account, "reviews");
    assert_eq!(mm.not_service_accounts.len(), 1);
    assert_eq!(mm.not_service_accounts[0].namespace, "default");
    assert_eq!(mm.not_service_accounts[0].service_account, "sleep");
}

/// A delta ADS push carrying a workload, as ztunnel receives it.
#[test]
fn decodes_delta_discovery_response_with_address() {
    use envoy::{control_plane as cp, delta_response as f, resource as r};
    use mesh_core::proto::discovery::DeltaDiscoveryResponse;
    use mesh_core::proto::workload::{Address, address};

    const TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
    let any = Pb::new()
        .string(istio::any::TYPE_URL, TYPE_URL)
        .bytes(istio::any::VALUE, &workload_address_bytes());
    let resource = Pb::new()
        .string(r::NAME, WL_UID)
        .string(r::ALIASES, "network-west/10.244.1.17")
        .string(r::VERSION, "v42")
        .msg(r::RESOURCE, any)
        .msg(r::TTL, Pb::new().varint(istio::wrapper::VALUE, 30))
        .msg(r::CACHE_CONTROL, Pb::new().varint(r::DO_NOT_CACHE, 1));
    let bytes = Pb::new()
        .string(f::SYSTEM_VERSION_INFO, "2025-01-01T00:00:00Z/7")
        .msg(f::RESOURCES, resource)
        .string(f::TYPE_URL, TYPE_URL)
        .string(f::NONCE, "nonce-abc")
        .string(f::REMOVED_RESOURCES, "Kubernetes//Pod/bookinfo/gone")
        .msg(f::CONTROL_PLANE, Pb::new().string(cp::IDENTIFIER, "istiod-lite-0"))
        .into_bytes();

    let resp = DeltaDiscoveryResponse::decode(bytes.as_slice()).expect("decode");
    assert_eq!(resp.system_version_info, "2025-01-01T00:00:00Z/7");
    assert_eq!(resp.type_url, TYPE_URL);
    assert_eq!(resp.nonce, "nonce-abc");
    assert_eq!(
        resp.removed_resources,
        vec!["Kubernetes//Pod/bookinfo/gone".to_string()]
    );
    assert_eq!(
        resp.control_plane.as_ref().map(|c| c.identifier.as_str()),
        Some("istiod-lite-0")
    );
    assert_eq!(resp.resources.len(), 1);
    let res = &resp.resources[0];
    assert_eq!(res.name, WL_UID);
    assert_eq!(res.aliases, vec!["network-west/10.244.1.17".to_string()]);
    assert_eq!(res.version, "v42");
    assert_eq!(res.ttl.as_ref().map(|d| d.seconds), Some(30));
    assert!(res.cache_control.as_ref().expect("cache_control").do_not_cache);
    let any = res.resource.as_ref().expect("resource");
    assert_eq!(any.type_url, TYPE_URL);
    let inner = Address::decode(any.value.as_slice()).expect("inner Address");
    assert!(matches!(inner.r#type, Some(address::Type::Workload(ref w)) if w.uid == WL_UID));
}

/// The subscription / NACK message ztunnel sends.
#[test]
fn decodes_delta_discovery_request() {
    use envoy::{delta_request as f, node as n, status as st};
    use mesh_core::proto::discovery::DeltaDiscoveryRequest;

    let node = Pb::new()
        .string(
            n::ID,
            "sidecar~10.244.1.5~ztunnel-abcde.istio-system~istio-system.svc.cluster.local",
        )
        .string(n::CLUSTER, "Kubernetes")
        .msg(
            n::LOCALITY,
            Pb::new()
                .string(n::LOCALITY_REGION, "r1")
                .string(n::LOCALITY_ZONE, "z1")
                .string(n::LOCALITY_SUB_ZONE, "s1"),
        )
        .string(n::USER_AGENT_NAME, "ztunnel")
        .string(n::CLIENT_FEATURES, "envoy.lb.does_not_support_overprovisioning");
    let bytes = Pb::new()
        .msg(f::NODE, node)
        .string(f::TYPE_URL, "type.googleapis.com/istio.security.Authorization")
        .string(f::RESOURCE_NAMES_SUBSCRIBE, "*")
        .string(f::RESOURCE_NAMES_UNSUBSCRIBE, "bookinfo/old-policy")
        .msg(
            f::INITIAL_RESOURCE_VERSIONS,
            Pb::new()
                .string(istio::map_entry::KEY, "bookinfo/allow-gateway")
                .string(istio::map_entry::VALUE, "v7"),
        )
        .string(f::RESPONSE_NONCE, "nonce-abc")
        .msg(
            f::ERROR_DETAIL,
            Pb::new().varint(st::CODE, 3).string(st::MESSAGE, "bad policy"),
        )
        .into_bytes();

    let req = DeltaDiscoveryRequest::decode(bytes.as_slice()).expect("decode");
    let node = req.node.as_ref().expect("node");
    assert_eq!(
        node.id,
        "sidecar~10.244.1.5~ztunnel-abcde.istio-system~istio-system.svc.cluster.local"
    );
    assert_eq!(node.cluster, "Kubernetes");
    let loc = node.locality.as_ref().expect("locality");
    assert_eq!(
        (loc.region.as_str(), loc.zone.as_str(), loc.sub_zone.as_str()),
        ("r1", "z1", "s1")
    );
    assert_eq!(node.user_agent_name, "ztunnel");
    assert_eq!(
        node.client_features,
        vec!["envoy.lb.does_not_support_overprovisioning".to_string()]
    );
    assert_eq!(req.type_url, "type.googleapis.com/istio.security.Authorization");
    assert_eq!(req.resource_names_subscribe, vec!["*".to_string()]);
    assert_eq!(req.resource_names_unsubscribe, vec!["bookinfo/old-policy".to_string()]);
    assert_eq!(
        req.initial_resource_versions,
        BTreeMap::from([("bookinfo/allow-gateway".to_string(), "v7".to_string())])
    );
    assert_eq!(req.response_nonce, "nonce-abc");
    let err = req.error_detail.as_ref().expect("error_detail");
    assert_eq!(err.code, 3);
    assert_eq!(err.message, "bad policy");
}

#[test]
fn decodes_istio_ca_messages() {
    use envoy::{ca_request as rq, ca_response as rs};
    use mesh_core::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};

    let req = Pb::new()
        .string(
            rq::CSR,
            "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n",
        )
        .varint(rq::VALIDITY_DURATION, 86_400)
        .into_bytes();
    let req = IstioCertificateRequest::decode(req.as_slice()).expect("decode request");
    assert!(req.csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
    assert_eq!(req.validity_duration, 86_400);
    assert!(req.metadata.is_none());

    let resp = Pb::new()
        .string(rs::CERT_CHAIN, "LEAF")
        .string(rs::CERT_CHAIN, "INTERMEDIATE")
        .msg(rs::ROOT_CERT, Pb::new().string(rs::ROOTS_CA_CERT, "ROOT"))
        .into_bytes();
    let resp = IstioCertificateResponse::decode(resp.as_slice()).expect("decode response");
    assert_eq!(resp.cert_chain, vec!["LEAF".to_string(), "INTERMEDIATE".to_string()]);
    assert_eq!(
        resp.root_cert.as_ref().map(|r| r.ca_cert.clone()),
        Some(vec!["ROOT".to_string()])
    );
}
