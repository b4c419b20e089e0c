//! The shared library of the mesh: Istio-compatible protos, SPIFFE identity, HBONE, telemetry,
//! the admin server and graceful shutdown. Nothing here knows about a particular binary.

pub mod admin;
pub mod capture;
pub mod certificates;
pub mod control;
pub mod hbone;
pub mod identity;
pub mod lifecycle;
pub mod net;
pub mod netns;
pub mod proto;
pub mod state;
pub mod telemetry;
pub mod token;
pub mod xds;
pub mod zds;
