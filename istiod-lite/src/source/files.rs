//! A directory of Kubernetes YAML (every `.yaml`/`.yml`, multi-document), watched: added,
//! changed and removed files apply live. A bad document is reported (file, document index,
//! object, field path) and skipped; an object that turns bad keeps its last good version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::objects::{self, Object, ObjectKey, ParseError};
use crate::store::Store;

/// The store's name for this source.
pub const SOURCE: &str = "files";

/// Changes that arrive within this window are applied together.
const SETTLE: Duration = Duration::from_millis(100);

/// A problem with one document of one file.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: document {index}: invalid YAML: {message}")]
    Yaml {
        file: PathBuf,
        index: usize,
        message: String,
    },
    #[error("{file}: document {index}: {source}")]
    Object {
        file: PathBuf,
        index: usize,
        source: ParseError,
    },
}

/// What the directory held at the last scan.
#[derive(Debug, Default)]
pub struct Directory {
    dir: PathBuf,
    /// File → (its text, its objects). Unchanged text is not parsed again.
    files: BTreeMap<PathBuf, (String, BTreeMap<ObjectKey, Object>)>,
}

impl Directory {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads the directory; returns the problems found. Objects of files that vanished go away.
    pub fn scan(&mut self) -> Result<Vec<DocumentError>, std::io::Error> {
        let mut problems = Vec::new();
        let mut seen = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if !is_yaml || !path.is_file() {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(source) => {
                    problems.push(DocumentError::Read {
                        file: path.clone(),
                        source,
                    });
                    // Keep what the file held while it cannot be read.
                    if let Some(previous) = self.files.remove(&path) {
                        seen.insert(path, previous);
                    }
                    continue;
                }
            };
            let previous = self.files.remove(&path);
            if let Some((old_text, objects)) = previous.as_ref().filter(|(old, _)| *old == text) {
                seen.insert(path, (old_text.clone(), objects.clone()));
                continue;
            }
            let last_good = previous.map(|(_, objects)| objects).unwrap_or_default();
            let objects = parse_file(&path, &text, &last_good, &mut problems);
            seen.insert(path, (text, objects));
        }
        self.files = seen;
        Ok(problems)
    }

    pub fn objects(&self) -> impl Iterator<Item = Object> + '_ {
        self.files.values().flat_map(|(_, objects)| objects.values().cloned())
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }
}

fn parse_file(
    path: &Path,
    text: &str,
    last_good: &BTreeMap<ObjectKey, Object>,
    problems: &mut Vec<DocumentError>,
) -> BTreeMap<ObjectKey, Object> {
    let mut objects = BTreeMap::new();
    let mut reader = text.as_bytes();
    for (index, document) in serde_saphyr::read::<_, serde_json::Value>(&mut reader).enumerate() {
        let document = match document {
            Ok(serde_json::Value::Null) => continue,
            Ok(document) => document,
            Err(error) => {
                problems.push(DocumentError::Yaml {
                    file: path.to_owned(),
                    index,
                    message: error.to_string(),
                });
                // The rest of the stream cannot be trusted once the YAML itself is broken; keep
                // the objects this file held that were not seen again.
                for (key, object) in last_good {
                    objects.entry(key.clone()).or_insert_with(|| object.clone());
                }
                break;
            }
        };
        match objects::parse(document) {
            Ok(object) => {
                objects.insert(object.key(), object);
            }
            Err(source) => {
                if let Some(previous) = source.key().and_then(|key| last_good.get(key)) {
                    objects.insert(previous.key(), previous.clone());
                }
                problems.push(DocumentError::Object {
                    file: path.to_owned(),
                    index,
                    source,
                });
            }
        }
    }
    objects
}

/// What the directory source counts.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Documents rejected.
    pub errors: Counter,
    /// Times the directory was read.
    pub scans: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register("istiod_config_errors", "Configuration documents rejected", metrics.errors.clone());
        registry.register("istiod_config_scans", "Times the configuration directory was read", metrics.scans.clone());
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

/// A loaded directory that keeps the store in sync with it while [`Watching::run`] runs.
#[derive(Debug)]
pub struct Watching {
    directory: Directory,
    store: Arc<Store>,
    metrics: Metrics,
    changes: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    _watcher: notify::RecommendedWatcher,
}

/// Loads `dir` into `store` and starts watching it. Fails only when the directory itself cannot
/// be watched or read; bad documents are reported and skipped.
pub fn load(dir: &Path, store: Arc<Store>, metrics: Metrics) -> Result<Watching, std::io::Error> {
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
    let mut directory = Directory::new(dir);
    apply(&mut directory, &store, &metrics)?;
    info!(dir = %dir.display(), files = directory.file_count(), objects = store.current().len(), "configuration loaded");
    Ok(Watching {
        directory,
        store,
        metrics,
        changes,
        _watcher: watcher,
    })
}

impl Watching {
    /// Applies changes as they happen, until the watcher stops.
    pub async fn run(mut self) {
        while let Some(event) = self.changes.recv().await {
            if let Err(error) = event {
                warn!(%error, "directory watch error; rescanning");
            }
            // Editors write in several steps: let them finish, then apply everything at once.
            tokio::time::sleep(SETTLE).await;
            while self.changes.try_recv().is_ok() {}
            if let Err(error) = apply(&mut self.directory, &self.store, &self.metrics) {
                warn!(dir = %self.directory.dir.display(), %error, "cannot read the configuration directory; keeping the last state");
            }
        }
    }
}

fn apply(directory: &mut Directory, store: &Store, metrics: &Metrics) -> Result<(), std::io::Error> {
    metrics.scans.inc();
    let problems = directory.scan()?;
    for problem in &problems {
        metrics.errors.inc();
        warn!(error = %problem, "configuration document skipped");
    }
    store.replace(SOURCE, directory.objects());
    debug!(objects = store.current().len(), "configuration applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("istiod-files-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn write(&self, file: &str, text: &str) {
            std::fs::write(self.0.join(file), text).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(directory: &Directory) -> Vec<String> {
        directory.objects().map(|o| o.key().to_string()).collect()
    }

    const GOOD_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: demo}\nspec:\n  containers: [{name: app, image: app}]\n";

    #[test]
    fn bad_documents_are_reported_precisely_and_skipped() {
        let dir = TempDir::new("bad");
        dir.write(
            "demo.yaml",
            &format!(
                "{GOOD_POD}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: demo}}\nspec:\n  action: ALOW\n---\napiVersion: v1\nkind: Widget\nmetadata: {{name: w}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: demo}}\nspec:\n  ports: [{{port: 80}}]\n"
            ),
        );
        dir.write("notes.txt", "ignored: not yaml");
        let mut directory = Directory::new(&dir.0);
        let problems: Vec<String> = directory.scan().unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(names(&directory), ["Pod/demo/a", "Service/demo/s"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].ends_with("demo.yaml: document 1: AuthorizationPolicy/demo/p: field spec.action: unknown variant `ALOW`, expected one of `ALLOW`, `DENY`, `AUDIT`, `CUSTOM`"), "{}", problems[0]);
        assert!(
            problems[1].ends_with("demo.yaml: document 2: v1 Widget is not a kind istiod-lite reads"),
            "{}",
            problems[1]
        );
    }

    #[test]
    fn an_object_that_turns_bad_keeps_its_last_good_version() {
        let dir = TempDir::new("last-good");
        dir.write(
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec:\n  ports: [{port: 80}]\n",
        );
        let mut directory = Directory::new(&dir.0);
        assert!(directory.scan().unwrap().is_empty());
        dir.write(
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: demo}\nspec:\n  ports: [{port: eighty}]\n",
        );
        let problems = directory.scan().unwrap();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].to_string().contains("field spec.ports[0].port"),
            "{}",
            problems[0]
        );
        let objects: Vec<Object> = directory.objects().collect();
        let [Object::Service(service)] = objects.as_slice() else {
            panic!("{objects:?}")
        };
        assert_eq!(service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 80);
    }

    #[test]
    fn removed_files_take_their_objects_with_them() {
        let dir = TempDir::new("removed");
        dir.write("a.yaml", GOOD_POD);
        dir.write(
            "b.yml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n",
        );
        let mut directory = Directory::new(&dir.0);
        directory.scan().unwrap();
        assert_eq!(names(&directory), ["Pod/demo/a", "Namespace/demo"]);
        std::fs::remove_file(dir.0.join("a.yaml")).unwrap();
        directory.scan().unwrap();
        assert_eq!(names(&directory), ["Namespace/demo"]);
    }

    #[test]
    fn objects_without_a_namespace_land_in_default() {
        let dir = TempDir::new("default-ns");
        dir.write("p.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n");
        let mut directory = Directory::new(&dir.0);
        directory.scan().unwrap();
        assert_eq!(names(&directory), ["Pod/default/a"]);
    }
}
