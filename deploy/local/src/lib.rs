//! The local lab: the mesh on one Linux machine, each node and each pod a network namespace.
//! [`topology`] creates the namespaces and wires them; [`cni`] runs the `mesh-cni` plugin on each
//! pod's sandbox as a container runtime does; the [`runner`] builds on both.

pub mod cni;
pub mod component;
pub mod demo;
pub mod plan;
pub mod pods;
pub mod runner;
pub mod topology;
pub mod waypoints;
