//! SPIFFE identities in Istio's form: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

const SCHEME: &str = "spiffe://";

/// A workload identity. Every part is non-empty and free of `/`. The URI is shared, so cloning
/// one (every connection does, several times) allocates nothing.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: Arc<str>,
}

/// Why a string is not an Istio SPIFFE identity; each variant names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID {0:?} must start with \"spiffe://\"")]
    Scheme(String),
    #[error("SPIFFE ID {0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    #[error(
        "SPIFFE ID {id:?}: trust domain {trust_domain:?} may hold only lowercase letters, digits, '.', '-' and '_'"
    )]
    TrustDomain { id: String, trust_domain: String },
    #[error("SPIFFE ID {id:?}: path {path:?} must be /ns/<namespace>/sa/<service-account>")]
    Path { id: String, path: String },
    #[error("SPIFFE ID {id:?}: {part} {value:?} is empty or holds characters outside [A-Za-z0-9._-]")]
    Segment {
        id: String,
        part: &'static str,
        value: String,
    },
}

impl SpiffeId {
    /// Builds an identity from its parts, checking each.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        format!(
            "{SCHEME}{}/ns/{}/sa/{}",
            trust_domain.into(),
            namespace.into(),
            service_account.into()
        )
        .parse()
    }

    /// The parts of the (validated) URI: trust domain, "ns", namespace, "sa", service account.
    fn part(&self, index: usize) -> &str {
        self.uri[SCHEME.len()..].split('/').nth(index).unwrap_or_default()
    }

    /// The whole URI, `spiffe://…`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain(&self) -> &str {
        self.part(0)
    }

    pub fn namespace(&self) -> &str {
        self.part(2)
    }

    pub fn service_account(&self) -> &str {
        self.part(4)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_owned()))?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if trust_domain.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain(s.to_owned()));
        }
        if !trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(SpiffeIdError::TrustDomain {
                id: s.to_owned(),
                trust_domain: trust_domain.to_owned(),
            });
        }
        let parts: Vec<&str> = path.split('/').collect();
        let ["ns", namespace, "sa", service_account] = parts.as_slice() else {
            return Err(SpiffeIdError::Path {
                id: s.to_owned(),
                path: format!("/{path}"),
            });
        };
        for (part, value) in [("namespace", namespace), ("service account", service_account)] {
            if !is_valid_segment(value) {
                return Err(SpiffeIdError::Segment {
                    id: s.to_owned(),
                    part,
                    value: (*value).to_owned(),
                });
            }
        }
        Ok(Self { uri: Arc::from(s) })
    }
}

fn is_valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "client");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/client");
        assert_eq!(SpiffeId::new("cluster.local", "demo", "client").unwrap(), id);
    }

    #[test]
    fn errors_name_the_bad_part() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "must start with"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain \"Cluster.Local\""),
            ("spiffe://td/ns/a", "path \"/ns/a\""),
            ("spiffe://td/namespace/a/sa/b", "path \"/namespace/a/sa/b\""),
            ("spiffe://td/ns//sa/b", "namespace \"\""),
            ("spiffe://td/ns/a/sa/b c", "service account \"b c\""),
        ];
        for (input, expected) in cases {
            let err = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input}: {err}");
        }
        let err = SpiffeId::new("td", "ns", "").unwrap_err().to_string();
        assert!(err.contains("service account \"\""), "{err}");
    }
}
