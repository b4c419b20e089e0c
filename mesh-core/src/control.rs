//! The connection to the control plane that every data-plane program makes: where xDS and the CA
//! are, the mesh's roots, the bearer token, and the clients built from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::RootCertStore;

use crate::certificates::CaClient;
use crate::token::BearerToken;
use crate::xds;

/// Flags shared by ztunnel and the waypoint.
#[derive(Clone, Debug, clap::Args)]
pub struct ControlArgs {
    /// The controller's xDS address: `http://host:port` (plaintext, local only) or
    /// `https://host:port` (verified against --root-cert; host may be a name or an IP).
    #[arg(long, env = "XDS_ADDRESS", default_value = "https://istiod.istio-system.svc:15012")]
    pub xds_address: String,
    /// The CA's address, in the same form (default: the xDS address).
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// PEM root certificate(s) of the mesh: verify the controller and every peer. Default:
    /// XDS_ROOT_CA, else ./var/run/secrets/istio/root-cert.pem (where Istio's charts mount it).
    #[arg(long, env = "ROOT_CERT")]
    pub root_cert: Option<PathBuf>,
    /// Istio's name for the controller's root: a PEM file path, or the PEM itself.
    #[arg(long, env = "XDS_ROOT_CA")]
    pub xds_root_ca: Option<String>,
    /// Istio's name for the CA's root when it differs from the controller's (path or PEM).
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root_ca: Option<String>,
    /// File holding the bearer token for the controller and the CA, read again at every use
    /// (the kubelet rotates projected tokens). Default: ./var/run/secrets/tokens/istio-token when
    /// it exists (Istio's projected token path).
    #[arg(long, env = "NODE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Validity asked for workload certificates (e.g. 24h).
    #[arg(long, env = "CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
}

/// A server address as `http(s)://host:port`: its scheme says whether TLS is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddress {
    pub tls: bool,
    pub host: String,
    pub authority: String,
}

impl ServerAddress {
    pub fn parse(flag: &str, value: &str) -> Result<Self, String> {
        let (tls, rest) = match value.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            _ => {
                return Err(format!(
                    "{flag} {value:?}: expected http://host:port or https://host:port"
                ));
            }
        };
        let authority = rest.trim_end_matches('/');
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(format!("{flag} {value:?}: missing :port"));
        };
        port.parse::<u16>()
            .map_err(|_| format!("{flag} {value:?}: port {port:?} is not a number"))?;
        Ok(Self {
            tls,
            host: host.trim_matches(|c| c == '[' || c == ']').to_owned(),
            authority: authority.to_owned(),
        })
    }
}

/// What the flags lead to: the xDS server, the CA client, the roots.
#[derive(Debug)]
pub struct ControlPlane {
    pub xds: xds::Server,
    pub ca: CaClient,
    pub roots: Arc<RootCertStore>,
}

impl ControlArgs {
    /// Reads the roots and the token and builds the clients (connecting lazily).
    pub fn connect(&self) -> anyhow::Result<ControlPlane> {
        let xds_address = ServerAddress::parse("--xds-address", &self.xds_address).map_err(anyhow::Error::msg)?;
        let ca_address = match &self.ca_address {
            Some(address) => ServerAddress::parse("--ca-address", address),
            None => Ok(xds_address.clone()),
        }
        .map_err(anyhow::Error::msg)?;
        let root_pem = self.root_pem()?;
        let ca_root_pem = match &self.ca_root_ca {
            Some(value) => pem_or_file("CA_ROOT_CA", value)?,
            None => root_pem.clone(),
        };
        let roots = crate::identity::certificate::parse_certificates("the root certificate", &root_pem)?;
        let roots = Arc::new(crate::identity::certificate::root_store(&roots)?);
        let token = self.token()?;
        let server = |address: &ServerAddress, root_pem: &str| -> anyhow::Result<xds::Server> {
            Ok(if address.tls {
                xds::Server::tls(&address.authority, &address.host, root_pem, token.clone())?
            } else {
                xds::Server::plaintext(&address.authority)?
            })
        };
        let ca = CaClient::new(
            server(&ca_address, &ca_root_pem)?.connect_lazy(),
            token.clone(),
            roots.clone(),
            self.cert_ttl,
        )?;
        Ok(ControlPlane {
            xds: server(&xds_address, &root_pem)?,
            ca,
            roots,
        })
    }

    /// The mesh's root: --root-cert, else XDS_ROOT_CA, else Istio's mount path.
    fn root_pem(&self) -> anyhow::Result<String> {
        if let Some(path) = &self.root_cert {
            return std::fs::read_to_string(path).with_context(|| format!("--root-cert {}", path.display()));
        }
        if let Some(value) = &self.xds_root_ca {
            return pem_or_file("XDS_ROOT_CA", value);
        }
        let default = Path::new(ISTIO_ROOT_CERT);
        if default.exists() {
            return std::fs::read_to_string(default).with_context(|| format!("root certificate {ISTIO_ROOT_CERT}"));
        }
        anyhow::bail!(
            "no root certificate: pass --root-cert (ROOT_CERT) or XDS_ROOT_CA, or mount it at {ISTIO_ROOT_CERT}"
        )
    }

    /// --token-file, else Istio's projected token path when it exists, else none.
    fn token(&self) -> anyhow::Result<Option<BearerToken>> {
        let path = match &self.token_file {
            Some(path) => path.clone(),
            None if Path::new(ISTIO_TOKEN).exists() => PathBuf::from(ISTIO_TOKEN),
            None => return Ok(None),
        };
        let token = BearerToken::File(path);
        // Read once now, so a missing or empty file fails at start with its name.
        token.header().context("--token-file")?;
        Ok(Some(token))
    }
}

/// Where Istio's charts mount the mesh root and the projected token (relative to the working
/// directory, `/` in Istio's images).
const ISTIO_ROOT_CERT: &str = "./var/run/secrets/istio/root-cert.pem";
const ISTIO_TOKEN: &str = "./var/run/secrets/tokens/istio-token";

/// Istio's convention for XDS_ROOT_CA / CA_ROOT_CA: a file path, or the PEM itself.
fn pem_or_file(variable: &str, value: &str) -> anyhow::Result<String> {
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(value.to_owned());
    }
    if value == "SYSTEM" {
        anyhow::bail!("{variable}=SYSTEM (the system trust store) is not supported: the mesh root is private");
    }
    std::fs::read_to_string(value).with_context(|| format!("{variable} {value}"))
}

/// The xDS node for a program on `node` (`ztunnel~node~node`, Istio's form) with NODE_NAME set.
pub fn node(kind: &str, id: &str, node_name: &str) -> crate::proto::envoy::config::core::v3::Node {
    crate::proto::envoy::config::core::v3::Node {
        id: format!("{kind}~{id}~{node_name}"),
        cluster: "Kubernetes".into(),
        metadata: Some(prost_types::Struct {
            fields: [(
                "NODE_NAME".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(node_name.to_owned())),
                },
            )]
            .into(),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_say_scheme_host_and_port() {
        let tls = ServerAddress::parse("--xds-address", "https://istiod.istio-system.svc:15012").unwrap();
        assert_eq!(
            (tls.tls, tls.host.as_str(), tls.authority.as_str()),
            (true, "istiod.istio-system.svc", "istiod.istio-system.svc:15012")
        );
        assert!(
            !ServerAddress::parse("--xds-address", "http://127.0.0.1:15010")
                .unwrap()
                .tls
        );
        assert_eq!(
            ServerAddress::parse("--xds-address", "istiod:15012").unwrap_err(),
            "--xds-address \"istiod:15012\": expected http://host:port or https://host:port"
        );
        assert!(
            ServerAddress::parse("--ca-address", "https://istiod")
                .unwrap_err()
                .contains("missing :port")
        );
    }
}
