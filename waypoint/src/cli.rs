//! `waypoint apply|list|status|delete`: manage waypoints the way users do, by writing the objects
//! the controller reads. A waypoint is a Gateway of class `istio-waypoint` (listener `mesh`, port
//! 15008, HBONE); `--enroll-namespace` also labels its namespace `istio.io/use-waypoint`. This
//! writes to a configuration directory (the lab's, or any `istiod-lite --config-dir`): the
//! Gateway in `waypoint-<namespace>-<name>.yaml`, the namespace's label in an overlay
//! `zz-use-waypoint-<namespace>.yaml` (the controller lets later files win).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// The waypoint subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Creates (or updates) a waypoint in a namespace.
    Apply {
        #[command(flatten)]
        target: Target,
        /// Also send the namespace's traffic through it (label `istio.io/use-waypoint`).
        #[arg(long)]
        enroll_namespace: bool,
    },
    /// Lists the waypoints, with the namespaces that use each.
    List {
        #[arg(long, env = "MESH_CONFIG_DIR")]
        config_dir: PathBuf,
    },
    /// Shows one waypoint: declared or not, and who uses it.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Deletes a waypoint and the namespace label `apply --enroll-namespace` set.
    Delete {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// The waypoint's namespace.
    #[arg(short = 'n', long)]
    pub namespace: String,
    /// The waypoint's (Gateway's) name.
    #[arg(long, default_value = "waypoint")]
    pub name: String,
    /// The controller's configuration directory.
    #[arg(long, env = "MESH_CONFIG_DIR")]
    pub config_dir: PathBuf,
}

fn valid_name(what: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("{what} {name:?} is not a valid Kubernetes name (lowercase letters, digits and '-')");
    }
    Ok(())
}

fn gateway_file(target: &Target) -> PathBuf {
    target
        .config_dir
        .join(format!("waypoint-{}-{}.yaml", target.namespace, target.name))
}

fn enroll_file(dir: &Path, namespace: &str) -> PathBuf {
    dir.join(format!("zz-use-waypoint-{namespace}.yaml"))
}

/// Every object of every YAML file in `dir`, later files overriding earlier ones (as the
/// controller reads them), keyed by kind/namespace/name.
fn objects(dir: &Path) -> anyhow::Result<BTreeMap<(String, String, String), Value>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("--config-dir {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut objects = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let mut reader = text.as_bytes();
        for document in serde_saphyr::read::<_, Value>(&mut reader) {
            let Ok(document) = document else { break };
            let field = |path: &[&str]| {
                path.iter()
                    .fold(&document, |v, k| &v[*k])
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            };
            let key = (
                field(&["kind"]),
                field(&["metadata", "namespace"]),
                field(&["metadata", "name"]),
            );
            objects.insert(key, document);
        }
    }
    Ok(objects)
}

/// Writes atomically (a temporary file, then a rename), as the watcher expects.
fn write(path: &Path, yaml: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, yaml).with_context(|| format!("write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

fn to_yaml(value: &Value) -> anyhow::Result<String> {
    // JSON is valid YAML; the controller reads it as such.
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

/// Runs a subcommand; what it prints.
pub fn run(command: Command) -> anyhow::Result<String> {
    let mut out = String::new();
    match command {
        Command::Apply {
            target,
            enroll_namespace,
        } => {
            valid_name("--namespace", &target.namespace)?;
            valid_name("--name", &target.name)?;
            let gateway = json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": target.name, "namespace": target.namespace},
                "spec": {
                    "gatewayClassName": "istio-waypoint",
                    "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
                },
            });
            let path = gateway_file(&target);
            write(&path, &to_yaml(&gateway)?)?;
            writeln!(
                out,
                "waypoint {}/{} applied ({})",
                target.namespace,
                target.name,
                path.display()
            )?;
            if enroll_namespace {
                let existing = objects(&target.config_dir)?
                    .remove(&("Namespace".into(), String::new(), target.namespace.clone()))
                    .with_context(|| {
                        format!(
                            "namespace {} is not in {}",
                            target.namespace,
                            target.config_dir.display()
                        )
                    })?;
                let mut namespace = existing;
                namespace["metadata"]["labels"]["istio.io/use-waypoint"] = json!(target.name);
                let path = enroll_file(&target.config_dir, &target.namespace);
                write(&path, &to_yaml(&namespace)?)?;
                writeln!(out, "namespace {} now uses it ({})", target.namespace, path.display())?;
            }
        }
        Command::List { config_dir } => {
            let objects = objects(&config_dir)?;
            let waypoints: Vec<_> = objects
                .iter()
                .filter(|((kind, _, _), o)| kind == "Gateway" && o["spec"]["gatewayClassName"] == "istio-waypoint")
                .map(|((_, namespace, name), _)| (namespace.clone(), name.clone()))
                .collect();
            if waypoints.is_empty() {
                writeln!(out, "no waypoints")?;
            }
            for (namespace, name) in waypoints {
                writeln!(
                    out,
                    "{namespace}/{name}  used by: {}",
                    users(&objects, &namespace, &name)
                )?;
            }
        }
        Command::Status { target } => {
            let objects = objects(&target.config_dir)?;
            let key = ("Gateway".to_owned(), target.namespace.clone(), target.name.clone());
            match objects.get(&key) {
                Some(_) => writeln!(
                    out,
                    "waypoint {}/{}: declared; used by: {}",
                    target.namespace,
                    target.name,
                    users(&objects, &target.namespace, &target.name)
                )?,
                None => writeln!(out, "waypoint {}/{}: not found", target.namespace, target.name)?,
            }
        }
        Command::Delete { target } => {
            let path = gateway_file(&target);
            if !path.exists() {
                bail!(
                    "waypoint {}/{} was not applied by this tool ({} is missing)",
                    target.namespace,
                    target.name,
                    path.display()
                );
            }
            std::fs::remove_file(&path)?;
            writeln!(out, "waypoint {}/{} deleted", target.namespace, target.name)?;
            let enrolled = enroll_file(&target.config_dir, &target.namespace);
            if enrolled.exists() {
                std::fs::remove_file(&enrolled)?;
                writeln!(out, "namespace {} no longer uses it", target.namespace)?;
            }
        }
    }
    Ok(out)
}

/// Namespaces labelled to use `namespace/name`.
fn users(objects: &BTreeMap<(String, String, String), Value>, namespace: &str, name: &str) -> String {
    let users: Vec<&str> = objects
        .iter()
        .filter(|((kind, _, object), o)| {
            kind == "Namespace" && object == namespace && o["metadata"]["labels"]["istio.io/use-waypoint"] == name
        })
        .map(|((_, _, object), _)| object.as_str())
        .collect();
    if users.is_empty() {
        "-".to_owned()
    } else {
        users.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &Path) -> Target {
        Target {
            namespace: "demo".into(),
            name: "waypoint".into(),
            config_dir: dir.to_owned(),
        }
    }

    #[test]
    fn apply_list_status_delete_round_trip() {
        let dir = std::env::temp_dir().join(format!("waypoint-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("demo.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n",
        )
        .unwrap();
        let applied = run(Command::Apply {
            target: target(&dir),
            enroll_namespace: true,
        })
        .unwrap();
        assert!(applied.contains("waypoint demo/waypoint applied") && applied.contains("namespace demo now uses it"));
        let enrolled = objects(&dir).unwrap()[&("Namespace".into(), String::new(), "demo".into())].clone();
        assert_eq!(
            enrolled["metadata"]["labels"]["istio.io/dataplane-mode"], "ambient",
            "other labels kept"
        );
        assert_eq!(
            run(Command::List {
                config_dir: dir.clone()
            })
            .unwrap(),
            "demo/waypoint  used by: demo\n"
        );
        assert!(
            run(Command::Status { target: target(&dir) })
                .unwrap()
                .contains("declared; used by: demo")
        );
        run(Command::Delete { target: target(&dir) }).unwrap();
        assert_eq!(
            run(Command::List {
                config_dir: dir.clone()
            })
            .unwrap(),
            "no waypoints\n"
        );
        assert!(
            run(Command::Delete { target: target(&dir) })
                .unwrap_err()
                .to_string()
                .contains("was not applied")
        );
        let bad = run(Command::Apply {
            target: Target {
                namespace: "Demo_1".into(),
                ..target(&dir)
            },
            enroll_namespace: false,
        });
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("\"Demo_1\" is not a valid Kubernetes name")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
