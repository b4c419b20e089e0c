//! Compiles the Istio-compatible protos (and the waypoint's own) with protox (pure Rust), so no system `protoc` is needed.

const PROTOS: &[&str] = &[
    "workload.proto",
    "authorization.proto",
    "discovery.proto",
    "ca.proto",
    "envoy_core.proto",
    "rpc_status.proto",
    "waypoint.proto",
    "zds.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        // Ordered maps encode deterministically, so a resource's bytes (its version) only change
        // when its content does.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
