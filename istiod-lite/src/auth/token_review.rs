//! Kubernetes service-account tokens, checked with a `TokenReview` (as istiod does): the API
//! server says whether the token is valid for one of our audiences and whose it is; a bound
//! (projected) token also names its pod and node in the user's extra fields.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use kube::api::{Api, PostParams};
use tracing::debug;

use super::{Authenticator, BoundPod, Caller, Refusal, ServiceAccountCaller};

/// The user-info extra keys of a bound service-account token.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

#[derive(Clone)]
pub struct TokenReviewer {
    reviews: Api<TokenReview>,
    audiences: Vec<String>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        Self {
            reviews: Api::all(client),
            audiences,
        }
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let reviewed = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| Refusal::Unavailable(format!("TokenReview failed: {error}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "no reason given".to_owned());
            return Err(Refusal::Unknown(format!(
                "the Kubernetes API did not authenticate the token: {why}"
            )));
        }
        // An API server that ignores audiences answers without them; one that honours them
        // returns the ones the token is valid for, which must be ours.
        if let Some(granted) = &status.audiences
            && !granted.iter().any(|a| self.audiences.contains(a))
        {
            return Err(Refusal::Unknown(format!(
                "the token is for audiences {granted:?}, not {:?}",
                self.audiences
            )));
        }
        let caller = service_account(status.user.unwrap_or_default())?;
        debug!(caller = %caller, "token reviewed");
        Ok(caller)
    }
}

/// The service account, pod and node of a reviewed token's user.
fn service_account(user: UserInfo) -> Result<Caller, Refusal> {
    let username = user.username.unwrap_or_default();
    let account = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(namespace, name)| !namespace.is_empty() && !name.is_empty());
    let Some((namespace, name)) = account else {
        return Err(Refusal::Unknown(format!(
            "user {username:?} is not a service account (system:serviceaccount:<namespace>:<name>)"
        )));
    };
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|values| values.first()).cloned();
    Ok(Caller::ServiceAccount(ServiceAccountCaller {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        pod: first(POD_NAME).map(|name| BoundPod {
            name,
            uid: first(POD_UID),
        }),
        node: first(NODE_NAME),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_token_names_its_account_pod_and_node() {
        let user = UserInfo {
            username: Some("system:serviceaccount:istio-system:ztunnel".into()),
            extra: Some(
                [
                    (POD_NAME.to_owned(), vec!["ztunnel-x1".to_owned()]),
                    (POD_UID.to_owned(), vec!["uid-1".to_owned()]),
                    (NODE_NAME.to_owned(), vec!["node-1".to_owned()]),
                ]
                .into(),
            ),
            ..Default::default()
        };
        assert_eq!(
            service_account(user).unwrap(),
            Caller::ServiceAccount(ServiceAccountCaller {
                namespace: "istio-system".into(),
                name: "ztunnel".into(),
                pod: Some(BoundPod {
                    name: "ztunnel-x1".into(),
                    uid: Some("uid-1".into())
                }),
                node: Some("node-1".into()),
            })
        );
    }

    #[test]
    fn users_that_are_not_service_accounts_are_refused() {
        for username in [
            "kubernetes-admin",
            "system:serviceaccount:",
            "system:serviceaccount:ns:",
        ] {
            let user = UserInfo {
                username: Some(username.into()),
                ..Default::default()
            };
            let refusal = service_account(user).unwrap_err();
            assert!(refusal.to_string().contains("is not a service account"), "{refusal}");
        }
    }
}
