//! The CA client: a CSR for a pod's identity, sent as the node agent with its node token and
//! `ImpersonatedIdentity`, as Istio's ztunnel does.

use std::sync::Arc;
use std::time::Duration;

use crate::identity::{CertificateRequest, SpiffeId, WorkloadCertificate};
use crate::proto::ca::IstioCertificateRequest;
use crate::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use prost_types::{Struct, Value, value::Kind};
use rustls::RootCertStore;
use tonic::transport::Channel;

use super::{CertificateError, CertificateSource};
use crate::token::BearerToken;

/// Signs certificates through `istio.v1.auth.IstioCertificateService`.
#[derive(Clone, Debug)]
pub struct CaClient {
    channel: Channel,
    token: Option<BearerToken>,
    roots: Arc<RootCertStore>,
    validity: Duration,
}

impl CaClient {
    /// `roots` verify the chains the CA returns and become the certificates' trust anchors.
    pub fn new(
        channel: Channel,
        token: Option<BearerToken>,
        roots: Arc<RootCertStore>,
        validity: Duration,
    ) -> Result<Self, CertificateError> {
        Ok(Self {
            channel,
            token,
            roots,
            validity,
        })
    }
}

impl CertificateSource for CaClient {
    async fn fetch(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, CertificateError> {
        let request = CertificateRequest::new(identity)?;
        let metadata = Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(identity.to_string())),
                },
            )]
            .into(),
        };
        let mut call = tonic::Request::new(IstioCertificateRequest {
            csr: request.csr_pem.clone(),
            validity_duration: i64::try_from(self.validity.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        });
        if let Some(token) = &self.token {
            let header = token.header().map_err(|e| CertificateError::Token(e.to_string()))?;
            call.metadata_mut().insert("authorization", header);
        }
        let response = IstioCertificateServiceClient::new(self.channel.clone())
            .create_certificate(call)
            .await
            .map_err(|status| CertificateError::Ca {
                identity: identity.to_string(),
                code: status.code(),
                message: status.message().to_owned(),
            })?
            .into_inner();
        let certificate = request.into_certificate(&response.cert_chain, self.roots.clone())?;
        if certificate.identity() != identity {
            return Err(CertificateError::WrongIdentity {
                asked: identity.to_string(),
                got: certificate.identity().to_string(),
            });
        }
        Ok(certificate)
    }
}
