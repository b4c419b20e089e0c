//! Pod-start capture: no ambient pod runs a process before its traffic is captured.
//!
//! Two programs:
//! - **`mesh-cni`** ([`plugin`]), a chained CNI plugin (CNI spec 0.3.0 to 1.1.0). The container
//!   runtime runs it while it creates a pod's sandbox, after the primary plugin gave the pod its
//!   interface and address. It asks the node agent to enrol the pod and answers success (the
//!   `prevResult` passed through) only once the agent says the rules are installed and ztunnel
//!   holds the pod; any failure is a CNI error, so the runtime retries and the pod never starts
//!   uncaptured.
//! - **`mesh-node-agent`** ([`agent`]), the node agent. A binary of its own, not a ztunnel role:
//!   it must outlive ztunnel's restarts and upgrades, holding every enrolled pod's network
//!   namespace (and its capture rules) while no ztunnel runs, so that a new ztunnel gets every pod
//!   in its snapshot and, meanwhile, captured connections are refused rather than let through.
//!   Its life is that of the node's pods, ztunnel's that of a proxy release. It decides whether a
//!   pod is ambient (Istio's rule, [`agent::source`]), installs the `inet ztunnel` nftables table
//!   in the pod's namespace ([`mesh_core::capture`]) and hands the namespace to ztunnel over ZDS
//!   ([`agent::zds`], Istio's contract: an upstream ztunnel can be driven by this agent).
//!
//! The plugin ↔ agent protocol ([`protocol`]) is one JSON line each way over the agent's unix
//! stream socket (`/var/run/mesh-cni/agent.sock`).
//!
//! CNI types: [`rscni_types`] (the CNI 1.1 specification's network configuration, error codes
//! and version negotiation, with nothing else attached) is used for the netconf, the error result
//! and `VERSION`. `prevResult` is kept as raw JSON and printed back unchanged: a chained plugin
//! that changes nothing must return what it was given, in whatever layout the runtime's version
//! uses (0.3/0.4 or 1.x), and a typed result would re-encode it in one layout and drop what it
//! does not model. (`cni-plugin`, the other crate, dates from the 0.4 spec era and runs the
//! process itself; it did not fit.)

pub mod agent;
pub mod config;
pub mod plugin;
pub mod protocol;

pub use config::Config;
