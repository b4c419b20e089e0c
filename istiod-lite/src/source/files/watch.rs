//! Keeping the store in step with the directory. Only events that can change content count
//! (writes, creations, renames, removals; never opens, reads or attribute changes, which the
//! scans themselves cause). Each starts a settle window; a file still being written (a write
//! seen, its close-write not yet) holds the rescan until it is closed, or until `write_timeout`
//! for a writer that never closes. Objects held for their grace period get a rescan when it ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Directory, GRACE, Left, SOURCE, is_yaml};
use crate::store::Store;

/// How the watcher waits.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Quiet time after the last event before a rescan.
    pub settle: Duration,
    /// How long an object that left the files is kept ([`GRACE`]).
    pub grace: Duration,
    /// How long a file open for writing may hold the rescan.
    pub write_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            settle: Duration::from_millis(100),
            grace: GRACE,
            write_timeout: Duration::from_secs(2),
        }
    }
}

/// What the directory source counts.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Documents rejected.
    pub errors: Counter,
    /// Times the directory was read.
    pub scans: Counter,
    /// Objects held for the grace period after leaving the files.
    pub held: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "istiod_config_errors",
            "Configuration documents rejected",
            metrics.errors.clone(),
        );
        registry.register(
            "istiod_config_scans",
            "Times the configuration directory was read",
            metrics.scans.clone(),
        );
        registry.register(
            "istiod_config_held",
            "Objects kept for the grace period after leaving the configuration files",
            metrics.held.clone(),
        );
        metrics
    }
}

/// Whether an event can change what the directory holds. Opens, reads and attribute changes
/// cannot; reacting to them made every scan (which opens and reads) trigger the next one.
fn changes_content(event: &notify::Event) -> bool {
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any | EventKind::Other => true,
    }
}

/// YAML files being written: when their first write was seen, their close-write not yet.
#[derive(Debug, Default)]
struct Writers(BTreeMap<PathBuf, Instant>);

impl Writers {
    fn note(&mut self, event: &notify::Event, now: Instant) {
        for path in event.paths.iter().filter(|p| is_yaml(p)) {
            match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Remove(_)
                | EventKind::Modify(ModifyKind::Name(_)) => {
                    self.0.remove(path);
                }
                EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                    self.0.entry(path.clone()).or_insert(now);
                }
                _ => {}
            }
        }
    }

    /// When a rescan settled at `settled` may run: then, or once every open writer closed or
    /// ran out of time.
    fn ready_at(&self, settled: Instant, write_timeout: Duration) -> Instant {
        self.0
            .values()
            .map(|started| *started + write_timeout)
            .fold(settled, Instant::max)
    }
}

/// A loaded directory that keeps the store in sync with it while [`Watching::run`] runs.
#[derive(Debug)]
pub struct Watching {
    directory: Directory,
    store: Arc<Store>,
    metrics: Metrics,
    timing: Timing,
    changes: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    _watcher: notify::RecommendedWatcher,
}

/// Loads `dir` into `store` and starts watching it. Fails only when the directory itself cannot
/// be watched or read; bad documents are reported and skipped.
pub fn load(dir: &Path, store: Arc<Store>, metrics: Metrics) -> Result<Watching, std::io::Error> {
    load_with(dir, store, metrics, Timing::default())
}

/// [`load`] with other timings (tests shorten them).
pub fn load_with(dir: &Path, store: Arc<Store>, metrics: Metrics, timing: Timing) -> Result<Watching, std::io::Error> {
    let (events, changes) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.as_ref().is_ok_and(|e| !changes_content(e)) {
            return;
        }
        let _ = events.send(event);
    })
    .map_err(std::io::Error::other)?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(std::io::Error::other)?;
    let mut directory = Directory::new(dir).with_grace(timing.grace);
    apply(&mut directory, &store, &metrics)?;
    info!(dir = %dir.display(), files = directory.file_count(), objects = store.current().len(), "configuration loaded");
    Ok(Watching {
        directory,
        store,
        metrics,
        timing,
        changes,
        _watcher: watcher,
    })
}

impl Watching {
    /// Applies changes once their writers are done, until the watcher stops.
    pub async fn run(mut self) {
        let mut writers = Writers::default();
        let mut settled: Option<Instant> = None;
        loop {
            // A pending rescan (which also ends due grace periods) waits for its writers; with
            // none pending, the next grace period's end is the one to wake for.
            let wake = match settled {
                Some(settled) => Some(writers.ready_at(settled, self.timing.write_timeout)),
                None => self.directory.next_deadline(),
            };
            tokio::select! {
                event = self.changes.recv() => {
                    let Some(event) = event else { break };
                    let now = Instant::now();
                    match &event {
                        Ok(event) => writers.note(event, now),
                        Err(error) => warn!(%error, "directory watch error; rescanning"),
                    }
                    settled = Some(now + self.timing.settle);
                }
                () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    if !writers.0.is_empty() {
                        let files: Vec<_> = writers.0.keys().map(|p| p.display().to_string()).collect();
                        warn!(?files, timeout = ?self.timing.write_timeout, "files still open for writing; applying them as they are");
                    }
                    writers = Writers::default();
                    settled = None;
                    if let Err(error) = apply(&mut self.directory, &self.store, &self.metrics) {
                        warn!(dir = %self.directory.dir().display(), %error, "cannot read the configuration directory; keeping the last state");
                    }
                }
            }
        }
    }
}

fn apply(directory: &mut Directory, store: &Store, metrics: &Metrics) -> Result<(), std::io::Error> {
    metrics.scans.inc();
    let scan = directory.scan(Instant::now())?;
    for problem in &scan.problems {
        metrics.errors.inc();
        warn!(error = %problem, "configuration document rejected; the file's last good objects stay in force");
    }
    for (file, key, left) in &scan.held {
        metrics.held.inc();
        let why = match left {
            Left::FileEmptied => "its file is now empty",
            Left::FileShortened => "its file no longer defines it",
            Left::FileRemoved => "its file was removed",
        };
        warn!(
            file = %file.display(), object = %key, grace = ?directory.grace(),
            "{why}: keeping it for the grace period (the file may still be being written); removed after it if still absent"
        );
    }
    for key in &scan.removed {
        info!(object = %key, "still absent after the grace period: removed");
    }
    store.replace(SOURCE, directory.objects());
    debug!(objects = store.current().len(), "configuration applied");
    Ok(())
}
