//! The CA's key material in Kubernetes Secrets, as istiod keeps it, so every replica signs from
//! the same root: a plugged-in CA in Secret `cacerts` (Istio's layout) wins; otherwise the
//! self-signed root in `istio-ca-secret`, created by the first replica that finds none. Replicas
//! starting together race on the create; the losers load what the winner wrote.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use mesh_core::identity::{Authority, AuthorityError, AuthorityPem};

use super::files::Origin;

/// A plugged-in CA (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem).
pub const PLUGGED_IN: &str = "cacerts";
/// The self-signed CA istiod creates.
pub const SELF_SIGNED: &str = "istio-ca-secret";

const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";
const CERT_CHAIN: &str = "cert-chain.pem";
const ROOT_CERT: &str = "root-cert.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("CA secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: &'static str,
        source: Box<kube::Error>,
    },
    #[error("CA secret {namespace}/{name}: key {key} is missing or not UTF-8 PEM")]
    MissingKey {
        namespace: String,
        name: &'static str,
        key: &'static str,
    },
    #[error("CA secret {namespace}/{name}: {source}")]
    Authority {
        namespace: String,
        name: &'static str,
        source: AuthorityError,
    },
}

/// Loads the CA from `cacerts` or `istio-ca-secret` in `namespace`, creating the latter if
/// neither exists.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
) -> Result<(Authority, Origin, &'static str), CaSecretError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let api = |name: &'static str| {
        move |source: kube::Error| CaSecretError::Api {
            namespace: namespace.to_owned(),
            name,
            source: Box::new(source),
        }
    };
    for name in [PLUGGED_IN, SELF_SIGNED] {
        if let Some(secret) = secrets.get_opt(name).await.map_err(api(name))? {
            return Ok((authority_from(&secret, namespace, name)?, Origin::Loaded, name));
        }
    }
    let authority = Authority::self_signed(trust_domain).map_err(|source| CaSecretError::Authority {
        namespace: namespace.to_owned(),
        name: SELF_SIGNED,
        source,
    })?;
    let secret = secret_of(&authority, namespace);
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok((authority, Origin::Created, SELF_SIGNED)),
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            let secret = secrets.get(SELF_SIGNED).await.map_err(api(SELF_SIGNED))?;
            Ok((
                authority_from(&secret, namespace, SELF_SIGNED)?,
                Origin::Loaded,
                SELF_SIGNED,
            ))
        }
        Err(error) => Err(api(SELF_SIGNED)(error)),
    }
}

fn secret_of(authority: &Authority, namespace: &str) -> Secret {
    let pem = authority.pem();
    let data: BTreeMap<String, ByteString> = [
        (CA_CERT, &pem.ca_cert),
        (CA_KEY, &pem.ca_key),
        (CERT_CHAIN, &pem.cert_chain),
        (ROOT_CERT, &pem.root_cert),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), ByteString(value.clone().into_bytes())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(SELF_SIGNED.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".to_owned()),
        data: Some(data),
        ..Default::default()
    }
}

fn authority_from(secret: &Secret, namespace: &str, name: &'static str) -> Result<Authority, CaSecretError> {
    let data = secret.data.clone().unwrap_or_default();
    let read = |key: &'static str| {
        data.get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .filter(|v| !v.trim().is_empty())
    };
    let required = |key: &'static str| {
        read(key).ok_or_else(|| CaSecretError::MissingKey {
            namespace: namespace.to_owned(),
            name,
            key,
        })
    };
    let ca_cert = required(CA_CERT)?;
    // istiod's own istio-ca-secret leaves the chain and root empty: the CA cert is the root.
    let (cert_chain, root_cert) = if name == SELF_SIGNED {
        (
            read(CERT_CHAIN).unwrap_or_else(|| ca_cert.clone()),
            read(ROOT_CERT).unwrap_or_else(|| ca_cert.clone()),
        )
    } else {
        (required(CERT_CHAIN)?, required(ROOT_CERT)?)
    };
    let pem = AuthorityPem {
        ca_key: required(CA_KEY)?,
        ca_cert,
        cert_chain,
        root_cert,
    };
    Authority::from_pem(pem).map_err(|source| CaSecretError::Authority {
        namespace: namespace.to_owned(),
        name,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_secret_loads_as_the_same_authority() {
        let authority = Authority::self_signed("cluster.local").unwrap();
        let secret = secret_of(&authority, "istio-system");
        let loaded = authority_from(&secret, "istio-system", SELF_SIGNED).unwrap();
        assert_eq!(loaded.pem(), authority.pem());
    }

    #[test]
    fn istiods_own_layout_with_an_empty_chain_and_root_loads() {
        let authority = Authority::self_signed("cluster.local").unwrap();
        let mut secret = secret_of(&authority, "istio-system");
        let data = secret.data.as_mut().unwrap();
        data.insert(CERT_CHAIN.to_owned(), ByteString(Vec::new()));
        data.insert(ROOT_CERT.to_owned(), ByteString(Vec::new()));
        let loaded = authority_from(&secret, "istio-system", SELF_SIGNED).unwrap();
        assert_eq!(loaded.pem().root_cert, authority.pem().ca_cert);
    }

    #[test]
    fn a_missing_key_is_named() {
        let mut secret = secret_of(&Authority::self_signed("cluster.local").unwrap(), "istio-system");
        secret.data.as_mut().unwrap().remove(CA_KEY);
        let error = authority_from(&secret, "istio-system", PLUGGED_IN)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "CA secret istio-system/cacerts: key ca-key.pem is missing or not UTF-8 PEM"
        );
    }
}
