//! The CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`. A caller gets a certificate
//! for its own service account; a trusted node agent (a lab node token, or a service account named
//! in `CA_TRUSTED_NODE_ACCOUNTS`) may ask, through `ImpersonatedIdentity`, for the identity of a
//! pod scheduled on its own node. Every refusal is `Unauthenticated`, with the reason in the
//! status and the log, as istiod answers.

pub mod files;
pub mod secret;

use std::sync::Arc;
use std::time::Duration;

use mesh_core::identity::{Authority, AuthorityError, SpiffeId};
use mesh_core::proto::ca::istio_certificate_service_server::IstioCertificateService;
use mesh_core::proto::ca::{IstioCertificateRequest, IstioCertificateResponse, Roots};
use prost_types::value::Kind;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::{AccountName, Authenticators, Caller, ServiceAccountCaller};

/// The request metadata key (in the request's `metadata` struct) naming the identity a node agent
/// asks for on behalf of a pod.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Who runs where: the CA signs an identity for a node only if a pod with it runs there.
pub trait Placement: Send + Sync + 'static {
    fn identity_runs_on_node(&self, identity: &SpiffeId, node: &str) -> bool;
    /// The node and uid of a pod, if it is known.
    fn pod(&self, namespace: &str, name: &str) -> Option<PodPlace>;
}

/// Where a pod runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlace {
    pub node: Option<String>,
    pub uid: Option<String>,
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

    fn pod(&self, namespace: &str, name: &str) -> Option<PodPlace> {
        let objects = self.0.current();
        let pod = objects.pod(namespace, name)?;
        Some(PodPlace {
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            uid: pod.metadata.uid.clone(),
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
    authenticators: Authenticators,
    trusted_node_accounts: Arc<[AccountName]>,
    placement: P,
    trust_domain: String,
    lifetimes: Lifetimes,
}

impl<P: Placement> CertificateService<P> {
    pub fn new(
        authority: Arc<Authority>,
        authenticators: Authenticators,
        placement: P,
        trust_domain: &str,
        lifetimes: Lifetimes,
    ) -> Self {
        Self {
            authority,
            authenticators,
            trusted_node_accounts: Arc::from(vec![AccountName {
                namespace: "istio-system".to_owned(),
                name: "ztunnel".to_owned(),
            }]),
            placement,
            trust_domain: trust_domain.to_owned(),
            lifetimes,
        }
    }

    /// The service accounts trusted as node agents (default `istio-system/ztunnel`).
    pub fn with_trusted_node_accounts(mut self, accounts: Vec<AccountName>) -> Self {
        self.trusted_node_accounts = accounts.into();
        self
    }

    /// The identity `caller` may have signed, given what it asked for.
    fn authorize(&self, caller: &Caller, requested: Option<SpiffeId>) -> Result<SpiffeId, String> {
        let (identity, node) = match caller {
            Caller::Node(node) => {
                let identity = requested.ok_or_else(|| {
                    format!(
                        "node callers must name the workload identity they ask for in the `{IMPERSONATED_IDENTITY}` metadata"
                    )
                })?;
                (identity, node.clone())
            }
            Caller::ServiceAccount(account) => {
                let own = SpiffeId::new(&self.trust_domain, &account.namespace, &account.name)
                    .map_err(|e| format!("caller {caller}: {e}"))?;
                match requested {
                    None => return Ok(own),
                    Some(identity) if identity == own => return Ok(own),
                    Some(identity) => (identity, self.caller_node(account)?),
                }
            }
        };
        self.on_node(identity, &node)
    }

    /// The node of a trusted node agent: the bound token's node, checked against its pod.
    fn caller_node(&self, account: &ServiceAccountCaller) -> Result<String, String> {
        let name = AccountName {
            namespace: account.namespace.clone(),
            name: account.name.clone(),
        };
        if !self.trusted_node_accounts.contains(&name) {
            return Err(format!(
                "caller {name} is not a trusted node agent (CA_TRUSTED_NODE_ACCOUNTS) and may not impersonate another identity"
            ));
        }
        let Some(bound) = &account.pod else {
            return Err(format!(
                "caller {name}: its token is not bound to a pod, so its node is unknown"
            ));
        };
        let place = self.placement.pod(&account.namespace, &bound.name).ok_or_else(|| {
            format!(
                "caller {name}: its pod {}/{} is not known",
                account.namespace, bound.name
            )
        })?;
        if bound.uid.is_some() && place.uid != bound.uid {
            return Err(format!(
                "caller {name}: its token was issued for another pod named {}/{} (uid differs)",
                account.namespace, bound.name
            ));
        }
        let node = place
            .node
            .ok_or_else(|| format!("caller {name}: its pod {} is not scheduled on a node", bound.name))?;
        if let Some(claimed) = &account.node
            && *claimed != node
        {
            return Err(format!(
                "caller {name}: its token names node {claimed} but its pod runs on {node}"
            ));
        }
        Ok(node)
    }

    fn on_node(&self, identity: SpiffeId, node: &str) -> Result<SpiffeId, String> {
        if identity.trust_domain() != self.trust_domain {
            return Err(format!(
                "identity {identity} is outside this mesh's trust domain {}",
                self.trust_domain
            ));
        }
        if !self.placement.identity_runs_on_node(&identity, node) {
            return Err(format!(
                "node {node} runs no pod with service account {}/{}",
                identity.namespace(),
                identity.service_account()
            ));
        }
        Ok(identity)
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

/// The identity named by `ImpersonatedIdentity` in the request's metadata struct, if any.
fn impersonated_identity(request: &IstioCertificateRequest) -> Result<Option<SpiffeId>, Status> {
    let value = request
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        .and_then(|v| v.kind.as_ref());
    match value {
        None => Ok(None),
        Some(Kind::StringValue(identity)) => identity
            .parse()
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}"))),
        Some(_) => Err(Status::invalid_argument(format!(
            "{IMPERSONATED_IDENTITY} must be a string"
        ))),
    }
}

#[tonic::async_trait]
impl<P: Placement> IstioCertificateService for CertificateService<P> {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = match self.authenticators.authenticate(request.metadata()).await {
            Ok(caller) => caller,
            Err(status) => {
                warn!(
                    reason = status.message(),
                    "certificate request refused: caller not authenticated"
                );
                return Err(status);
            }
        };
        let request = request.into_inner();
        let requested = impersonated_identity(&request)?;
        let identity = self.authorize(&caller, requested).map_err(|reason| {
            warn!(%caller, %reason, "certificate request refused");
            Status::unauthenticated(reason)
        })?;
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
        info!(%caller, %identity, lifetime = %humantime::format_duration(lifetime), "signed certificate");
        let root_cert = Some(Roots {
            ca_cert: vec![self.authority.pem().root_cert.clone()],
        });
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
            root_cert,
        }))
    }
}
