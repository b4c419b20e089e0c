//! Signing of workload certificates: the primitive under istiod-lite's CA, also used by tests
//! and the lab to mint certificates directly.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use super::SpiffeId;
use super::certificate::{CertificateError, WorkloadCertificate, parse_certificates, root_store};

/// Why the authority could not be loaded or could not sign.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("could not generate the CA key or certificate: {0}")]
    Generate(rcgen::Error),
    #[error("CA {what} is not usable: {source}")]
    Load { what: &'static str, source: rcgen::Error },
    #[error("CA certificates: {0}")]
    Certificates(#[from] CertificateError),
    #[error("certificate signing request is malformed or its signature is invalid: {0}")]
    InvalidCsr(rcgen::Error),
    #[error("certificate signing request: {0}; only ECDSA P-256 keys signed with ecdsa-with-SHA256 are accepted")]
    CsrAlgorithm(String),
    #[error("could not sign the certificate for {identity}: {source}")]
    Sign { identity: String, source: rcgen::Error },
}

/// The PEM files of a CA in Istio's `cacerts` layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorityPem {
    /// `ca-cert.pem`: the certificate that signs workload certificates.
    pub ca_cert: String,
    /// `ca-key.pem`: its PKCS#8 key.
    pub ca_key: String,
    /// `cert-chain.pem`: the chain from `ca_cert` up to the root, appended to every issued leaf.
    pub cert_chain: String,
    /// `root-cert.pem`: the mesh trust anchors.
    pub root_cert: String,
}

/// A certificate authority for one trust domain's workloads.
#[derive(Debug)]
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: AuthorityPem,
    chain: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
}

/// Self-signed roots are valid this long.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start a little in the past so clock skew between nodes does not reject them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

impl Authority {
    /// Creates a new self-signed root for `trust_domain`.
    pub fn self_signed(trust_domain: &str) -> Result<Self, AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_VALIDITY).into();
        let cert = params.self_signed(&key).map_err(AuthorityError::Generate)?;
        let root = cert.pem();
        Self::from_pem(AuthorityPem {
            ca_cert: root.clone(),
            ca_key: key.serialize_pem(),
            cert_chain: root.clone(),
            root_cert: root,
        })
    }

    /// Loads a CA from its PEM files.
    pub fn from_pem(pem: AuthorityPem) -> Result<Self, AuthorityError> {
        let key = KeyPair::from_pem(&pem.ca_key).map_err(|source| AuthorityError::Load {
            what: "key (ca-key.pem)",
            source,
        })?;
        let issuer = Issuer::from_ca_cert_pem(&pem.ca_cert, key).map_err(|source| AuthorityError::Load {
            what: "certificate (ca-cert.pem)",
            source,
        })?;
        let chain = parse_certificates("cert-chain.pem", &pem.cert_chain)?;
        let roots = Arc::new(root_store(&parse_certificates("root-cert.pem", &pem.root_cert)?)?);
        Ok(Self {
            issuer,
            pem,
            chain,
            roots,
        })
    }

    pub fn pem(&self) -> &AuthorityPem {
        &self.pem
    }

    /// The trust anchors every workload of the mesh verifies peers against.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// Signs a PEM CSR for `identity`, whatever SANs the CSR asked for, valid from now for `validity`.
    /// Returns the chain, leaf first, one PEM each (the `cert_chain` of Istio's CA API).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        validity: Duration,
    ) -> Result<Vec<String>, AuthorityError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(AuthorityError::InvalidCsr)?;
        // rcgen names the key after the CSR's signature algorithm, so a P-384 key signed with
        // SHA-256 would pass as P-256: the key and the signature are checked on their own.
        check_csr_algorithms(csr_pem)?;
        let now = SystemTime::now();
        let params = workload_params(identity, now - BACKDATE, now + validity)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| AuthorityError::Sign {
                identity: identity.to_string(),
                source,
            })?;
        Ok(self.with_chain(cert.pem()))
    }

    /// Generates a key and a certificate for `identity` valid over `[not_before, not_after]`.
    pub fn issue(
        &self,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, AuthorityError> {
        self.issue_with_dns_names(identity, &[], not_before, not_after)
    }

    /// Like [`Authority::issue`], with DNS names (or IP addresses) as well: for a server that
    /// clients reach by name or address (istiod-lite's own TLS port).
    pub fn issue_with_dns_names(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(AuthorityError::Generate)?;
        let mut params = workload_params(identity, not_before, not_after)?;
        for name in dns_names {
            // A server reached by address (a lab, a node port) needs an IP SAN instead.
            if let Ok(ip) = name.parse::<std::net::IpAddr>() {
                params.subject_alt_names.push(SanType::IpAddress(ip));
                continue;
            }
            let name = name.clone().try_into().map_err(|source| AuthorityError::Sign {
                identity: identity.to_string(),
                source,
            })?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| AuthorityError::Sign {
                identity: identity.to_string(),
                source,
            })?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        let key = PrivatePkcs8KeyDer::from(key.serialize_der()).into();
        Ok(WorkloadCertificate::new(chain, key, self.roots.clone())?)
    }

    fn with_chain(&self, leaf_pem: String) -> Vec<String> {
        let mut chain = vec![leaf_pem];
        chain.extend(self.chain.iter().map(|der| rustls_pem(der)));
        chain
    }
}

fn workload_params(
    identity: &SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, AuthorityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = identity.to_string().try_into().map_err(|source| AuthorityError::Sign {
        identity: identity.to_string(),
        source,
    })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}

fn rustls_pem(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// The CSR's key must be an EC key on P-256 and its signature ecdsa-with-SHA256, what the mesh
/// issues; anything else is named in the refusal.
fn check_csr_algorithms(csr_pem: &str) -> Result<(), AuthorityError> {
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521, OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ECDSA_WITH_SHA512,
    };
    use x509_parser::prelude::FromDer;
    let unreadable = |e: String| AuthorityError::CsrAlgorithm(format!("cannot be read ({e})"));
    let der = pem::parse(csr_pem).map_err(|e| unreadable(e.to_string()))?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der.contents())
        .map_err(|e| unreadable(e.to_string()))?;
    let key = &csr.certification_request_info.subject_pki.algorithm;
    if key.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(AuthorityError::CsrAlgorithm(format!(
            "the key is not an EC key (algorithm {})",
            key.algorithm
        )));
    }
    let curve = key.parameters.as_ref().and_then(|p| p.as_oid().ok());
    match curve {
        Some(oid) if oid == OID_EC_P256 => {}
        Some(oid) => {
            let name = if oid == OID_NIST_EC_P384 {
                "P-384 (secp384r1)".to_owned()
            } else if oid == OID_NIST_EC_P521 {
                "P-521 (secp521r1)".to_owned()
            } else {
                format!("curve {oid}")
            };
            return Err(AuthorityError::CsrAlgorithm(format!("the key is an EC {name} key")));
        }
        None => return Err(AuthorityError::CsrAlgorithm("the EC key names no curve".to_owned())),
    }
    let signature = &csr.signature_algorithm.algorithm;
    if *signature != OID_SIG_ECDSA_WITH_SHA256 {
        let name = if *signature == OID_SIG_ECDSA_WITH_SHA384 {
            "ecdsa-with-SHA384".to_owned()
        } else if *signature == OID_SIG_ECDSA_WITH_SHA512 {
            "ecdsa-with-SHA512".to_owned()
        } else {
            signature.to_string()
        };
        return Err(AuthorityError::CsrAlgorithm(format!(
            "the key is P-256 but the request is signed with {name}"
        )));
    }
    Ok(())
}
