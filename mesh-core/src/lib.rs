//! The shared library of the mesh: Istio-compatible protos, SPIFFE identity, HBONE, telemetry,
//! the admin server and graceful drain. Nothing here knows about a particular binary.

pub mod hbone;
pub mod identity;
pub mod proto;
