//! A directory of Kubernetes YAML (every `.yaml`/`.yml`, multi-document), watched ([`watch`]):
//! added, changed and removed files apply live, once their writer is done. Nothing here fails open:
//! - a bad document is reported (file, document index, object, field path); while a file holds
//!   one, every object the file held before and does not define again stays as it was (an object
//!   whose `kind` or `metadata.name` breaks keeps its last good version);
//! - an object that leaves the configuration (its file emptied, shortened or removed) is held for
//!   a grace period, reported, and removed only if it is still absent then: a writer that
//!   truncates a file and writes it again never leaves a policy or a workload absent in between.

pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::objects::{self, Object, ObjectKey, ParseError};

pub use watch::{Metrics, Timing, Watching, load, load_with};

/// The store's name for this source.
pub const SOURCE: &str = "files";

/// How long an object that left the files is kept before its removal is applied.
pub const GRACE: Duration = Duration::from_secs(5);

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

/// Why an object is held rather than removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Left {
    /// Its file now holds no object (0 bytes, or no documents).
    FileEmptied,
    /// Its file holds other objects, not this one.
    FileShortened,
    /// Its file is gone.
    FileRemoved,
}

/// What one scan found.
#[derive(Debug, Default)]
pub struct Scan {
    pub problems: Vec<DocumentError>,
    /// Objects that left the files at this scan, now held for the grace period.
    pub held: Vec<(PathBuf, ObjectKey, Left)>,
    /// Held objects whose grace period ended without their coming back: removed now.
    pub removed: Vec<ObjectKey>,
}

#[derive(Debug)]
struct File {
    text: String,
    objects: BTreeMap<ObjectKey, Object>,
}

#[derive(Debug)]
struct Held {
    object: Object,
    file: PathBuf,
    until: Instant,
}

/// What the directory held at the last scan.
#[derive(Debug)]
pub struct Directory {
    dir: PathBuf,
    grace: Duration,
    /// Unchanged text is not parsed again.
    files: BTreeMap<PathBuf, File>,
    /// Objects no file defines any more, kept until their grace period ends.
    held: BTreeMap<ObjectKey, Held>,
}

fn is_yaml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

impl Directory {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            grace: GRACE,
            files: BTreeMap::new(),
            held: BTreeMap::new(),
        }
    }

    /// Another grace period (zero applies removals at once).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Re-reads the directory at `now`. Fails only when the directory itself cannot be read.
    pub fn scan(&mut self, now: Instant) -> Result<Scan, std::io::Error> {
        let mut scan = Scan::default();
        // What each file defined before (cheap: objects are shared).
        let before: Vec<(PathBuf, BTreeMap<ObjectKey, Object>)> = self
            .files
            .iter()
            .map(|(path, file)| (path.clone(), file.objects.clone()))
            .collect();
        let mut seen = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if !is_yaml(&path) || !path.is_file() {
                continue;
            }
            let previous = self.files.remove(&path);
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(source) => {
                    scan.problems.push(DocumentError::Read {
                        file: path.clone(),
                        source,
                    });
                    // Keep what the file held while it cannot be read.
                    if let Some(previous) = previous {
                        seen.insert(path, previous);
                    }
                    continue;
                }
            };
            let mut last_good = match previous {
                Some(previous) if previous.text == text => {
                    seen.insert(path, previous);
                    continue;
                }
                Some(previous) => previous.objects,
                None => BTreeMap::new(),
            };
            // What the file held and is now in its grace period counts as its last good state too.
            for (key, held) in self.held.iter().filter(|(_, held)| held.file == path) {
                last_good.entry(key.clone()).or_insert_with(|| held.object.clone());
            }
            let objects = parse_file(&path, &text, &last_good, &mut scan.problems);
            seen.insert(path, File { text, objects });
        }
        self.files = seen;
        let present: BTreeSet<&ObjectKey> = self.files.values().flat_map(|f| f.objects.keys()).collect();
        self.held.retain(|key, _| !present.contains(key));
        for (path, objects) in before {
            let left = match self.files.get(&path) {
                None => Left::FileRemoved,
                Some(file) if file.objects.is_empty() => Left::FileEmptied,
                Some(_) => Left::FileShortened,
            };
            for (key, object) in objects {
                if present.contains(&key) || self.held.contains_key(&key) {
                    continue;
                }
                let until = now + self.grace;
                let file = path.clone();
                self.held.insert(key.clone(), Held { object, file, until });
                scan.held.push((path.clone(), key, left));
            }
        }
        let expired: Vec<ObjectKey> = self
            .held
            .iter()
            .filter(|(_, held)| held.until <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in expired {
            self.held.remove(&key);
            scan.removed.push(key);
        }
        Ok(scan)
    }

    /// Every object in force: those the files define, and those held.
    pub fn objects(&self) -> impl Iterator<Item = Object> + '_ {
        let defined = self.files.values().flat_map(|file| file.objects.values());
        defined.chain(self.held.values().map(|held| &held.object)).cloned()
    }

    /// When the next held object's grace period ends (a scan then applies its removal).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.values().map(|held| held.until).min()
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }
}

/// The objects of one file. Once a document is broken (its YAML, or the object it describes),
/// every object of `last_good` that the file does not define again is kept.
fn parse_file(
    path: &Path,
    text: &str,
    last_good: &BTreeMap<ObjectKey, Object>,
    problems: &mut Vec<DocumentError>,
) -> BTreeMap<ObjectKey, Object> {
    let mut objects = BTreeMap::new();
    let mut broken = false;
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
                // The rest of the stream cannot be trusted once the YAML itself is broken.
                broken = true;
                break;
            }
        };
        match objects::parse(document) {
            Ok(object) => {
                objects.insert(object.key(), object);
            }
            Err(source) => {
                broken = true;
                problems.push(DocumentError::Object {
                    file: path.to_owned(),
                    index,
                    source,
                });
            }
        }
    }
    if broken {
        for (key, object) in last_good {
            objects.entry(key.clone()).or_insert_with(|| object.clone());
        }
    }
    objects
}

#[cfg(test)]
mod tests;
