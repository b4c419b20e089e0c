//! Shared pieces of the end-to-end scenarios.

use std::net::SocketAddr;
use std::sync::Arc;

use istiod_lite::xds::{Metrics, Publisher, Server};
use mesh_core::proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use prometheus_client::registry::Registry;

/// An xDS server on its own runtime: dropping it kills every connection at once, as a crashed or
/// restarted controller would.
#[derive(Debug)]
pub struct Controller {
    runtime: Option<tokio::runtime::Runtime>,
    pub address: SocketAddr,
    pub metrics: Arc<Metrics>,
}

impl Controller {
    /// Serves `publisher` on `address` (port 0 picks one).
    pub fn start(address: SocketAddr, publisher: &Publisher) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let server = Server::new(publisher, metrics.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(server))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        Ok(Self {
            runtime: Some(runtime),
            address,
            metrics,
        })
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

pub mod lab;
pub mod netns;
pub mod peer;
pub mod zds_peer;

/// A test app on `address` that greets with `name`, then echoes until the client half-closes.
/// Returns the count of connections it accepted (to show that a denied client never reached it).
pub async fn greeting_echo_app(address: &str, name: &'static str) -> Arc<std::sync::atomic::AtomicUsize> {
    let listener = tokio::net::TcpListener::bind(address).await.expect("bind the app");
    greeting_echo_app_on(listener, name)
}

/// [`greeting_echo_app`] on a listener the caller made (inside a pod's namespace, say).
pub fn greeting_echo_app_on(
    listener: tokio::net::TcpListener,
    name: &'static str,
) -> Arc<std::sync::atomic::AtomicUsize> {
    use tokio::io::AsyncWriteExt;
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = stream.write_all(name.as_bytes()).await;
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    accepted
}

/// A test HTTP/1.1 app on `address` (see [`mesh_lab::component::serve_http`]). Returns the
/// count of requests it served.
pub async fn http_app(address: &str, name: &'static str) -> Arc<std::sync::atomic::AtomicUsize> {
    let listener = tokio::net::TcpListener::bind(address).await.expect("bind the app");
    mesh_lab::component::serve_http(listener, name.to_owned())
}

/// A binary of the workspace, built beside the test executables (`cargo test --workspace` builds
/// every one); the error says how to build it when it is missing.
pub fn workspace_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .ok_or_else(|| anyhow::anyhow!("{} has no profile directory", exe.display()))?;
    let binary = profile_dir.join(name);
    anyhow::ensure!(
        binary.is_file(),
        "{} is not built: run `cargo build -p <its package>` (cargo test --workspace builds it)",
        binary.display()
    );
    Ok(binary)
}
