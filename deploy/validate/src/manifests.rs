//! `deploy/kubernetes` as `kubectl kustomize` renders it: the default install and every overlay,
//! as JSON values, with the lookups the validation tests share.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `deploy/kubernetes`.
pub fn kubernetes_dir() -> PathBuf {
    workspace().join("deploy/kubernetes")
}

/// The default install and every directory of `overlays/`, in that order.
pub fn variants() -> Vec<PathBuf> {
    let root = kubernetes_dir();
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(root.join("overlays"))
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    overlays.retain(|p| p.join("kustomization.yaml").is_file());
    overlays.sort();
    std::iter::once(root).chain(overlays).collect()
}

/// Whether `tool` can be run (`tool --help` or `tool version` exits). When it cannot, the test
/// is skipped with a message, except in CI (`CI=true`), where a missing tool is a failure.
pub fn have(test: &str, tool: &str, probe: &[&str]) -> bool {
    let runs = Command::new(tool)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if runs {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: needs {tool} (scripts/test installs it), and CI=true requires it to run"
    );
    eprintln!("SKIPPED {test}: needs {tool} (scripts/test installs it)");
    false
}

/// `kubectl kustomize <dir>`: the rendered YAML, or the first line of kustomize's complaint.
pub fn kustomize(dir: &Path) -> Result<String, String> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| format!("kubectl kustomize {}: {e}", dir.display()))?;
    if !output.status.success() {
        return Err(format!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    String::from_utf8(output.stdout).map_err(|e| format!("kubectl kustomize {}: {e}", dir.display()))
}

/// One rendered variant.
#[derive(Clone, Debug)]
pub struct Manifests {
    /// The kustomization directory, relative to `deploy/kubernetes` (`.` for the default).
    pub name: String,
    pub yaml: String,
    pub documents: Vec<Value>,
}

impl Manifests {
    /// Renders `dir`; panics with kustomize's message when it does not render.
    pub fn render(dir: &Path) -> Self {
        let yaml = kustomize(dir).unwrap_or_else(|e| panic!("{e}"));
        let documents: Vec<Value> = serde_saphyr::from_multiple(&yaml)
            .unwrap_or_else(|e| panic!("kubectl kustomize {}: invalid YAML: {e}", dir.display()));
        let name = dir
            .strip_prefix(kubernetes_dir())
            .ok()
            .map(|p| p.display().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| ".".to_owned());
        Self {
            name,
            yaml,
            documents: documents.into_iter().filter(|d| !d.is_null()).collect(),
        }
    }

    /// Every variant, rendered.
    pub fn all() -> Vec<Self> {
        variants().iter().map(|dir| Self::render(dir)).collect()
    }

    pub fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Value> + 'a {
        let kind = kind.to_owned();
        self.documents.iter().filter(move |d| d["kind"] == kind.as_str())
    }

    /// The object of `kind` named `name`; panics naming the variant when there is none.
    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.of_kind(kind)
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.name))
    }

    /// The objects that run pods (Deployments, DaemonSets), each with its pod template.
    pub fn workloads(&self) -> impl Iterator<Item = Workload<'_>> + '_ {
        self.documents
            .iter()
            .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "DaemonSet")))
            .map(|object| Workload {
                object,
                pod: &object["spec"]["template"],
            })
    }
}

/// A Deployment or DaemonSet.
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    pub object: &'a Value,
    /// `spec.template`.
    pub pod: &'a Value,
}

impl<'a> Workload<'a> {
    /// `Kind/name`.
    pub fn id(&self) -> String {
        format!(
            "{}/{}",
            self.object["kind"].as_str().unwrap_or_default(),
            self.object["metadata"]["name"].as_str().unwrap_or_default()
        )
    }

    pub fn containers(&self) -> impl Iterator<Item = &'a Value> + 'a {
        self.pod["spec"]["containers"].as_array().into_iter().flatten()
    }

    pub fn init_containers(&self) -> impl Iterator<Item = &'a Value> + 'a {
        self.pod["spec"]["initContainers"].as_array().into_iter().flatten()
    }

    /// The pod volume named `name`.
    pub fn volume(&self, name: &str) -> Option<&'a Value> {
        let volumes = self.pod["spec"]["volumes"].as_array()?;
        volumes.iter().find(|v| v["name"] == name)
    }

    /// The volume mounted at `path` in `container` (or at a parent directory of it), with the
    /// mount.
    pub fn volume_at(&self, container: &Value, path: &str) -> Option<(&'a Value, String)> {
        let mounts = container["volumeMounts"].as_array()?;
        let mount = mounts.iter().find(|m| {
            let at = m["mountPath"].as_str().unwrap_or_default();
            path == at || path.starts_with(&format!("{}/", at.trim_end_matches('/')))
        })?;
        let at = mount["mountPath"].as_str().unwrap_or_default().to_owned();
        Some((self.volume(mount["name"].as_str()?)?, at))
    }
}

/// An image reference without its tag or digest (`ghcr.io/ambient-mesh/ztunnel:0.1.0` →
/// `ghcr.io/ambient-mesh/ztunnel`), and its tag.
pub fn image_name(image: &str) -> (&str, Option<&str>) {
    let image = image.split('@').next().unwrap_or(image);
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (image, None),
    }
}
