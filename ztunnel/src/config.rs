//! ztunnel's configuration, from flags and environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::lifecycle::Endpoints;
use mesh_core::telemetry::LogArgs;

use crate::redirect::{DEFAULT_MARK, RedirectMode};

/// The per-node agent of the ambient mesh: captures the TCP traffic of the ambient pods on this
/// node and carries it over HBONE (HTTP/2 CONNECT in mutual TLS, port 15008) with each pod's
/// own SPIFFE identity, enforcing L4 authorization where traffic arrives.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "ztunnel", version)]
pub struct Config {
    #[command(flatten)]
    pub log: LogArgs,
    /// This node's name: ztunnel serves the workloads scheduled here.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The controller's xDS address: `http://host:port` (plaintext, local only) or
    /// `https://host:port` (verified against --root-cert).
    #[arg(long, env = "XDS_ADDRESS", default_value = "https://istiod.istio-system.svc:15012")]
    pub xds_address: String,
    /// The CA's address, in the same form (default: the xDS address).
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// PEM root certificate(s) of the mesh: verify the controller and every peer.
    #[arg(long, env = "ROOT_CERT")]
    pub root_cert: PathBuf,
    /// File holding this node's bearer token for the CA.
    #[arg(long, env = "NODE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Validity asked for workload certificates (e.g. 24h).
    #[arg(long, env = "CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// Network of this node's workloads (empty for a single network).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// SOCKS5 outbound listener (a local app names its destination instead of being redirected).
    #[arg(long, env = "ZTUNNEL_SOCKS5_ADDR")]
    pub socks5_addr: Option<SocketAddr>,
    /// How pods' traffic reaches ztunnel: `inpod` (ztunnel finds each pod's network namespace,
    /// installs capture rules and listens inside it) or `shared` (pods live in ztunnel's own
    /// namespace; listeners on their addresses, capture arranged by whoever set them up).
    #[arg(long, env = "ZTUNNEL_REDIRECT", value_enum, default_value = "inpod")]
    pub redirect: RedirectMode,
    /// Where named network namespaces are kept (searched before those of running processes).
    #[arg(long, env = "ZTUNNEL_NETNS_DIR", default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,
    /// SO_MARK on ztunnel's own connections, so capture rules that skip this mark let them pass.
    /// Default: 1337 (Istio's) in `inpod` mode, none in `shared` mode. Needs CAP_NET_ADMIN.
    #[arg(long, env = "ZTUNNEL_SOCKET_MARK")]
    pub socket_mark: Option<u32>,
    /// Admin server (/config_dump, /logging, /quitquitquit). Keep it on localhost.
    #[arg(long, env = "ZTUNNEL_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics).
    #[arg(long, env = "ZTUNNEL_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness probe (/healthz/ready).
    #[arg(long, env = "ZTUNNEL_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// How long open connections may take to finish after SIGTERM (e.g. 30s, 1m).
    #[arg(long, env = "ZTUNNEL_DRAIN_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_deadline: Duration,
}

impl Config {
    /// The mark on ztunnel's own sockets.
    pub fn mark(&self) -> Option<u32> {
        match self.redirect {
            RedirectMode::Inpod => Some(self.socket_mark.unwrap_or(DEFAULT_MARK)),
            RedirectMode::Shared => self.socket_mark,
        }
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            admin: self.admin_addr,
            metrics: self.metrics_addr,
            readiness: self.readiness_addr,
        }
    }
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

impl Config {
    pub fn xds(&self) -> Result<ServerAddress, String> {
        ServerAddress::parse("--xds-address", &self.xds_address)
    }

    pub fn ca(&self) -> Result<ServerAddress, String> {
        match &self.ca_address {
            Some(address) => ServerAddress::parse("--ca-address", address),
            None => self.xds(),
        }
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
