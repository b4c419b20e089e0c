//! The CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`. A node agent authenticates
//! with its node token and asks, through `ImpersonatedIdentity`, for the identity of a pod
//! scheduled on its node; anything else is refused with a status that says why.

pub mod files;
pub mod tokens;

use std::sync::Arc;
use std::time::Duration;

use mesh_core::identity::{Authority, AuthorityError, SpiffeId};
use mesh_core::proto::ca::istio_certificate_service_server::IstioCertificateService;
use mesh_core::proto::ca::{IstioCertificateRequest, IstioCertificateResponse, Roots};
use prost_types::value::Kind;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

pub use tokens::NodeTokens;

/// The request metadata key (in the request's `metadata` struct) naming the identity a node agent
/// asks for on behalf of a pod.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Who runs where: the CA signs an identity for a node only if a pod with it runs there.
pub trait Placement: Send + Sync + 'static {
    fn identity_runs_on_node(&self, identity: &SpiffeId, node: &str) -> bool;
}

/// Placement from the current objects: a pod that is not finished, on `node`, in the identity's
/// namespace, running as its service account.
#[derive(Clone, Debug)]
pub struct PodPlacement(pub Arc<crate::store::Store>);

impl Placement for PodPlacement {
    fn identity_runs_on_node(&self, identity: &SpiffeId, node: &str) -> bool {
        let objects = self.0.current();
        objects.pods().any(|pod| {
            let spec = pod.spec.as_ref();
            let finished = matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            let service_account = spec
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|s| !s.is_empty())
                .unwrap_or("default");
            !finished
                && spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && pod.metadata.namespace.as_deref() == Some(identity.namespace())
                && service_account == identity.service_account()
        })
    }
}

/// Certificate lifetimes.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub default: Duration,
    pub max: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(24 * 3600),
            max: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CertificateService<P> {
    authority: Arc<Authority>,
    tokens: NodeTokens,
    placement: P,
    trust_domain: String,
    lifetimes: Lifetimes,
}

impl<P: Placement> CertificateService<P> {
    pub fn new(
        authority: Arc<Authority>,
        tokens: NodeTokens,
        placement: P,
        trust_domain: &str,
        lifetimes: Lifetimes,
    ) -> Self {
        Self {
            authority,
            tokens,
            placement,
            trust_domain: trust_domain.to_owned(),
            lifetimes,
        }
    }

    fn authenticate(&self, metadata: &MetadataMap) -> Result<&str, Status> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <node token>` metadata"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization metadata is not `Bearer <node token>`"))?;
        self.tokens
            .node_of(token.trim())
            .ok_or_else(|| Status::unauthenticated("the bearer token is not a known node token"))
    }

    fn lifetime(&self, requested_seconds: i64) -> Result<Duration, Status> {
        if requested_seconds <= 0 {
            return Ok(self.lifetimes.default);
        }
        let requested = Duration::from_secs(requested_seconds.unsigned_abs());
        if requested > self.lifetimes.max {
            return Err(Status::invalid_argument(format!(
                "requested validity {} exceeds the maximum {}",
                humantime::format_duration(requested),
                humantime::format_duration(self.lifetimes.max)
            )));
        }
        Ok(requested)
    }
}

/// The identity named by `ImpersonatedIdentity` in the request's metadata struct.
fn impersonated_identity(request: &IstioCertificateRequest) -> Result<SpiffeId, Status> {
    let value = request
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        .and_then(|v| v.kind.as_ref());
    let Some(Kind::StringValue(identity)) = value else {
        return Err(Status::permission_denied(format!(
            "node callers must name the workload identity they ask for in the `{IMPERSONATED_IDENTITY}` metadata"
        )));
    };
    identity
        .parse()
        .map_err(|e| Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}")))
}

#[tonic::async_trait]
impl<P: Placement> IstioCertificateService for CertificateService<P> {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let node = self.authenticate(request.metadata())?.to_owned();
        let request = request.into_inner();
        let identity = impersonated_identity(&request)?;
        if identity.trust_domain() != self.trust_domain {
            return Err(Status::permission_denied(format!(
                "identity {identity} is outside this mesh's trust domain {}",
                self.trust_domain
            )));
        }
        if !self.placement.identity_runs_on_node(&identity, &node) {
            warn!(%node, %identity, "refused: no such pod on the caller's node");
            return Err(Status::permission_denied(format!(
                "node {node} runs no pod with service account {}/{}",
                identity.namespace(),
                identity.service_account()
            )));
        }
        let lifetime = self.lifetime(request.validity_duration)?;
        let chain = self
            .authority
            .sign_csr(&request.csr, &identity, lifetime)
            .map_err(|error| match error {
                AuthorityError::InvalidCsr(_) | AuthorityError::CsrAlgorithm(_) => {
                    Status::invalid_argument(error.to_string())
                }
                other => Status::internal(other.to_string()),
            })?;
        info!(%node, %identity, lifetime = %humantime::format_duration(lifetime), "signed certificate");
        let root_cert = Some(Roots {
            ca_cert: vec![self.authority.pem().root_cert.clone()],
        });
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
            root_cert,
        }))
    }
}
