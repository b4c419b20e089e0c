//! The CA's key material on disk, in Istio's `cacerts` layout; a self-signed root is created and
//! persisted on first start.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mesh_core::identity::{Authority, AuthorityError, AuthorityPem};

const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";
const CERT_CHAIN: &str = "cert-chain.pem";
const ROOT_CERT: &str = "root-cert.pem";
const FILES: [&str; 4] = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];

/// Why the CA directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFilesError {
    #[error(
        "CA directory {dir}: has {present:?} but lacks {missing:?}; provide all of ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem or none"
    )]
    Incomplete {
        dir: PathBuf,
        present: Vec<&'static str>,
        missing: Vec<&'static str>,
    },
    #[error("CA file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("CA directory {dir}: {source}")]
    Authority { dir: PathBuf, source: AuthorityError },
}

/// How the authority came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Loaded,
    Created,
}

/// Loads the CA from `dir`, or creates a self-signed root for `trust_domain` and writes it there.
pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<(Authority, Origin), CaFilesError> {
    let (present, missing): (Vec<&str>, Vec<&str>) = FILES.iter().partition(|f| dir.join(f).exists());
    let authority_error = |source| CaFilesError::Authority {
        dir: dir.to_owned(),
        source,
    };
    if missing.is_empty() {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| CaFilesError::Io { path, source })
        };
        let pem = AuthorityPem {
            ca_cert: read(CA_CERT)?,
            ca_key: read(CA_KEY)?,
            cert_chain: read(CERT_CHAIN)?,
            root_cert: read(ROOT_CERT)?,
        };
        return Ok((Authority::from_pem(pem).map_err(authority_error)?, Origin::Loaded));
    }
    if !present.is_empty() {
        return Err(CaFilesError::Incomplete {
            dir: dir.to_owned(),
            present,
            missing,
        });
    }
    let authority = Authority::self_signed(trust_domain).map_err(authority_error)?;
    let io_error = |path: PathBuf| move |source| CaFilesError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io_error(dir.to_owned()))?;
    let pem = authority.pem();
    for (name, contents, mode) in [
        (CA_KEY, &pem.ca_key, 0o600),
        (CA_CERT, &pem.ca_cert, 0o644),
        (CERT_CHAIN, &pem.cert_chain, 0o644),
        (ROOT_CERT, &pem.root_cert, 0o644),
    ] {
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(io_error(path.clone()))?;
        file.write_all(contents.as_bytes()).map_err(io_error(path.clone()))?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_error(path))?;
    }
    Ok((authority, Origin::Created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_loads_the_same_root() {
        let dir = std::env::temp_dir().join(format!("istiod-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (created, origin) = load_or_create(&dir, "cluster.local").unwrap();
        assert_eq!(origin, Origin::Created);
        let key_mode = std::fs::metadata(dir.join(CA_KEY)).unwrap().permissions().mode() & 0o777;
        assert_eq!(key_mode, 0o600);
        let (loaded, origin) = load_or_create(&dir, "cluster.local").unwrap();
        assert_eq!(origin, Origin::Loaded);
        assert_eq!(created.pem(), loaded.pem());

        std::fs::remove_file(dir.join(CERT_CHAIN)).unwrap();
        let error = load_or_create(&dir, "cluster.local").unwrap_err().to_string();
        assert!(error.contains("lacks [\"cert-chain.pem\"]"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
