//! The bearer token a data-plane program presents to the controller (xDS and the CA): a fixed
//! value, or a file read again at every use, because the kubelet rotates a projected
//! service-account token in place (hourly, and it expires after 12 h by default).

use std::path::PathBuf;

use tonic::metadata::{Ascii, MetadataValue};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("bearer token file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("bearer token {0} is empty")]
    Empty(String),
    #[error("bearer token {0} is not a valid header value")]
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BearerToken {
    Fixed(String),
    File(PathBuf),
}

impl From<&str> for BearerToken {
    fn from(token: &str) -> Self {
        Self::Fixed(token.to_owned())
    }
}

impl BearerToken {
    /// The `authorization: Bearer <token>` header value, read now.
    pub fn header(&self) -> Result<MetadataValue<Ascii>, TokenError> {
        let (token, what) = match self {
            Self::Fixed(token) => (token.trim().to_owned(), "(fixed)".to_owned()),
            Self::File(path) => {
                let token = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                    path: path.clone(),
                    source,
                })?;
                (token.trim().to_owned(), format!("file {}", path.display()))
            }
        };
        if token.is_empty() {
            return Err(TokenError::Empty(what));
        }
        MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| TokenError::Invalid(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_read_at_every_use() {
        let path = std::env::temp_dir().join(format!("bearer-token-{}", std::process::id()));
        std::fs::write(&path, "first\n").unwrap();
        let token = BearerToken::File(path.clone());
        assert_eq!(token.header().unwrap(), "Bearer first");
        std::fs::write(&path, "rotated").unwrap();
        assert_eq!(token.header().unwrap(), "Bearer rotated");
        std::fs::write(&path, "  \n").unwrap();
        assert!(token.header().unwrap_err().to_string().contains("is empty"));
        std::fs::remove_file(&path).unwrap();
        assert!(token.header().unwrap_err().to_string().starts_with("bearer token file"));
        assert_eq!(BearerToken::from("fixed").header().unwrap(), "Bearer fixed");
    }
}
