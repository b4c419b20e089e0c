//! The connection to the control plane that every data-plane program makes: where xDS and the CA
//! are, the mesh's roots, the bearer token, and the clients built from them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::RootCertStore;

use crate::certificates::CaClient;
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
    /// PEM root certificate(s) of the mesh: verify the controller and every peer.
    #[arg(long, env = "ROOT_CERT")]
    pub root_cert: PathBuf,
    /// File holding the bearer token for the controller and the CA.
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
        let root_pem = std::fs::read_to_string(&self.root_cert)
            .with_context(|| format!("--root-cert {}", self.root_cert.display()))?;
        let roots = crate::identity::certificate::parse_certificates("--root-cert", &root_pem)?;
        let roots = Arc::new(crate::identity::certificate::root_store(&roots)?);
        let token = match &self.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("--token-file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let server = |address: &ServerAddress| -> anyhow::Result<xds::Server> {
            Ok(if address.tls {
                xds::Server::tls(&address.authority, &address.host, &root_pem, token.as_deref())?
            } else {
                xds::Server::plaintext(&address.authority)?
            })
        };
        let ca = CaClient::new(
            server(&ca_address)?.connect_lazy(),
            token.as_deref(),
            roots.clone(),
            self.cert_ttl,
        )?;
        Ok(ControlPlane {
            xds: server(&xds_address)?,
            ca,
            roots,
        })
    }
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
