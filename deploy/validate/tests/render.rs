//! `deploy/kubernetes` renders offline (`kubectl kustomize`), the default install and every
//! overlay, with the objects of the mesh; every built-in object validates strictly (unknown fields
//! refused) with `kubernetes-validate` at each Kubernetes version the README names; every image
//! is one `scripts/images` builds, at its tag.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use mesh_deploy_tests::manifests::{Manifests, have, kubernetes_dir, workspace};
use serde_json::Value;

/// Kinds that come from CRDs, which kubernetes-validate has no schema for.
const CRD_KINDS: [&str; 1] = ["GatewayClass"];

fn kubectl(test: &str) -> bool {
    have(test, "kubectl", &["version", "--client"])
}

/// `(kind, namespace, name)` of every object.
fn objects(manifests: &Manifests) -> BTreeSet<(String, String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    manifests
        .documents
        .iter()
        .map(|d| {
            (
                text(&d["kind"]),
                text(&d["metadata"]["namespace"]),
                text(&d["metadata"]["name"]),
            )
        })
        .collect()
}

#[test]
fn every_variant_renders_with_the_objects_of_the_mesh() {
    if !kubectl("every_variant_renders_with_the_objects_of_the_mesh") {
        return;
    }
    let variants = Manifests::all();
    let names: Vec<&str> = variants.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, [".", "overlays/gke", "overlays/single-replica"]);
    let system = |kind: &str, name: &str| (kind.to_owned(), "istio-system".to_owned(), name.to_owned());
    let cluster = |kind: &str, name: &str| (kind.to_owned(), String::new(), name.to_owned());
    let mesh = BTreeSet::from([
        cluster("Namespace", "istio-system"),
        system("ServiceAccount", "istiod-lite"),
        cluster("ClusterRole", "istiod-lite"),
        cluster("ClusterRoleBinding", "istiod-lite"),
        system("Role", "istiod-lite"),
        system("RoleBinding", "istiod-lite"),
        system("Deployment", "istiod-lite"),
        system("Service", "istiod-lite"),
        system("ServiceAccount", "ztunnel"),
        system("DaemonSet", "ztunnel"),
        system("ServiceAccount", "mesh-node-agent"),
        cluster("ClusterRole", "mesh-node-agent"),
        cluster("ClusterRoleBinding", "mesh-node-agent"),
        system("DaemonSet", "mesh-node-agent"),
        cluster("GatewayClass", "istio-waypoint"),
    ]);
    for manifests in &variants {
        let mut expected = mesh.clone();
        if manifests.name != "overlays/single-replica" {
            expected.insert(system("PodDisruptionBudget", "istiod-lite"));
        }
        if manifests.name == "overlays/gke" {
            expected.insert(system("ResourceQuota", "critical-pods"));
        }
        assert_eq!(objects(manifests), expected, "{}", manifests.name);
        for document in &manifests.documents {
            assert_eq!(
                document["metadata"]["labels"]["app.kubernetes.io/part-of"], "ambient-mesh",
                "{}: {} {}",
                manifests.name, document["kind"], document["metadata"]["name"]
            );
        }
    }
}

/// The versions of the README's line `Supported Kubernetes versions: 1.30, 1.31, ...`.
fn supported_versions() -> Vec<String> {
    let readme = std::fs::read_to_string(kubernetes_dir().join("README.md")).unwrap();
    let line = readme
        .lines()
        .find_map(|l| l.strip_prefix("Supported Kubernetes versions:"))
        .expect("deploy/kubernetes/README.md names the supported Kubernetes versions");
    let versions: Vec<String> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|v| v.contains('.'))
        .map(|v| v.trim_end_matches('.').to_owned())
        .collect();
    assert!(!versions.is_empty(), "no versions in {line:?}");
    versions
}

/// A YAML file removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(label: &str, yaml: &str) -> Self {
        let label = label.replace('/', "-");
        let path = std::env::temp_dir().join(format!("mesh-deploy-{}-{label}.yaml", std::process::id()));
        std::fs::write(&path, yaml).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `kubernetes-validate --strict` at `version`: whether it passed, and its output lines.
fn validate(file: &TempFile, version: &str) -> (bool, Vec<String>) {
    let output = Command::new("kubernetes-validate")
        .args(["--strict", "-k", &format!("{version}.0")])
        .arg(&file.0)
        .output()
        .expect("kubernetes-validate runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text.lines().map(str::to_owned).collect())
}

#[test]
fn built_in_kinds_validate_strictly_at_the_supported_versions() {
    let test = "built_in_kinds_validate_strictly_at_the_supported_versions";
    if !kubectl(test) || !have(test, "kubernetes-validate", &["--version"]) {
        return;
    }
    let versions = supported_versions();
    for manifests in Manifests::all() {
        let file = TempFile::new(&manifests.name, &manifests.yaml);
        let built_in = manifests
            .documents
            .iter()
            .filter(|d| !CRD_KINDS.contains(&d["kind"].as_str().unwrap_or_default()))
            .count();
        for version in &versions {
            let (passed, lines) = validate(&file, version);
            let context = format!("{} at Kubernetes {version}:\n{}", manifests.name, lines.join("\n"));
            assert!(passed, "{context}");
            let validated = lines.iter().filter(|l| l.contains(" passed for resource ")).count();
            assert_eq!(validated, built_in, "every built-in object validated: {context}");
            for line in lines.iter().filter(|l| !l.contains(" passed for resource ")) {
                let expected = CRD_KINDS
                    .iter()
                    .any(|kind| line.contains(&format!("Couldn't find schema for kind {kind} ")));
                assert!(expected, "unexpected: {line}\n{context}");
            }
        }
    }

    // The check bites: a misspelt field is an error naming it.
    let manifests = Manifests::render(&kubernetes_dir());
    let typo = manifests.yaml.replacen("  replicas: 2", "  replicass: 2", 1);
    assert_ne!(typo, manifests.yaml);
    let (passed, lines) = validate(&TempFile::new("typo", &typo), &versions[0]);
    assert!(!passed);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("deployment/istiod-lite") && l.contains("'replicass' was unexpected")),
        "{lines:?}"
    );
}

/// Every image of the manifests: containers, init containers, and the waypoint image
/// istiod-lite deploys.
fn images(manifests: &Manifests) -> BTreeSet<String> {
    let mut images = BTreeSet::new();
    for workload in manifests.workloads() {
        for container in workload.containers().chain(workload.init_containers()) {
            images.insert(container["image"].as_str().unwrap().to_owned());
            for env in container["env"].as_array().into_iter().flatten() {
                if env["name"] == "WAYPOINT_IMAGE" {
                    images.insert(env["value"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    images
}

#[test]
fn every_image_is_one_scripts_images_builds() {
    if !kubectl("every_image_is_one_scripts_images_builds") {
        return;
    }
    let output = Command::new(workspace().join("scripts/images"))
        .arg("--list")
        .output()
        .expect("scripts/images runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let built: BTreeSet<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let version = workspace_version();
    let expected: BTreeSet<String> = ["istiod-lite", "mesh-node-agent", "waypoint", "ztunnel"]
        .iter()
        .map(|name| format!("ghcr.io/ambient-mesh/{name}:{version}"))
        .collect();
    assert_eq!(built, expected, "scripts/images --list: the workspace's version");
    for manifests in Manifests::all() {
        assert_eq!(images(&manifests), built, "{}", manifests.name);
    }
}

/// `[workspace.package] version` of the root Cargo.toml.
fn workspace_version() -> String {
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let package = manifest.split("[workspace.package]").nth(1).unwrap();
    let line = package.lines().find(|l| l.trim_start().starts_with("version")).unwrap();
    line.split('"').nth(1).unwrap().to_owned()
}
