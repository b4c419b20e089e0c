//! Node tokens, the lab's authenticator: each node has a token file; its ztunnel sends it as
//! `authorization: Bearer <token>`, as Istio's agents send their Kubernetes tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aws_lc_rs::constant_time::verify_slices_are_equal;

use super::{Authenticator, Caller, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("node token directory {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error("node token file {path} is empty")]
    Empty { path: PathBuf },
}

/// Node name → token.
#[derive(Clone, Debug, Default)]
pub struct NodeTokens {
    tokens: BTreeMap<String, String>,
}

impl NodeTokens {
    pub fn new(tokens: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            tokens: tokens.into_iter().collect(),
        }
    }

    /// Reads `dir`: each file is named after a node and holds its token.
    pub fn load(dir: &Path) -> Result<Self, TokensError> {
        let io = |source| TokensError::Io {
            dir: dir.to_owned(),
            source,
        };
        let mut tokens = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if !path.is_file() {
                continue;
            }
            let token = std::fs::read_to_string(&path).map_err(io)?.trim().to_owned();
            if token.is_empty() {
                return Err(TokensError::Empty { path });
            }
            let node = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            tokens.insert(node, token);
        }
        Ok(Self { tokens })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The node whose token this is. Compares in constant time and checks every entry, so the
    /// answer's timing says nothing about the tokens.
    pub fn node_of(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (node, expected) in &self.tokens {
            if verify_slices_are_equal(expected.as_bytes(), token.as_bytes()).is_ok() {
                found = Some(node.as_str());
            }
        }
        found
    }
}

#[tonic::async_trait]
impl Authenticator for NodeTokens {
    async fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
        self.node_of(token)
            .map(|node| Caller::Node(node.to_owned()))
            .ok_or_else(|| Refusal::Unknown("the bearer token is not a known node token".to_owned()))
    }
}
