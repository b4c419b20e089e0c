//! Pods and Namespaces from a directory of Kubernetes YAML (every `.yaml`/`.yml`, multi-document),
//! read afresh at each lookup: the lab writes a pod's manifest before it creates the pod, and a
//! directory of a lab's size reads in well under a millisecond. Documents that do not parse are
//! skipped with a warning naming file and document.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::Value;
use tracing::warn;

use super::{Found, SourceError};

#[derive(Clone, Debug)]
pub struct Files {
    dir: PathBuf,
}

impl Files {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    /// The pod `namespace/name` and its Namespace. Blocking.
    pub fn lookup(&self, namespace: &str, name: &str) -> Result<Found, SourceError> {
        let directory_error = |error| SourceError::Directory {
            dir: self.dir.display().to_string(),
            error,
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(directory_error)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        entries.sort();
        let (mut pod, mut found_namespace) = (None, None);
        for path in entries {
            for (index, document) in documents(&path) {
                match identify(&document) {
                    Some(("Pod", Some(ns), n)) if ns == namespace && n == name && pod.is_none() => {
                        pod = parse::<Pod>(&path, index, document);
                    }
                    Some(("Namespace", None, n)) if n == namespace && found_namespace.is_none() => {
                        found_namespace = parse::<Namespace>(&path, index, document);
                    }
                    _ => {}
                }
            }
        }
        let pod = pod.ok_or_else(|| SourceError::Unknown {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            origin: format!("--config-dir {}", self.dir.display()),
        })?;
        Ok(Found {
            pod,
            namespace: found_namespace,
        })
    }
}

/// The documents of one file; a file that cannot be read or is not YAML yields none.
fn documents(path: &Path) -> Vec<(usize, Value)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            warn!(file = %path.display(), %error, "cannot read");
            return Vec::new();
        }
    };
    match serde_saphyr::from_multiple::<Value>(&text) {
        Ok(documents) => documents
            .into_iter()
            .enumerate()
            .filter(|(_, d)| !d.is_null())
            .collect(),
        Err(error) => {
            warn!(file = %path.display(), %error, "invalid YAML, file skipped");
            Vec::new()
        }
    }
}

/// A core/v1 object's kind, namespace (Pods default to `default`) and name.
fn identify(document: &Value) -> Option<(&str, Option<&str>, &str)> {
    if document["apiVersion"].as_str() != Some("v1") {
        return None;
    }
    let kind = document["kind"].as_str()?;
    let name = document["metadata"]["name"].as_str()?;
    let namespace = match kind {
        "Namespace" => None,
        _ => Some(document["metadata"]["namespace"].as_str().unwrap_or("default")),
    };
    Some((kind, namespace, name))
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, index: usize, document: Value) -> Option<T> {
    match serde_path_to_error::deserialize(document) {
        Ok(object) => Some(object),
        Err(error) => {
            warn!(file = %path.display(), document = index, field = %error.path(), error = %error.inner(), "invalid object, skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_pod_and_its_namespace() {
        let dir = std::env::temp_dir().join(format!("mesh-cni-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("demo.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: demo}\nspec: {serviceAccountName: client, containers: [{name: c, image: i}]}\n",
        )
        .unwrap();
        std::fs::write(dir.join("broken.yaml"), "kind: [unclosed\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "kind: Pod\n").unwrap();
        let files = Files::new(&dir);
        let found = files.lookup("demo", "client").unwrap();
        assert_eq!(super::super::service_account(&found.pod), "client");
        assert_eq!(super::super::ambient(&found), Ok(()));
        let unknown = files.lookup("demo", "server").unwrap_err().to_string();
        assert!(
            unknown.starts_with("K8S_POD_NAME=server: no Pod demo/server in --config-dir "),
            "{unknown}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
