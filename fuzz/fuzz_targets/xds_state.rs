//! xDS resources into ztunnel's state: a `DeltaDiscoveryResponse` off the wire, applied as the
//! xDS client does, then queried.
#![no_main]

use std::sync::{Arc, RwLock};

use libfuzzer_sys::fuzz_target;
use mesh_core::proto::discovery::DeltaDiscoveryResponse;
use mesh_core::state::{State, StateHandler};
use mesh_core::xds::{Handler, Update};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(response) = DeltaDiscoveryResponse::decode(data) else {
        return;
    };
    let state = Arc::new(RwLock::new(State::default()));
    let (mut handler, _changed) = StateHandler::new(state.clone());
    let updates: Vec<Update> = response
        .resources
        .into_iter()
        .filter_map(|r| {
            Some(Update {
                resource: r.resource?,
                name: r.name,
                version: r.version,
            })
        })
        .collect();
    // Applied twice (an update of what exists), then its removals.
    handler.apply(&response.type_url, updates.clone(), Vec::new());
    handler.apply(&response.type_url, updates, response.removed_resources);
    let state = state.read().unwrap();
    for workload in state.workloads() {
        let _ = mesh_core::state::identity_of(workload);
        let _ = state.policies_for(workload).count();
        for port in [80, 8080, 15008] {
            let _ = state.service_serving(workload, port);
        }
    }
    for service in state.services() {
        let _ = state.healthy_endpoints(service, 80);
    }
});
