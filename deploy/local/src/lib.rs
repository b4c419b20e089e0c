//! The local lab: the mesh on one Linux machine, each node and each pod a network namespace.
//! [`topology`] creates the namespaces and wires them; the runner builds on it.

pub mod component;
pub mod demo;
pub mod plan;
pub mod runner;
pub mod topology;
pub mod waypoints;
