//! Who may do what: TokenReview, bearer tokens, RBAC refusals and the request log.

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchParams};
use kube_api_double::{ADMIN_TOKEN, ApiCall, ApiServer};
use serde_json::json;

use crate::{api_error, client, namespace, pod};

async fn review(reviews: &Api<TokenReview>, token: &str, audiences: &[&str]) -> TokenReview {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
        },
        ..Default::default()
    };
    reviews.create(&PostParams::default(), &request).await.unwrap()
}

#[tokio::test]
async fn token_review_authenticates_projected_tokens() {
    let api = ApiServer::start().await.unwrap();
    let web = api.apply(pod("web", json!({})));
    let pod_uid = web["metadata"]["uid"].as_str().unwrap();
    let reviews: Api<TokenReview> = Api::all(client(&api, ADMIN_TOKEN).await);
    let token =
        api.issue_service_account_token("apps", "web-sa", Some(("web", pod_uid)), Some("node-1"), &["istio-ca"]);

    let status = review(&reviews, &token, &["istio-ca", "other"]).await.status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{:?}", status.error);
    assert_eq!(status.audiences.unwrap(), ["istio-ca"]);
    let user = status.user.unwrap();
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:apps:web-sa"));
    assert!(user.groups.unwrap().contains(&"system:serviceaccounts:apps".to_owned()));
    let extra = user.extra.unwrap();
    assert_eq!(extra["authentication.kubernetes.io/pod-name"], ["web"]);
    assert_eq!(extra["authentication.kubernetes.io/pod-uid"], [pod_uid]);
    assert_eq!(extra["authentication.kubernetes.io/node-name"], ["node-1"]);

    let refused = |review: TokenReview| {
        let status = review.status.unwrap();
        assert_eq!(status.authenticated, Some(false));
        status.error.unwrap()
    };
    let wrong_audience = refused(review(&reviews, &token, &["somebody-else"]).await);
    assert!(
        wrong_audience.contains("invalid for the target audiences"),
        "{wrong_audience}"
    );
    let unknown = refused(review(&reviews, "not-a-token", &["istio-ca"]).await);
    assert!(unknown.contains("unknown token"), "{unknown}");
    api.apply(pod("web", json!({"relabelled": "still-the-same-pod"})));
    assert_eq!(
        review(&reviews, &token, &["istio-ca"])
            .await
            .status
            .unwrap()
            .authenticated,
        Some(true)
    );
    api.expire_token(&token);
    let expired = refused(review(&reviews, &token, &["istio-ca"]).await);
    assert!(expired.contains("expired"), "{expired}");

    let bound = api.issue_service_account_token("apps", "web-sa", Some(("web", pod_uid)), None, &["istio-ca"]);
    api.delete("v1", "Pod", Some("apps"), "web");
    let gone = refused(review(&reviews, &bound, &["istio-ca"]).await);
    assert!(gone.contains("no longer exists"), "{gone}");

    let reviews_made = api
        .calls()
        .into_iter()
        .filter(|c| {
            (c.user.as_str(), c.verb.as_str(), c.group.as_str(), c.resource.as_str())
                == ("kubernetes-admin", "create", "authentication.k8s.io", "tokenreviews")
        })
        .count();
    assert_eq!(reviews_made, 6, "one call per review");
}

#[tokio::test]
async fn bearer_tokens_are_authenticated_and_forbidden_verbs_refused() {
    let api = ApiServer::start().await.unwrap();
    let token = api.issue_service_account_token("istio-system", "istiod-lite", None, None, &[]);
    let istiod = client(&api, &token).await;
    let all: Api<Pod> = Api::all(istiod.clone());
    let in_apps: Api<Pod> = Api::namespaced(istiod, "apps");
    assert!(all.list(&ListParams::default()).await.unwrap().items.is_empty());

    api.forbid("list", "", "pods");
    let status = api_error(all.list(&ListParams::default()).await);
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "pods is forbidden: User \"system:serviceaccount:istio-system:istiod-lite\" cannot list resource \"pods\" \
         in API group \"\" at the cluster scope"
    );
    let status = api_error(in_apps.list(&ListParams::default()).await);
    assert!(
        status.message.ends_with("in the namespace \"apps\""),
        "{}",
        status.message
    );
    assert!(in_apps.get_opt("web").await.unwrap().is_none(), "get is still allowed");
    let admin: Api<Pod> = Api::all(client(&api, ADMIN_TOKEN).await);
    assert!(
        admin.list(&ListParams::default()).await.is_ok(),
        "the admin is never forbidden"
    );

    api.forbid("create", "authentication.k8s.io", "tokenreviews");
    let reviews: Api<TokenReview> = Api::all(all.clone().into_client());
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: token.clone(),
            audiences: None,
        },
        ..Default::default()
    };
    let status = api_error(reviews.create(&PostParams::default(), &request).await);
    assert_eq!(
        status.message,
        "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:istio-system:istiod-lite\" \
         cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope"
    );

    let stranger: Api<Pod> = Api::all(client(&api, "nobody-issued-this").await);
    let status = api_error(stranger.list(&ListParams::default()).await);
    assert_eq!((status.code, status.reason.as_str()), (401, "Unauthorized"));
    api.expire_token(&token);
    assert_eq!(api_error(in_apps.get_opt("web").await).code, 401);
}

#[tokio::test]
async fn calls_record_each_request_with_its_rbac_verb() {
    let api = ApiServer::start().await.unwrap();
    api.apply(namespace("apps"));
    let token = api.issue_service_account_token("apps", "app", None, None, &[]);
    let maps: Api<ConfigMap> = Api::namespaced(client(&api, &token).await, "apps");
    let map: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "m"}, "data": {"k": "v"}})).unwrap();

    let created = maps.create(&PostParams::default(), &map).await.unwrap();
    maps.get("m").await.unwrap();
    maps.list(&ListParams::default().labels("app=web")).await.unwrap();
    maps.watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed()
        .try_next()
        .await
        .unwrap();
    maps.replace("m", &PostParams::default(), &created).await.unwrap();
    let merge = Patch::Merge(json!({"data": {"k": "w"}}));
    maps.patch("m", &PatchParams::default(), &merge).await.unwrap();
    maps.delete("m", &DeleteParams::default()).await.unwrap();
    let other_namespace = api_error(
        Api::<ConfigMap>::namespaced(maps.clone().into_client(), "ghost")
            .create(&PostParams::default(), &map)
            .await,
    );
    assert_eq!(
        (other_namespace.code, other_namespace.message.as_str()),
        (404, "namespaces \"ghost\" not found")
    );

    let calls: Vec<ApiCall> = api
        .calls()
        .into_iter()
        .filter(|c| c.user == "system:serviceaccount:apps:app")
        .collect();
    let verbs: Vec<&str> = calls.iter().map(|c| c.verb.as_str()).collect();
    assert_eq!(
        verbs,
        ["create", "get", "list", "watch", "update", "patch", "delete", "create"]
    );
    let names: Vec<Option<&str>> = calls.iter().map(|c| c.name.as_deref()).collect();
    let m = Some("m");
    assert_eq!(names, [None, m, None, None, m, m, m, None]);
    assert_eq!(
        calls[4],
        ApiCall {
            user: "system:serviceaccount:apps:app".to_owned(),
            verb: "update".to_owned(),
            group: String::new(),
            resource: "configmaps".to_owned(),
            subresource: None,
            namespace: Some("apps".to_owned()),
            name: Some("m".to_owned()),
        }
    );
    assert_eq!(calls[7].namespace.as_deref(), Some("ghost"));
}
