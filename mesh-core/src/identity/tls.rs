//! rustls configurations for the mesh: mutual TLS 1.3 only, aws-lc-rs, ALPN h2, chains verified
//! against the mesh roots, identities checked as SPIFFE URI SANs rather than DNS names.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};

use super::certificate::identity_of;
use super::{SpiffeId, WorkloadCertificate};

pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built or a peer's identity not read.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid certificate or key for {identity}: {source}")]
    Certificate { identity: String, source: rustls::Error },
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate: {0}")]
    PeerIdentity(#[from] super::CertificateError),
}

/// The peer presented a valid certificate for an identity other than the one expected.
#[derive(Clone, Debug, thiserror::Error)]
#[error("peer presented identity {presented}, expected {}", display_list(.expected))]
pub struct IdentityMismatch {
    pub expected: Vec<SpiffeId>,
    pub presented: SpiffeId,
}

fn display_list(ids: &[SpiffeId]) -> String {
    ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(" or ")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Server side of HBONE: presents `cert`, requires a client certificate chained to the mesh roots.
pub fn server_config(cert: &WorkloadCertificate) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(cert.roots().clone(), provider.clone()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(cert.chain().to_vec(), cert.key().clone_key())
        .map_err(|source| TlsError::Certificate {
            identity: cert.identity().to_string(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Mesh clients never resume sessions, so tickets would only cost a write per connection.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client side of HBONE: presents `cert`, accepts only a server chained to the mesh roots whose
/// identity is one of `expected`.
pub fn client_config(cert: &WorkloadCertificate, expected: Vec<SpiffeId>) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(IdentityVerifier {
        roots: cert.roots().clone(),
        expected,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain().to_vec(), cert.key().clone_key())
        .map_err(|source| TlsError::Certificate {
            identity: cert.identity().to_string(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The identity of the peer of an established TLS connection (its leaf certificate's URI SAN).
pub fn peer_identity(conn: &CommonState) -> Result<SpiffeId, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    Ok(identity_of(leaf)?)
}

/// Verifies the chain like webpki does for servers, then the SPIFFE identity instead of a DNS name.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&parsed, &self.roots, intermediates, now, self.algorithms.all)?;
        let presented = identity_of(end_entity).map_err(other_error)?;
        if !self.expected.contains(&presented) {
            return Err(other_error(IdentityMismatch {
                expected: self.expected.clone(),
                presented,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The identity mismatch behind a failed client handshake, if that is why it failed.
pub fn identity_mismatch(error: &std::io::Error) -> Option<IdentityMismatch> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other.0.downcast_ref().cloned(),
        _ => None,
    }
}

fn other_error(error: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}
