//! Protos generated at build time from `proto/` (wire-compatible with Istio's and Envoy's):
//! workloads and services, authorization policies, delta ADS, and the CA API. Modules nest like
//! the proto packages because generated code refers across packages with relative paths.

#![allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations,
    unreachable_pub
)]

macro_rules! generated {
    ($file:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $file));
    };
}

pub mod istio {
    pub mod workload {
        generated!("istio.workload.rs");
        pub mod zds {
            generated!("istio.workload.zds.rs");
        }
    }
    pub mod security {
        generated!("istio.security.rs");
    }
    pub mod v1 {
        pub mod auth {
            generated!("istio.v1.auth.rs");
        }
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                generated!("envoy.config.core.v3.rs");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                generated!("envoy.service.discovery.v3.rs");
            }
        }
    }
}

/// The waypoint's own resources (not Istio's: Istio's waypoints take Envoy's xDS).
pub mod mesh {
    pub mod waypoint {
        pub mod v1 {
            generated!("mesh.waypoint.v1.rs");
        }
    }
}

pub mod google {
    pub mod rpc {
        generated!("google.rpc.rs");
    }
}

pub use envoy::service::discovery::v3 as discovery;
pub use istio::v1::auth as ca;
pub use istio::workload::zds;
pub use istio::{security, workload};
pub use mesh::waypoint::v1 as waypoint;

/// Type URL of `Address` resources (workloads and services) in delta xDS.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of `Authorization` resources in delta xDS.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// Type URL of the waypoint's `HttpRoute` resources in delta xDS.
pub const HTTP_ROUTE_TYPE_URL: &str = "type.googleapis.com/mesh.waypoint.v1.HttpRoute";
/// Type URL of the waypoint's `L7Policy` resources in delta xDS.
pub const L7_POLICY_TYPE_URL: &str = "type.googleapis.com/mesh.waypoint.v1.L7Policy";
