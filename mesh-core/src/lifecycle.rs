//! A program's life: its servers run under one drain signal; SIGTERM or SIGINT (or an admin
//! request) starts a graceful drain bounded by a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::admin::{self, Readiness, Routes};
use crate::telemetry::LogHandle;

/// The servers of a running program and what stops them.
#[derive(Debug)]
pub struct Lifecycle {
    signal: drain::Signal,
    watch: drain::Watch,
    tasks: JoinSet<()>,
    stop_requests: (mpsc::Sender<&'static str>, mpsc::Receiver<&'static str>),
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        let (signal, watch) = drain::channel();
        Self {
            signal,
            watch,
            tasks: JoinSet::new(),
            stop_requests: mpsc::channel(1),
        }
    }

    /// What servers watch to learn that draining has begun.
    pub fn watch(&self) -> drain::Watch {
        self.watch.clone()
    }

    /// A handle that starts the shutdown when used (the admin `/quitquitquit` endpoint).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop_requests.0.clone())
    }

    /// Runs `task` until the program stops.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Binds `address` and serves `routes` there; logs and returns the bound address.
    pub async fn serve_admin(
        &mut self,
        name: &str,
        address: SocketAddr,
        routes: Routes,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{name}: cannot listen on {address}: {e}")))?;
        let bound = listener.local_addr()?;
        info!(server = name, address = %bound, "listening");
        self.spawn(admin::serve(listener, routes, self.watch()));
        Ok(bound)
    }

    /// Serves the three endpoints every program has: admin (with `/logging` and `/quitquitquit`
    /// added to `admin`), metrics from `registry`, and readiness.
    pub async fn serve_endpoints(
        &mut self,
        addresses: &Endpoints,
        admin: Routes,
        log: LogHandle,
        registry: Registry,
        readiness: Readiness,
    ) -> std::io::Result<()> {
        let admin = admin.logging(log).quit(self.stopper());
        self.serve_admin("admin", addresses.admin, admin).await?;
        self.serve_admin("metrics", addresses.metrics, Routes::new().metrics(Arc::new(registry)))
            .await?;
        self.serve_admin("readiness", addresses.readiness, Routes::new().readiness(readiness))
            .await?;
        Ok(())
    }

    /// Waits for SIGTERM, SIGINT or a stop request, then drains everything within `deadline`.
    pub async fn run(mut self, signals: Signals, deadline: Duration) {
        let mut signals = signals;
        let reason = tokio::select! {
            signal = signals.recv() => signal,
            Some(reason) = self.stop_requests.1.recv() => reason,
        };
        info!(reason, "shutting down");
        let Self {
            signal,
            watch,
            mut tasks,
            ..
        } = self;
        drop(watch);
        drain(signal, deadline).await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Where a program serves its admin, metrics and readiness endpoints.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

/// Asks the program to shut down gracefully.
#[derive(Clone, Debug)]
pub struct Stopper(mpsc::Sender<&'static str>);

impl Stopper {
    pub fn stop(&self, reason: &'static str) {
        let _ = self.0.try_send(reason);
    }
}

/// Signal handlers installed at once, so a signal that arrives before anyone awaits is not lost
/// (and does not kill the process).
#[derive(Debug)]
pub struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves with the name of the first signal received.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// Tells every server to drain and waits for them, at most `deadline`. Returns whether all
/// finished in time.
pub async fn drain(signal: drain::Signal, deadline: Duration) -> bool {
    info!(?deadline, "draining");
    match tokio::time::timeout(deadline, signal.drain()).await {
        Ok(()) => {
            info!("drained");
            true
        }
        Err(_) => {
            warn!(
                ?deadline,
                "drain deadline passed with connections still open; closing them"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_watchers_up_to_the_deadline() {
        let (signal, watch) = drain::channel();
        let quick = watch.clone();
        tokio::spawn(async move {
            let release = quick.signaled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(release);
        });
        let (signal2, watch2) = drain::channel();
        tokio::spawn(async move {
            let release = watch2.signaled().await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(release);
        });
        drop(watch);
        assert!(drain(signal, Duration::from_secs(5)).await);
        let started = tokio::time::Instant::now();
        assert!(!drain(signal2, Duration::from_secs(5)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn sigterm_is_received_not_fatal() {
        let mut signals = Signals::install().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let name = tokio::time::timeout(Duration::from_secs(5), signals.recv())
            .await
            .unwrap();
        assert_eq!(name, "SIGTERM");
    }
}
