//! Graceful shutdown: wait for SIGTERM or SIGINT, then drain every server within a deadline.

use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

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
