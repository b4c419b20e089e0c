//! Certificates for the identities of this node's pods: fetched when traffic needs one (or
//! prefetched when a pod appears), renewed at half-life, retried with backoff, and the old one
//! kept while it is still valid. Callers asking at once share one fetch.

mod ca_client;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::identity::{SpiffeId, WorkloadCertificate};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use ca_client::CaClient;

#[derive(Clone, Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("CA refused a certificate for {identity}: {code:?}: {message}")]
    Ca {
        identity: String,
        code: tonic::Code,
        message: String,
    },
    #[error("CA returned a certificate for {got}, not {asked}")]
    WrongIdentity { asked: String, got: String },
    #[error("certificate: {0}")]
    Certificate(Arc<crate::identity::CertificateError>),
    #[error("{0}")]
    Token(String),
    #[error("no valid certificate for {identity} yet: {reason}")]
    Unavailable { identity: String, reason: String },
}

impl From<crate::identity::CertificateError> for CertificateError {
    fn from(error: crate::identity::CertificateError) -> Self {
        Self::Certificate(Arc::new(error))
    }
}

/// Where certificates come from (the CA; a fake in tests).
pub trait CertificateSource: Send + Sync + 'static {
    fn fetch(&self, identity: &SpiffeId) -> impl Future<Output = Result<WorkloadCertificate, CertificateError>> + Send;
}

/// Retry delays after a failed fetch.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

/// A certificate and when (on tokio's clock) it expires.
#[derive(Clone, Debug)]
struct Held {
    certificate: Arc<WorkloadCertificate>,
    expires: Instant,
}

/// The state of one identity: what is held, or why nothing is.
#[derive(Clone, Debug)]
enum Slot {
    Pending,
    Ready(Held),
    Failed { held: Option<Held>, reason: String },
}

/// Keeps a certificate per identity.
#[derive(Debug)]
pub struct CertificateManager<S> {
    source: Arc<S>,
    retry: Retry,
    slots: Mutex<HashMap<SpiffeId, Slot>>,
    watches: Mutex<HashMap<SpiffeId, (watch::Sender<u64>, tokio::task::AbortHandle)>>,
}

impl<S: CertificateSource> CertificateManager<S> {
    pub fn new(source: S, retry: Retry) -> Arc<Self> {
        Arc::new(Self {
            source: Arc::new(source),
            retry,
            slots: Mutex::default(),
            watches: Mutex::default(),
        })
    }

    /// Starts keeping `identity` (a pod with it appeared); does nothing if already kept.
    pub fn prefetch(self: &Arc<Self>, identity: &SpiffeId) {
        self.keep(identity);
    }

    /// Stops keeping `identity` (no pod on this node has it any more).
    pub fn forget(&self, identity: &SpiffeId) {
        if let Some((_, task)) = self.watches.lock().expect("not poisoned").remove(identity) {
            task.abort();
        }
        self.slots.lock().expect("not poisoned").remove(identity);
    }

    /// A valid certificate for `identity`, fetching it first if needed.
    pub async fn get(self: &Arc<Self>, identity: &SpiffeId) -> Result<Arc<WorkloadCertificate>, CertificateError> {
        let mut changes = self.keep(identity);
        loop {
            let slot = self.slots.lock().expect("not poisoned").get(identity).cloned();
            match slot {
                Some(Slot::Ready(held)) => return Ok(held.certificate),
                Some(Slot::Failed { held: Some(held), .. }) if held.expires > Instant::now() => {
                    return Ok(held.certificate);
                }
                Some(Slot::Failed { reason, .. }) => {
                    return Err(CertificateError::Unavailable {
                        identity: identity.to_string(),
                        reason,
                    });
                }
                Some(Slot::Pending) | None => {}
            }
            if changes.changed().await.is_err() {
                return Err(CertificateError::Unavailable {
                    identity: identity.to_string(),
                    reason: "no longer kept".into(),
                });
            }
        }
    }

    /// The certificates held now, for `/config_dump`.
    pub fn held(&self) -> Vec<(SpiffeId, Option<Arc<WorkloadCertificate>>)> {
        let slots = self.slots.lock().expect("not poisoned");
        let mut held: Vec<_> = slots
            .iter()
            .map(|(id, slot)| {
                let certificate = match slot {
                    Slot::Ready(h) | Slot::Failed { held: Some(h), .. } => Some(h.certificate.clone()),
                    _ => None,
                };
                (id.clone(), certificate)
            })
            .collect();
        held.sort_by(|a, b| a.0.cmp(&b.0));
        held
    }

    fn keep(self: &Arc<Self>, identity: &SpiffeId) -> watch::Receiver<u64> {
        let mut watches = self.watches.lock().expect("not poisoned");
        if let Some((sender, _)) = watches.get(identity) {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(0);
        self.slots
            .lock()
            .expect("not poisoned")
            .insert(identity.clone(), Slot::Pending);
        let task = tokio::spawn(self.clone().maintain(identity.clone(), sender.clone()));
        watches.insert(identity.clone(), (sender, task.abort_handle()));
        receiver
    }

    /// Fetches, then renews at half-life; on failure retries with backoff, keeping what it had.
    async fn maintain(self: Arc<Self>, identity: SpiffeId, changed: watch::Sender<u64>) {
        let mut delay = self.retry.initial;
        loop {
            let next = match self.source.fetch(&identity).await {
                Ok(certificate) => {
                    delay = self.retry.initial;
                    let held = Held {
                        expires: on_tokio_clock(certificate.not_after()),
                        certificate: Arc::new(certificate),
                    };
                    let renew = on_tokio_clock(held.certificate.refresh_at());
                    info!(%identity, expires = ?held.certificate.not_after(), "certificate ready");
                    self.set(&identity, Slot::Ready(held));
                    renew
                }
                Err(error) => {
                    warn!(%identity, %error, retry_in = ?delay, "certificate fetch failed; keeping the current one while valid");
                    let held = match self.slots.lock().expect("not poisoned").get(&identity) {
                        Some(Slot::Ready(h) | Slot::Failed { held: Some(h), .. }) => Some(h.clone()),
                        _ => None,
                    };
                    let held = held.filter(|h| h.expires > Instant::now());
                    self.set(
                        &identity,
                        Slot::Failed {
                            held,
                            reason: error.to_string(),
                        },
                    );
                    let retry_at = Instant::now() + delay;
                    delay = (delay * 2).min(self.retry.max);
                    retry_at
                }
            };
            changed.send_modify(|generation| *generation += 1);
            debug!(%identity, at = ?next, "next certificate fetch");
            tokio::time::sleep_until(next).await;
        }
    }

    fn set(&self, identity: &SpiffeId, slot: Slot) {
        if let Some(current) = self.slots.lock().expect("not poisoned").get_mut(identity) {
            *current = slot;
        }
    }
}

/// A wall-clock instant on tokio's clock (which tests can pause and advance).
fn on_tokio_clock(at: SystemTime) -> Instant {
    let now = SystemTime::now();
    match at.duration_since(now) {
        Ok(ahead) => Instant::now() + ahead,
        Err(behind) => Instant::now()
            .checked_sub(behind.duration())
            .unwrap_or_else(Instant::now),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::identity::Authority;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    /// Issues one-hour certificates; fails while `failing` is set.
    struct FakeCa {
        authority: Authority,
        fetches: AtomicUsize,
        failing: std::sync::atomic::AtomicBool,
    }

    impl CertificateSource for Arc<FakeCa> {
        async fn fetch(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, CertificateError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(CertificateError::Unavailable {
                    identity: identity.to_string(),
                    reason: "CA down".into(),
                });
            }
            let now = SystemTime::now();
            Ok(self.authority.issue(identity, now, now + HOUR).unwrap())
        }
    }

    fn fake() -> Arc<FakeCa> {
        Arc::new(FakeCa {
            authority: Authority::self_signed("cluster.local").unwrap(),
            fetches: AtomicUsize::new(0),
            failing: Default::default(),
        })
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "demo", sa).unwrap()
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch_and_renewal_happens_at_half_life() {
        let ca = fake();
        let manager = CertificateManager::new(ca.clone(), Retry::default());
        let x = id("x");
        let (a, b) = tokio::join!(manager.get(&x), manager.get(&x));
        assert!(Arc::ptr_eq(&a.unwrap(), &b.unwrap()));
        assert_eq!(ca.fetches.load(Ordering::SeqCst), 1);

        tokio::time::advance(HOUR / 2 - Duration::from_secs(5)).await;
        settle().await;
        assert_eq!(ca.fetches.load(Ordering::SeqCst), 1, "not yet half-life");
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(ca.fetches.load(Ordering::SeqCst), 2, "renewed at half-life");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_ca_is_retried_with_backoff_while_the_old_certificate_serves() {
        let ca = fake();
        let retry = Retry {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
        };
        let manager = CertificateManager::new(ca.clone(), retry);
        let first = manager.get(&id("x")).await.unwrap();
        ca.failing.store(true, Ordering::SeqCst);

        // Half-life: the renewal fails, then retries at 1, 2, 4, 8, 8 ... seconds.
        tokio::time::advance(HOUR / 2).await;
        settle().await;
        assert_eq!(ca.fetches.load(Ordering::SeqCst), 2);
        for (wait, expected) in [(1, 3), (2, 4), (4, 5), (8, 6), (8, 7)] {
            tokio::time::advance(Duration::from_secs(wait)).await;
            settle().await;
            assert_eq!(ca.fetches.load(Ordering::SeqCst), expected, "after {wait}s more");
        }
        let still = manager.get(&id("x")).await.unwrap();
        assert!(Arc::ptr_eq(&first, &still), "the old certificate serves while valid");

        // Past expiry with the CA still down: no certificate.
        tokio::time::advance(HOUR / 2).await;
        settle().await;
        let error = manager.get(&id("x")).await.unwrap_err().to_string();
        assert!(error.contains("CA down"), "{error}");

        // The CA recovers: the next retry brings a fresh certificate.
        ca.failing.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(8)).await;
        settle().await;
        assert!(!Arc::ptr_eq(&first, &manager.get(&id("x")).await.unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn prefetch_fetches_ahead_and_forget_stops_renewing() {
        let ca = fake();
        let manager = CertificateManager::new(ca.clone(), Retry::default());
        manager.prefetch(&id("y"));
        settle().await;
        assert_eq!(ca.fetches.load(Ordering::SeqCst), 1);
        assert_eq!(manager.held().len(), 1);
        manager.forget(&id("y"));
        tokio::time::advance(HOUR).await;
        settle().await;
        assert_eq!(
            ca.fetches.load(Ordering::SeqCst),
            1,
            "a forgotten identity is not renewed"
        );
        assert!(manager.held().is_empty());
    }
}
