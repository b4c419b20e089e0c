//! istiod-lite's configuration, from flags and environment variables, validated at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::lifecycle::Endpoints;
use mesh_core::telemetry::LogArgs;

use crate::auth::AccountName;
use crate::leader::LeaseSettings;
use crate::translate::Mesh;

/// The slim controller of the ambient mesh: watches Kubernetes (or a directory of the same YAML),
/// translates it into workloads, services and policies, streams them over delta xDS, and is the
/// CA that signs workload certificates.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "istiod-lite", version)]
pub struct Config {
    #[command(flatten)]
    pub log: LogArgs,
    /// Directory of Kubernetes YAML manifests (multi-document .yaml/.yml), watched for changes.
    /// May be combined with --kubernetes: both feed the same configuration.
    #[arg(long, env = "ISTIOD_CONFIG_DIR", required_unless_present = "kubernetes")]
    pub config_dir: Option<PathBuf>,
    /// Watch the Kubernetes API (namespaces, pods, services, Istio's and Gateway API's kinds):
    /// in-cluster when run in a pod, else --kubeconfig. Also turns on TokenReview authentication,
    /// the CA in Secrets, leader election and the waypoint deployment controller.
    #[arg(long, env = "ISTIOD_KUBERNETES")]
    pub kubernetes: bool,
    /// Kubeconfig file for --kubernetes (default: in-cluster, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// CA key material in Istio's cacerts layout (ca-cert.pem, ca-key.pem, cert-chain.pem,
    /// root-cert.pem); a self-signed root is created there on first start. Default
    /// /var/lib/istiod-lite/ca; with --kubernetes the default is the Secrets `cacerts` (a plugged-in
    /// CA) or else `istio-ca-secret` in the system namespace, shared by every replica.
    #[arg(long, env = "ISTIOD_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Directory of node tokens (the lab's authenticator): a file per node, named after it,
    /// holding the bearer token its ztunnel presents to xDS and the CA.
    #[arg(long, env = "ISTIOD_NODE_TOKENS_DIR")]
    pub node_tokens_dir: Option<PathBuf>,
    /// Audiences a service-account token must be valid for (TokenReview, with --kubernetes).
    #[arg(long, env = "TOKEN_AUDIENCES", value_delimiter = ',', default_value = "istio-ca")]
    pub token_audiences: Vec<String>,
    /// Service accounts (<namespace>/<name>, comma-separated) trusted as node agents: only they
    /// may ask for another identity (ImpersonatedIdentity), and only for pods on their own node.
    #[arg(
        long,
        env = "CA_TRUSTED_NODE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "istio-system/ztunnel"
    )]
    pub trusted_node_accounts: Vec<AccountName>,
    /// Namespace istiod-lite runs in: its Lease and CA Secret live there (with --kubernetes).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub system_namespace: String,
    /// This replica's name, its identity in the leader Lease (default: the host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The leader Lease (coordination.k8s.io/v1) in the system namespace.
    #[arg(long, env = "ISTIOD_LEASE_NAME", default_value = "istiod-lite-leader")]
    pub lease_name: String,
    /// How long a leader's last renewal keeps the other replicas from taking over.
    #[arg(long, env = "ISTIOD_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// How long the leader keeps writing without a successful renewal.
    #[arg(long, env = "ISTIOD_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lease_renew_deadline: Duration,
    /// How often replicas try to acquire or renew the Lease.
    #[arg(long, env = "ISTIOD_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_retry_period: Duration,
    /// Image of the waypoint Deployments istiod-lite creates for `istio-waypoint` Gateways.
    #[arg(long, env = "WAYPOINT_IMAGE", default_value = "ghcr.io/ambient-mesh/waypoint:latest")]
    pub waypoint_image: String,
    /// The xDS/CA address waypoint pods are given (their XDS_ADDRESS).
    #[arg(
        long,
        env = "WAYPOINT_XDS_ADDRESS",
        default_value = "https://istiod-lite.istio-system.svc:15012"
    )]
    pub waypoint_xds_address: String,
    /// Validity of workload certificates when the caller asks for none (e.g. 24h).
    #[arg(long, env = "ISTIOD_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// Longest validity a caller may ask for.
    #[arg(long, env = "ISTIOD_MAX_CERT_TTL", default_value = "90days", value_parser = humantime::parse_duration)]
    pub max_cert_ttl: Duration,
    /// The mesh's trust domain (SPIFFE IDs spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Cluster ID, the prefix of workload uids.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// DNS suffix of service hostnames (<name>.<ns>.svc.<suffix>).
    #[arg(long, env = "DOMAIN_SUFFIX", default_value = "cluster.local")]
    pub domain_suffix: String,
    /// Namespace whose selector-less policies apply mesh-wide.
    #[arg(long, env = "ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// Network name of this cluster's workloads (empty for a single network).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// Plaintext xDS and CA, for local use only: must be a loopback address.
    #[arg(long, env = "ISTIOD_XDS_PLAINTEXT_ADDR", default_value = "127.0.0.1:15010", value_parser = loopback)]
    pub xds_plaintext_addr: SocketAddr,
    /// xDS and CA over TLS, with a serving certificate from this CA.
    #[arg(long, env = "ISTIOD_XDS_ADDR", default_value = "0.0.0.0:15012")]
    pub xds_addr: SocketAddr,
    /// DNS names (or IP addresses) in the serving certificate of the TLS port (comma-separated).
    #[arg(
        long,
        env = "ISTIOD_DNS_NAMES",
        value_delimiter = ',',
        default_value = "istiod.istio-system.svc,istiod-lite.istio-system.svc,localhost"
    )]
    pub dns_names: Vec<String>,
    /// Admin server (/logging, /quitquitquit). Keep it on localhost.
    #[arg(long, env = "ISTIOD_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics).
    #[arg(long, env = "ISTIOD_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    pub metrics_addr: SocketAddr,
    /// Readiness probe (/healthz/ready).
    #[arg(long, env = "ISTIOD_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// How long open streams may take to finish after SIGTERM (e.g. 30s, 1m).
    #[arg(long, env = "ISTIOD_DRAIN_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_deadline: Duration,
}

fn loopback(value: &str) -> Result<SocketAddr, String> {
    let address: SocketAddr = value.parse().map_err(|e| format!("{value:?} is not an ip:port: {e}"))?;
    if !address.ip().is_loopback() {
        return Err(format!(
            "{address} is not a loopback address: the plaintext port serves certificates and configuration without TLS"
        ));
    }
    Ok(address)
}

impl Config {
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            admin: self.admin_addr,
            metrics: self.metrics_addr,
            readiness: self.readiness_addr,
        }
    }

    pub fn mesh(&self) -> Mesh {
        Mesh {
            cluster_id: self.cluster_id.clone(),
            trust_domain: self.trust_domain.clone(),
            domain_suffix: self.domain_suffix.clone(),
            root_namespace: self.root_namespace.clone(),
            network: self.network.clone(),
            require_redirection: self.kubernetes,
        }
    }

    /// The CA directory: the flag, else the default when the CA does not live in Secrets.
    pub fn ca_dir(&self) -> Option<PathBuf> {
        match (&self.ca_dir, self.kubernetes) {
            (Some(dir), _) => Some(dir.clone()),
            (None, true) => None,
            (None, false) => Some(PathBuf::from("/var/lib/istiod-lite/ca")),
        }
    }

    pub fn deployment(&self) -> crate::deployment::Settings {
        crate::deployment::Settings {
            waypoint_image: self.waypoint_image.clone(),
            xds_address: self.waypoint_xds_address.clone(),
            domain_suffix: self.domain_suffix.clone(),
            trust_domain: self.trust_domain.clone(),
            ..Default::default()
        }
    }

    pub fn lease(&self) -> LeaseSettings {
        let identity = self.pod_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "istiod-lite".to_owned());
            format!("{host}-{}", std::process::id())
        });
        LeaseSettings {
            namespace: self.system_namespace.clone(),
            name: self.lease_name.clone(),
            identity,
            duration: self.lease_duration,
            renew_deadline: self.lease_renew_deadline,
            retry_period: self.lease_retry_period,
        }
    }

    /// Checks what flags alone cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.cert_ttl > self.max_cert_ttl {
            return Err(format!(
                "--cert-ttl {} exceeds --max-cert-ttl {}",
                humantime::format_duration(self.cert_ttl),
                humantime::format_duration(self.max_cert_ttl)
            ));
        }
        if let Some(dir) = &self.config_dir
            && !dir.is_dir()
        {
            return Err(format!("--config-dir {}: not a directory", dir.display()));
        }
        mesh_core::identity::SpiffeId::new(&self.trust_domain, "istio-system", "istiod")
            .map_err(|e| format!("--trust-domain {:?}: {e}", self.trust_domain))?;
        if self.token_audiences.iter().all(|a| a.trim().is_empty()) {
            return Err("--token-audiences: at least one audience is needed".to_owned());
        }
        if self.kubernetes {
            self.lease().validate()?;
        }
        Ok(())
    }
}
