//! A workload's certificate bundle: its chain, private key, the mesh roots it trusts, and the
//! identity and validity read from the leaf.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;

use super::SpiffeId;

/// Why a certificate bundle could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("{what}: invalid PEM: {source}")]
    Pem {
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0}: no certificate in PEM input")]
    Empty(&'static str),
    #[error("certificate could not be parsed as X.509: {0}")]
    X509(String),
    #[error("certificate has no SPIFFE URI SAN (subject alternative names: {0:?})")]
    NoSpiffeSan(Vec<String>),
    #[error("certificate URI SAN is not a valid identity: {0}")]
    BadSpiffeSan(#[from] super::SpiffeIdError),
    #[error("root certificate rejected as a trust anchor: {0}")]
    Root(rustls::Error),
    #[error("could not generate a key or CSR: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Certificate chain (leaf first), key and trust roots of one workload identity.
#[derive(Debug)]
pub struct WorkloadCertificate {
    identity: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    not_before: SystemTime,
    not_after: SystemTime,
    /// When this bundle was built (fetched or loaded).
    received: SystemTime,
}

impl Clone for WorkloadCertificate {
    fn clone(&self) -> Self {
        Self {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            received: self.received,
        }
    }
}

impl WorkloadCertificate {
    /// Reads a bundle from PEM: the chain (leaf first), the PKCS#8 key and the roots.
    pub fn from_pem(chain_pem: &str, key_pem: &str, roots_pem: &str) -> Result<Self, CertificateError> {
        let chain = parse_certificates("certificate chain", chain_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| CertificateError::Pem {
            what: "private key",
            source,
        })?;
        let roots = root_store(&parse_certificates("root certificates", roots_pem)?)?;
        Self::new(chain, key, Arc::new(roots))
    }

    /// Builds a bundle from DER parts, reading identity and validity from the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Arc<RootCertStore>,
    ) -> Result<Self, CertificateError> {
        let leaf = chain.first().ok_or(CertificateError::Empty("certificate chain"))?;
        let info = LeafInfo::read(leaf)?;
        Ok(Self {
            identity: info.identity,
            chain,
            key,
            roots,
            not_before: info.not_before,
            not_after: info.not_after,
            received: SystemTime::now(),
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When this certificate should be renewed: halfway through its validity, as Istio does,
    /// counted from when it was received if that is later: CAs backdate `not_before` for clock
    /// skew, which would otherwise make a short-lived certificate due at once.
    pub fn refresh_at(&self) -> SystemTime {
        let start = self.not_before.max(self.received);
        let lifetime = self.not_after.duration_since(start).unwrap_or(Duration::ZERO);
        start + lifetime / 2
    }
}

/// A key pair and the PEM certificate signing request for an identity, as a node agent sends to the CA.
#[derive(Debug)]
pub struct CertificateRequest {
    pub csr_pem: String,
    key: rcgen::KeyPair,
}

impl CertificateRequest {
    /// Generates an ECDSA P-256 key and a CSR carrying `identity` as its URI SAN.
    pub fn new(identity: &SpiffeId) -> Result<Self, CertificateError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(identity.to_string().try_into()?)];
        let csr_pem = params.serialize_request(&key)?.pem()?;
        Ok(Self { csr_pem, key })
    }

    /// Completes the bundle with the chain the CA returned (leaf first, PEM each) and the roots.
    pub fn into_certificate(
        self,
        chain_pem: &[String],
        roots: Arc<RootCertStore>,
    ) -> Result<WorkloadCertificate, CertificateError> {
        let mut chain = Vec::with_capacity(chain_pem.len());
        for pem in chain_pem {
            chain.extend(parse_certificates("certificate chain", pem)?);
        }
        let key = PrivatePkcs8KeyDer::from(self.key.serialize_der()).into();
        WorkloadCertificate::new(chain, key, roots)
    }
}

/// Parses every certificate in a PEM text; an input with none is an error.
pub fn parse_certificates(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertificateError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(CertificateError::Empty(what));
    }
    Ok(certs)
}

/// A trust store holding exactly `roots`.
pub fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, CertificateError> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).map_err(CertificateError::Root)?;
    }
    Ok(store)
}

/// The SPIFFE identity in a certificate's URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, CertificateError> {
    Ok(LeafInfo::read(cert)?.identity)
}

struct LeafInfo {
    identity: SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl LeafInfo {
    fn read(cert: &CertificateDer<'_>) -> Result<Self, CertificateError> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert).map_err(|e| CertificateError::X509(e.to_string()))?;
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| CertificateError::X509(e.to_string()))?
            .map(|ext| ext.value.general_names.clone())
            .unwrap_or_default();
        let uri = sans.iter().find_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        });
        let Some(uri) = uri else {
            return Err(CertificateError::NoSpiffeSan(
                sans.iter().map(|name| name.to_string()).collect(),
            ));
        };
        let validity = cert.validity();
        Ok(Self {
            identity: uri.parse()?,
            not_before: system_time(validity.not_before.timestamp()),
            not_after: system_time(validity.not_after.timestamp()),
        })
    }
}

fn system_time(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}
