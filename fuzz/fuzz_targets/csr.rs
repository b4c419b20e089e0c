//! CSRs into the CA: a DER CSR (as the PEM of Istio's CA API carries it) signed by a test root.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_core::identity::{Authority, SpiffeId};

static CA: LazyLock<(Authority, SpiffeId)> = LazyLock::new(|| {
    (
        Authority::self_signed("cluster.local").unwrap(),
        SpiffeId::new("cluster.local", "demo", "client").unwrap(),
    )
});

fuzz_target!(|data: &[u8]| {
    let (ca, identity) = &*CA;
    let csr = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", data));
    let _ = ca.sign_csr(&csr, identity, Duration::from_secs(3600));
    // The PEM text itself, too (a CSR that is not even PEM).
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ca.sign_csr(text, identity, Duration::from_secs(3600));
    }
});
