//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! every replica serves xDS and the CA, but only the Lease holder runs the controllers that write
//! (waypoint deployments, status, the root-cert ConfigMaps). The holder renews every retry
//! period; a replica takes the Lease over once the holder has not renewed it for the lease
//! duration, measured on the taker's own clock since it last saw the record change (so clock skew
//! between replicas does not matter). A holder that cannot renew within the renew deadline stops
//! writing at once, before anyone else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// Timing and naming of the Lease.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica's identity in `spec.holderIdentity` (the pod name).
    pub identity: String,
    /// How long a holder's last renewal keeps others away.
    pub duration: Duration,
    /// How long the holder keeps writing without a successful renewal.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Checks the ordering client-go requires: retry < renew deadline < duration.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.retry_period < self.renew_deadline && self.renew_deadline < self.duration) {
            return Err(format!(
                "lease timing: need --lease-retry-period ({}) < --lease-renew-deadline ({}) < --lease-duration ({})",
                humantime::format_duration(self.retry_period),
                humantime::format_duration(self.renew_deadline),
                humantime::format_duration(self.duration)
            ));
        }
        Ok(())
    }
}

/// What this replica last saw of someone else's record, and when.
#[derive(Debug)]
struct Observed {
    resource_version: Option<String>,
    at: Instant,
}

/// Runs the election until dropped, publishing whether this replica leads.
pub async fn run(client: kube::Client, settings: LeaseSettings, leading: watch::Sender<bool>) {
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut observed: Option<Observed> = None;
    let mut last_renewal: Option<Instant> = None;
    loop {
        match try_acquire_or_renew(&leases, &settings, &mut observed).await {
            Ok(true) => {
                last_renewal = Some(Instant::now());
                if !*leading.borrow() {
                    info!(lease = %settings.name, identity = %settings.identity, "became the leader");
                    leading.send_replace(true);
                }
            }
            Ok(false) => {
                if *leading.borrow() {
                    warn!(lease = %settings.name, "another replica holds the lease: stopped writing");
                    leading.send_replace(false);
                }
                last_renewal = None;
            }
            Err(error) => {
                warn!(lease = %settings.name, %error, "cannot acquire or renew the lease");
                let expired = last_renewal.is_none_or(|at| at.elapsed() >= settings.renew_deadline);
                if *leading.borrow() && expired {
                    warn!(lease = %settings.name, "lease not renewed within the renew deadline: stopped writing");
                    leading.send_replace(false);
                }
            }
        }
        tokio::time::sleep(settings.retry_period).await;
    }
}

/// One round: `true` when this replica holds the Lease afterwards.
async fn try_acquire_or_renew(
    leases: &Api<Lease>,
    settings: &LeaseSettings,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let duration_seconds = i32::try_from(settings.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = leases.get_opt(&settings.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                namespace: Some(settings.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(settings.identity.clone()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(false),
            Err(error) => Err(error),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let ours = holder.as_deref() == Some(settings.identity.as_str());
    if let Some(holder) = &holder
        && !ours
    {
        // Someone else's: free only once its record has stood still for its lease duration.
        let version = lease.metadata.resource_version.clone();
        let seen = match observed {
            Some(seen) if seen.resource_version == version => seen.at,
            _ => {
                *observed = Some(Observed {
                    resource_version: version,
                    at: Instant::now(),
                });
                return Ok(false);
            }
        };
        let their_duration = spec.lease_duration_seconds.map_or(settings.duration, |s| {
            Duration::from_secs(s.max(1).unsigned_abs().into())
        });
        if seen.elapsed() < their_duration {
            return Ok(false);
        }
        info!(lease = %settings.name, previous = %holder, "the holder stopped renewing: taking the lease over");
    }
    if !ours {
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + i32::from(holder.is_some()));
    }
    spec.holder_identity = Some(settings.identity.clone());
    spec.lease_duration_seconds = Some(duration_seconds);
    spec.renew_time = Some(now);
    // The replace carries the resourceVersion we read: a concurrent writer makes it a 409.
    match leases.replace(&settings.name, &PostParams::default(), &lease).await {
        Ok(_) => {
            *observed = None;
            Ok(true)
        }
        Err(kube::Error::Api(status)) if status.is_conflict() => Ok(false),
        Err(error) => Err(error),
    }
}

/// Runs `work` (named `what` in logs) during each term of leadership: started when `leading`
/// turns true, dropped at once when it turns false (so nothing is written after the lease is
/// lost), restarted after a pause if it ends by itself. Returns when the election ends.
pub async fn while_leading<F, Fut>(what: &str, mut leading: watch::Receiver<bool>, work: F)
where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        if leading.wait_for(|leading| *leading).await.is_err() {
            return;
        }
        info!(what, "leading: started");
        let mut lost = leading.clone();
        // `Some(true)`: leadership lost; `Some(false)`: the election ended; `None`: work ended.
        let lost = tokio::select! {
            () = work(leading.clone()) => None,
            lost = async { lost.wait_for(|leading| !*leading).await.is_ok() } => Some(lost),
        };
        match lost {
            Some(true) => info!(what, "not leading any more: stopped"),
            Some(false) => return,
            None => {
                // Watches retry forever, so this is not expected; start over after a pause.
                warn!(what, "stopped by itself while leading; restarting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
