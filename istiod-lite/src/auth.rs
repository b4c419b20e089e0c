//! Who is calling: the CA and xDS on 15012 accept a caller only when one of the authenticators
//! vouches for its bearer token. In the lab that is a node token file; on Kubernetes it is a
//! `TokenReview` of the caller's projected service-account token, as istiod does.

pub mod node_tokens;
pub mod token_review;

use std::fmt;
use std::sync::Arc;

use tonic::Status;
use tonic::metadata::MetadataMap;

pub use node_tokens::NodeTokens;
pub use token_review::TokenReviewer;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The node agent of this node, by its lab node token.
    Node(String),
    /// A Kubernetes service account, with the pod and node its bound token names (when it does).
    ServiceAccount(ServiceAccountCaller),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceAccountCaller {
    pub namespace: String,
    pub name: String,
    pub pod: Option<BoundPod>,
    pub node: Option<String>,
}

/// The pod a bound service-account token was issued for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub uid: Option<String>,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(node) => write!(f, "node {node}"),
            Self::ServiceAccount(account) => write!(f, "{}/{}", account.namespace, account.name),
        }
    }
}

/// Why an authenticator did not accept a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a token this authenticator knows; another one may.
    #[error("{0}")]
    Unknown(String),
    /// The authenticator could not decide (its backend failed); the caller may retry.
    #[error("{0}")]
    Unavailable(String),
}

#[tonic::async_trait]
pub trait Authenticator: Send + Sync + fmt::Debug + 'static {
    async fn authenticate(&self, token: &str) -> Result<Caller, Refusal>;
}

/// Every configured authenticator: the first that accepts a token decides who calls.
#[derive(Clone, Debug, Default)]
pub struct Authenticators(Vec<Arc<dyn Authenticator>>);

impl Authenticators {
    pub fn new(authenticators: Vec<Arc<dyn Authenticator>>) -> Self {
        Self(authenticators)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The caller of a request, from its `authorization: Bearer <token>` metadata; a refusal is
    /// `Unauthenticated` (or `Unavailable` when a backend could not answer) with every reason.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>` metadata"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("authorization metadata is not `Bearer <token>`"))?;
        if self.0.is_empty() {
            return Err(Status::unauthenticated(
                "no authenticator is configured (--node-tokens-dir or --kubernetes): every caller is refused",
            ));
        }
        let mut reasons = Vec::new();
        let mut unavailable = false;
        for authenticator in &self.0 {
            match authenticator.authenticate(token).await {
                Ok(caller) => return Ok(caller),
                Err(refusal) => {
                    unavailable |= matches!(refusal, Refusal::Unavailable(_));
                    reasons.push(refusal.to_string());
                }
            }
        }
        let message = reasons.join("; ");
        Err(if unavailable {
            Status::unavailable(message)
        } else {
            Status::unauthenticated(message)
        })
    }
}

/// A `namespace/service-account` pair, as `CA_TRUSTED_NODE_ACCOUNTS` lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountName {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for AccountName {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.trim().split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => Ok(Self {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }),
            _ => Err(format!("{value:?} is not <namespace>/<service-account>")),
        }
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(&'static str, Result<Caller, Refusal>);

    #[tonic::async_trait]
    impl Authenticator for Fixed {
        async fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
            if token == self.0 {
                self.1.clone()
            } else {
                Err(Refusal::Unknown(format!("{} does not know it", self.0)))
            }
        }
    }

    fn metadata(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", value.parse().unwrap());
        metadata
    }

    #[tokio::test]
    async fn the_first_authenticator_that_accepts_decides() {
        let authenticators = Authenticators::new(vec![
            Arc::new(Fixed("a", Ok(Caller::Node("node-a".into())))),
            Arc::new(Fixed("b", Ok(Caller::Node("node-b".into())))),
        ]);
        assert_eq!(
            authenticators.authenticate(&metadata("Bearer b")).await.unwrap(),
            Caller::Node("node-b".into())
        );
        let refused = authenticators.authenticate(&metadata("Bearer c")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(refused.message(), "a does not know it; b does not know it");
        let malformed = authenticators.authenticate(&metadata("Basic b")).await.unwrap_err();
        assert!(malformed.message().contains("not `Bearer <token>`"), "{malformed:?}");
        let missing = authenticators.authenticate(&MetadataMap::new()).await.unwrap_err();
        assert!(missing.message().contains("missing `authorization"), "{missing:?}");
    }

    #[tokio::test]
    async fn a_backend_failure_is_unavailable_and_no_authenticator_refuses_all() {
        let failing = Authenticators::new(vec![Arc::new(Fixed(
            "a",
            Err(Refusal::Unavailable("TokenReview failed: connection refused".into())),
        ))]);
        let status = failing.authenticate(&metadata("Bearer a")).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let none = Authenticators::default();
        let status = none.authenticate(&metadata("Bearer a")).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("no authenticator"), "{status:?}");
    }

    #[test]
    fn account_names_parse_strictly() {
        let account: AccountName = "istio-system/ztunnel".parse().unwrap();
        assert_eq!(account.to_string(), "istio-system/ztunnel");
        for bad in ["ztunnel", "/ztunnel", "istio-system/", "a/b/c"] {
            assert!(bad.parse::<AccountName>().is_err(), "{bad}");
        }
    }
}
