//! Where objects come from: a watched directory of YAML (the embedded default) or the
//! Kubernetes API. Sources only feed the [`Store`](crate::store::Store).

pub mod files;
pub mod kubernetes;
