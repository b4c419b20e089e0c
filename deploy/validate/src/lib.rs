//! Test infrastructure for `deploy/kubernetes`, never part of the product: rendering the
//! kustomizations offline ([`manifests`]) and comparing the RBAC they grant with the requests a
//! program makes against the Kubernetes API double ([`rbac`]).

pub mod manifests;
pub mod rbac;
