//! Workload identity: SPIFFE IDs, certificate bundles, the signing authority, and the rustls
//! configurations for mutual TLS between workloads.

pub mod authority;
pub mod certificate;
pub mod spiffe;
pub mod tls;

pub use authority::{Authority, AuthorityError, AuthorityPem};
pub use certificate::{CertificateError, CertificateRequest, WorkloadCertificate};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use tls::{IdentityMismatch, TlsError};
