//! A mesh peer the scenarios drive by hand: an HBONE client holding a certificate from the lab's
//! CA (as a pod's ztunnel would), and the log lines of the programs the test binary runs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;
use mesh_core::hbone::{HboneError, Pool, PoolConfig, PoolKey};
use mesh_core::identity::{Authority, AuthorityPem, SpiffeId, WorkloadCertificate};
use mesh_core::telemetry::{LogArgs, LogFormat};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::lab::Lab;

/// `spiffe://cluster.local/ns/demo/sa/<sa>`.
pub fn demo_id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "demo", sa).expect("valid")
}

/// An HBONE client running as one identity of the lab's mesh.
#[derive(Debug)]
pub struct Peer {
    pool: Pool,
    identity: SpiffeId,
    certificate: WorkloadCertificate,
}

impl Peer {
    /// A peer running as `identity`, its certificate signed by the lab's CA.
    pub fn new(lab: &Lab, identity: SpiffeId) -> anyhow::Result<Self> {
        let read = |name: &str| std::fs::read_to_string(lab.path().join("ca").join(name));
        let authority = Authority::from_pem(AuthorityPem {
            ca_cert: read("ca-cert.pem")?,
            ca_key: read("ca-key.pem")?,
            cert_chain: read("cert-chain.pem")?,
            root_cert: read("root-cert.pem")?,
        })?;
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let certificate = authority.issue(&identity, now - hour, now + hour)?;
        Ok(Self {
            pool: Pool::new(PoolConfig::default()),
            identity,
            certificate,
        })
    }

    /// CONNECT `authority` through the HBONE listener at `listener` (whose pod runs as `server`),
    /// send `!`, half-close; what came back.
    pub async fn exchange(&self, listener: &str, server: &SpiffeId, authority: &str) -> Result<Vec<u8>, HboneError> {
        let key = PoolKey {
            source: self.identity.clone(),
            destination: server.clone(),
            address: listener.parse().expect("listener address"),
            source_address: None,
        };
        let authority: SocketAddr = authority.parse().expect("authority");
        let mut stream = self
            .pool
            .connect(&key, &self.certificate, authority, HeaderMap::new())
            .await?;
        stream.write_all(b"!").await.expect("write");
        stream.shutdown().await.expect("half-close");
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await.expect("read");
        Ok(received)
    }
}

/// Every log line of this test binary (the lab's programs run in it), captured once installed.
pub fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let args = LogArgs {
            log_format: LogFormat::Json,
            log_level: "warn".into(),
        };
        let (subscriber, _) = mesh_core::telemetry::subscriber(&args, move || Captured(writer.clone()));
        tracing::subscriber::set_global_default(subscriber).expect("the first subscriber of this binary");
        buffer
    })
}

struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The first log line with `message` whose fields include `fields` (waiting up to 5 s for it).
pub async fn log_line(message: &str, fields: &[(&str, &str)]) -> serde_json::Value {
    log_matching(&format!("{message:?} with {fields:?}"), |line| {
        line["message"] == message && fields.iter().all(|(k, v)| line[*k] == *v)
    })
    .await
}

/// The first log line that `matches` (waiting up to 5 s for it); `what` describes it.
pub async fn log_matching(what: &str, matches: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&logs().lock().expect("not poisoned")).into_owned();
        let found = text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(&matches);
        if let Some(line) = found {
            return line;
        }
        assert!(Instant::now() < deadline, "no log line {what} in\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
