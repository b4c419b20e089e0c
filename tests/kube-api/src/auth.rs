//! Who is asking and whether they may: bearer tokens (one table for requests and TokenReview),
//! RBAC refusals a test asks for, and the log of requests.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value, json};

use crate::meta;
use crate::resources::Kind;
use crate::status::{self, Status};

/// The token of `kubernetes-admin` (group `system:masters`), which is never forbidden.
pub const ADMIN_TOKEN: &str = "kube-api-double-admin";

/// The audience of the API server itself: tokens without audiences get it, and a request's
/// bearer token must have it.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

const MASTERS: &str = "system:masters";

/// One request as the authorizer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCall {
    /// The authenticated user, `system:anonymous` when the token was refused.
    pub user: String,
    /// The RBAC verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    pub group: String,
    /// The plural, as RBAC names resources.
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// What a token authenticates as.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl User {
    fn to_json(&self) -> Value {
        json!({"username": self.username, "uid": self.uid, "groups": self.groups, "extra": self.extra})
    }
}

#[derive(Debug, Clone)]
struct Token {
    user: User,
    audiences: Vec<String>,
    expired: bool,
    /// The pod a projected token is bound to: it stops being valid when that pod goes.
    pod: Option<(String, String, String)>,
}

/// The token table and the refusals.
#[derive(Debug)]
pub struct Auth {
    tokens: HashMap<String, Token>,
    forbidden: HashSet<(String, String, String)>,
}

impl Default for Auth {
    fn default() -> Self {
        let mut auth = Auth {
            tokens: HashMap::new(),
            forbidden: HashSet::new(),
        };
        auth.add_user_token(ADMIN_TOKEN, "kubernetes-admin", &[MASTERS]);
        auth
    }
}

/// The pod a bound token names: namespace, name, uid.
pub type BoundPod<'a> = (&'a str, &'a str, &'a str);

impl Auth {
    /// A static token: valid for the API server's audience until expired.
    pub fn add_user_token(&mut self, token: &str, username: &str, groups: &[&str]) {
        let mut groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        groups.push("system:authenticated".to_owned());
        let user = User {
            username: username.to_owned(),
            uid: meta::uid(),
            groups,
            extra: BTreeMap::new(),
        };
        let token_entry = Token {
            user,
            audiences: vec![API_AUDIENCE.to_owned()],
            expired: false,
            pod: None,
        };
        self.tokens.insert(token.to_owned(), token_entry);
    }

    /// Mints a projected service-account token (JWT-shaped, unsigned) and records what it means.
    pub fn issue_service_account_token(
        &mut self,
        namespace: &str,
        service_account: (&str, &str),
        pod: Option<(&str, &str)>,
        node: Option<(&str, &str)>,
        audiences: &[&str],
    ) -> String {
        let (sa_name, sa_uid) = service_account;
        let audiences: Vec<String> = if audiences.is_empty() {
            vec![API_AUDIENCE.to_owned()]
        } else {
            audiences.iter().map(|a| (*a).to_owned()).collect()
        };
        let jti = meta::uid();
        let mut extra = BTreeMap::from([(
            "authentication.kubernetes.io/credential-id".to_owned(),
            vec![format!("JTI={jti}")],
        )]);
        let mut claims = json!({"serviceaccount": {"name": sa_name, "uid": sa_uid}, "namespace": namespace});
        if let Some((name, uid)) = pod {
            extra.insert(
                "authentication.kubernetes.io/pod-name".to_owned(),
                vec![name.to_owned()],
            );
            extra.insert("authentication.kubernetes.io/pod-uid".to_owned(), vec![uid.to_owned()]);
            claims["pod"] = json!({"name": name, "uid": uid});
        }
        if let Some((name, uid)) = node {
            extra.insert(
                "authentication.kubernetes.io/node-name".to_owned(),
                vec![name.to_owned()],
            );
            extra.insert("authentication.kubernetes.io/node-uid".to_owned(), vec![uid.to_owned()]);
            claims["node"] = json!({"name": name, "uid": uid});
        }
        let username = format!("system:serviceaccount:{namespace}:{sa_name}");
        let now = meta::unix_now();
        let payload = json!({"aud": audiences, "exp": now + 3600, "iat": now, "nbf": now, "iss": API_AUDIENCE,
            "jti": jti, "sub": username, "kubernetes.io": claims});
        let header = json!({"alg": "RS256", "kid": "kube-api-double"});
        let signature = format!("{:016x}{:016x}", meta::random_u64(), meta::random_u64());
        let token = format!(
            "{}.{}.{}",
            base64url(header.to_string().as_bytes()),
            base64url(payload.to_string().as_bytes()),
            base64url(signature.as_bytes())
        );
        let user = User {
            username,
            uid: sa_uid.to_owned(),
            groups: vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_owned(),
            ],
            extra,
        };
        let pod = pod.map(|(name, uid)| (namespace.to_owned(), name.to_owned(), uid.to_owned()));
        self.tokens.insert(
            token.clone(),
            Token {
                user,
                audiences,
                expired: false,
                pod,
            },
        );
        token
    }

    /// From now on the token is refused, by requests and by TokenReview.
    pub fn expire_token(&mut self, token: &str) {
        if let Some(entry) = self.tokens.get_mut(token) {
            entry.expired = true;
        }
    }

    /// Refuses `verb` on `group`/`resource` (`pods`, or `pods/status` for a subresource) to every
    /// user but the admins.
    pub fn forbid(&mut self, verb: &str, group: &str, resource: &str) {
        self.forbidden
            .insert((verb.to_owned(), group.to_owned(), resource.to_owned()));
    }

    /// Authenticates `token` for `audiences` (the API server's when empty), returning the user and
    /// the audiences both sides share, or why not. `pod_exists` says whether a bound pod is still
    /// there with its uid.
    pub fn review(
        &self,
        token: &str,
        audiences: &[String],
        pod_exists: impl Fn(BoundPod<'_>) -> bool,
    ) -> Result<(User, Vec<String>), String> {
        let entry = self.tokens.get(token).ok_or("invalid bearer token: unknown token")?;
        if entry.expired {
            return Err("invalid bearer token: token has expired".to_owned());
        }
        let requested = if audiences.is_empty() {
            vec![API_AUDIENCE.to_owned()]
        } else {
            audiences.to_vec()
        };
        let shared: Vec<String> = requested
            .iter()
            .filter(|a| entry.audiences.contains(a))
            .cloned()
            .collect();
        if shared.is_empty() {
            return Err(format!(
                "invalid bearer token: token audiences {:?} is invalid for the target audiences {requested:?}",
                entry.audiences
            ));
        }
        if let Some((namespace, name, uid)) = &entry.pod
            && !pod_exists((namespace, name, uid))
        {
            return Err(format!(
                "invalid bearer token: pod \"{name}\" (uid {uid}) in namespace \"{namespace}\" no longer exists"
            ));
        }
        Ok((entry.user.clone(), shared))
    }

    /// The TokenReview the server answers for a TokenReview request body.
    pub fn token_review(&self, request: &Value, pod_exists: impl Fn(BoundPod<'_>) -> bool) -> Value {
        let token = request["spec"]["token"].as_str().unwrap_or_default();
        let audiences: Vec<String> = request["spec"]["audiences"]
            .as_array()
            .map(|a| a.iter().filter_map(|a| a.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let status = match self.review(token, &audiences, pod_exists) {
            Ok((user, shared)) => json!({"authenticated": true, "user": user.to_json(), "audiences": shared}),
            Err(error) => json!({"authenticated": false, "user": {}, "error": error}),
        };
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": request["spec"],
            "status": status,
        })
    }

    /// RBAC: allowed unless a test forbade it (admins never are).
    pub fn authorize(&self, user: &User, call: &ApiCall, kind: &Kind) -> Result<(), Status> {
        if user.groups.iter().any(|g| g == MASTERS) {
            return Ok(());
        }
        let resource = match &call.subresource {
            Some(sub) => format!("{}/{sub}", call.resource),
            None => call.resource.clone(),
        };
        if !self
            .forbidden
            .contains(&(call.verb.clone(), call.group.clone(), resource.clone()))
        {
            return Ok(());
        }
        let scope = match &call.namespace {
            Some(namespace) => format!("in the namespace \"{namespace}\""),
            None => "at the cluster scope".to_owned(),
        };
        let reason = format!(
            "User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
            user.username, call.verb, call.group
        );
        Err(status::forbidden(
            kind,
            call.name.as_deref().unwrap_or_default(),
            &reason,
        ))
    }
}

/// Base64url without padding, as JWTs use it.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_without_padding() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn the_token_is_a_jwt_with_service_account_claims() {
        let mut auth = Auth::default();
        let token = auth.issue_service_account_token("ns", ("sa", "sa-uid"), Some(("p", "p-uid")), None, &["ca"]);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let (user, shared) = auth.review(&token, &["ca".to_owned()], |_| true).unwrap();
        assert_eq!(user.username, "system:serviceaccount:ns:sa");
        assert_eq!(shared, ["ca"]);
        let refused = auth.review(&token, &[], |_| true).unwrap_err();
        assert!(refused.contains("is invalid for the target audiences"), "{refused}");
        let gone = auth.review(&token, &["ca".to_owned()], |_| false).unwrap_err();
        assert!(gone.contains("no longer exists"), "{gone}");
    }
}
