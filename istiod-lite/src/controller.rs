//! Keeps the served resources in step with the objects: every store change is translated and
//! published; new translation reports are logged once.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::store::Objects;
use crate::translate::{Mesh, Report, translate};
use crate::xds::Publisher;

/// Translates and publishes until the store is dropped. `first` is dropped after the first
/// publication (readiness).
pub async fn run(mut objects: watch::Receiver<Arc<Objects>>, publisher: Arc<Publisher>, mesh: Mesh, first: impl Send) {
    let mut first = Some(first);
    let mut reported = BTreeSet::new();
    loop {
        let snapshot = objects.borrow_and_update().clone();
        let (input, settings) = (snapshot.clone(), mesh.clone());
        let Ok(translation) = tokio::task::spawn_blocking(move || translate(&input, &settings)).await else {
            return;
        };
        let current: BTreeSet<Report> = translation.reports.iter().cloned().collect();
        for report in current.difference(&reported) {
            warn!(object = %report.object, "{}", report.message);
        }
        reported = current;
        info!(
            objects = snapshot.len(),
            workloads = translation.workloads.len(),
            services = translation.services.len(),
            policies = translation.authorizations.len(),
            "configuration translated"
        );
        publisher.publish(translation.resources());
        drop(first.take());
        if objects.changed().await.is_err() {
            return;
        }
    }
}
