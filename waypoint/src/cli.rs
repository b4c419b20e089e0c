//! `waypoint apply|list|status|delete`: manage waypoints the way users do, by writing the objects
//! the controller reads. A waypoint is a Gateway of class `istio-waypoint` (listener `mesh`, port
//! 15008, HBONE); `--enroll-namespace` also labels its namespace `istio.io/use-waypoint`.
//!
//! Two places to write: a configuration directory (`--config-dir`: the lab's, or any
//! `istiod-lite --config-dir`), where the Gateway goes in `waypoint-<namespace>-<name>.yaml` and
//! the label in an overlay `zz-use-waypoint-<namespace>.yaml` (the controller lets later files
//! win); or the Kubernetes API (`--kubernetes`), with server-side apply for the Gateway and a
//! merge patch for the label.

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
        #[command(flatten)]
        store: Store,
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
    #[command(flatten)]
    pub store: Store,
}

/// Where the objects go: one of the two.
#[derive(Clone, Debug, Default, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Store {
    /// The controller's configuration directory.
    #[arg(long, env = "MESH_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// The Kubernetes API (kubeconfig from --kubeconfig, in-cluster, $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    pub kubernetes: bool,
    /// A kubeconfig file (with --kubernetes).
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
}

impl Store {
    pub fn directory(dir: &Path) -> Self {
        Self {
            config_dir: Some(dir.to_owned()),
            ..Self::default()
        }
    }

    async fn backend(&self) -> anyhow::Result<Backend> {
        if let Some(dir) = &self.config_dir {
            return Ok(Backend::Directory(dir.clone()));
        }
        let client = match &self.kubeconfig {
            None => kube::Client::try_default().await?,
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
                let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
                kube::Client::try_from(config)?
            }
        };
        Ok(Backend::Kubernetes(client))
    }
}

/// Where a subcommand reads and writes.
#[derive(Clone)]
pub enum Backend {
    Directory(PathBuf),
    Kubernetes(kube::Client),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Directory(dir) => f.debug_tuple("Directory").field(dir).finish(),
            Self::Kubernetes(_) => f.write_str("Kubernetes"),
        }
    }
}

impl Command {
    fn store(&self) -> &Store {
        match self {
            Self::Apply { target, .. } | Self::Status { target } | Self::Delete { target } => &target.store,
            Self::List { store } => store,
        }
    }
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

fn gateway_file(dir: &Path, target: &Target) -> PathBuf {
    dir.join(format!("waypoint-{}-{}.yaml", target.namespace, target.name))
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

fn gateway(target: &Target) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": target.name, "namespace": target.namespace},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    })
}

/// Runs a subcommand against the store its flags name; what it prints.
pub async fn run(command: Command) -> anyhow::Result<String> {
    let backend = command.store().backend().await?;
    run_with(command, backend).await
}

/// Runs a subcommand against `backend`.
pub async fn run_with(command: Command, backend: Backend) -> anyhow::Result<String> {
    if let Command::Apply { target, .. } = &command {
        valid_name("--namespace", &target.namespace)?;
        valid_name("--name", &target.name)?;
    }
    match backend {
        Backend::Directory(dir) => in_directory(command, &dir),
        Backend::Kubernetes(client) => kubernetes::run(command, client).await,
    }
}

fn in_directory(command: Command, dir: &Path) -> anyhow::Result<String> {
    let mut out = String::new();
    match command {
        Command::Apply {
            target,
            enroll_namespace,
        } => {
            let path = gateway_file(dir, &target);
            write(&path, &to_yaml(&gateway(&target))?)?;
            writeln!(
                out,
                "waypoint {}/{} applied ({})",
                target.namespace,
                target.name,
                path.display()
            )?;
            if enroll_namespace {
                let existing = objects(dir)?
                    .remove(&("Namespace".into(), String::new(), target.namespace.clone()))
                    .with_context(|| format!("namespace {} is not in {}", target.namespace, dir.display()))?;
                let mut namespace = existing;
                namespace["metadata"]["labels"]["istio.io/use-waypoint"] = json!(target.name);
                let path = enroll_file(dir, &target.namespace);
                write(&path, &to_yaml(&namespace)?)?;
                writeln!(out, "namespace {} now uses it ({})", target.namespace, path.display())?;
            }
        }
        Command::List { .. } => {
            let objects = objects(dir)?;
            let waypoints: Vec<_> = objects
                .iter()
                .filter(|((kind, _, _), o)| kind == "Gateway" && o["spec"]["gatewayClassName"] == "istio-waypoint")
                .map(|((_, namespace, name), _)| (namespace.clone(), name.clone()))
                .collect();
            let users = |namespace: &str, name: &str| users(&objects, namespace, name);
            list(&mut out, &waypoints, users)?;
        }
        Command::Status { target } => {
            let objects = objects(dir)?;
            let key = ("Gateway".to_owned(), target.namespace.clone(), target.name.clone());
            let users = objects
                .contains_key(&key)
                .then(|| users(&objects, &target.namespace, &target.name));
            status(&mut out, &target, users)?;
        }
        Command::Delete { target } => {
            let path = gateway_file(dir, &target);
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
            let enrolled = enroll_file(dir, &target.namespace);
            if enrolled.exists() {
                std::fs::remove_file(&enrolled)?;
                writeln!(out, "namespace {} no longer uses it", target.namespace)?;
            }
        }
    }
    Ok(out)
}

/// `list`'s lines, whatever the store.
fn list(out: &mut String, waypoints: &[(String, String)], users: impl Fn(&str, &str) -> String) -> std::fmt::Result {
    if waypoints.is_empty() {
        writeln!(out, "no waypoints")?;
    }
    for (namespace, name) in waypoints {
        writeln!(out, "{namespace}/{name}  used by: {}", users(namespace, name))?;
    }
    Ok(())
}

/// `status`'s line: `users` is `None` when the waypoint is not declared.
fn status(out: &mut String, target: &Target, users: Option<String>) -> std::fmt::Result {
    match users {
        Some(users) => writeln!(
            out,
            "waypoint {}/{}: declared; used by: {users}",
            target.namespace, target.name
        ),
        None => writeln!(out, "waypoint {}/{}: not found", target.namespace, target.name),
    }
}

/// The same subcommands against the Kubernetes API.
mod kubernetes {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};

    use super::*;

    fn gateways(client: &kube::Client, namespace: Option<&str>) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"));
        match namespace {
            Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
            None => Api::all_with(client.clone(), &resource),
        }
    }

    /// Namespaces labelled `istio.io/use-waypoint`, with the waypoint each names.
    async fn users(client: &kube::Client) -> anyhow::Result<Vec<(String, String)>> {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let labelled = namespaces
            .list(&ListParams::default().labels("istio.io/use-waypoint"))
            .await?;
        Ok(labelled
            .items
            .into_iter()
            .filter_map(|n| {
                let waypoint = n.metadata.labels.as_ref()?.get("istio.io/use-waypoint")?.clone();
                Some((n.metadata.name?, waypoint))
            })
            .collect())
    }

    fn users_of(users: &[(String, String)], namespace: &str, name: &str) -> String {
        let names: Vec<&str> = users
            .iter()
            .filter(|(user, waypoint)| user == namespace && waypoint == name)
            .map(|(user, _)| user.as_str())
            .collect();
        if names.is_empty() {
            "-".to_owned()
        } else {
            names.join(", ")
        }
    }

    pub(super) async fn run(command: Command, client: kube::Client) -> anyhow::Result<String> {
        let mut out = String::new();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        match command {
            Command::Apply {
                target,
                enroll_namespace,
            } => {
                let gateway: DynamicObject = serde_json::from_value(gateway(&target))?;
                gateways(&client, Some(&target.namespace))
                    .patch(
                        &target.name,
                        &PatchParams::apply("waypoint").force(),
                        &Patch::Apply(&gateway),
                    )
                    .await?;
                writeln!(out, "waypoint {}/{} applied", target.namespace, target.name)?;
                if enroll_namespace {
                    let label = json!({"metadata": {"labels": {"istio.io/use-waypoint": target.name}}});
                    namespaces
                        .patch(&target.namespace, &PatchParams::default(), &Patch::Merge(&label))
                        .await?;
                    writeln!(out, "namespace {} now uses it", target.namespace)?;
                }
            }
            Command::List { .. } => {
                let all = gateways(&client, None).list(&ListParams::default()).await?;
                let waypoints: Vec<(String, String)> = all
                    .items
                    .iter()
                    .filter(|g| g.data["spec"]["gatewayClassName"] == "istio-waypoint")
                    .map(|g| {
                        (
                            g.metadata.namespace.clone().unwrap_or_default(),
                            g.metadata.name.clone().unwrap_or_default(),
                        )
                    })
                    .collect();
                let users = users(&client).await?;
                list(&mut out, &waypoints, |namespace, name| {
                    users_of(&users, namespace, name)
                })?;
            }
            Command::Status { target } => {
                let found = gateways(&client, Some(&target.namespace)).get_opt(&target.name).await?;
                let users = match found {
                    Some(_) => Some(users_of(&users(&client).await?, &target.namespace, &target.name)),
                    None => None,
                };
                status(&mut out, &target, users)?;
            }
            Command::Delete { target } => {
                gateways(&client, Some(&target.namespace))
                    .delete(&target.name, &DeleteParams::default())
                    .await
                    .with_context(|| format!("waypoint {}/{}", target.namespace, target.name))?;
                writeln!(out, "waypoint {}/{} deleted", target.namespace, target.name)?;
                let namespace = namespaces.get(&target.namespace).await?;
                let label = namespace
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("istio.io/use-waypoint"));
                if label == Some(&target.name) {
                    let unlabel = json!({"metadata": {"labels": {"istio.io/use-waypoint": null}}});
                    namespaces
                        .patch(&target.namespace, &PatchParams::default(), &Patch::Merge(&unlabel))
                        .await?;
                    writeln!(out, "namespace {} no longer uses it", target.namespace)?;
                }
            }
        }
        Ok(out)
    }
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
            store: Store::directory(dir),
        }
    }

    fn list_of(dir: &Path) -> Command {
        Command::List {
            store: Store::directory(dir),
        }
    }

    #[tokio::test]
    async fn apply_list_status_delete_round_trip_in_a_directory() {
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
        .await
        .unwrap();
        assert!(applied.contains("waypoint demo/waypoint applied") && applied.contains("namespace demo now uses it"));
        let enrolled = objects(&dir).unwrap()[&("Namespace".into(), String::new(), "demo".into())].clone();
        assert_eq!(
            enrolled["metadata"]["labels"]["istio.io/dataplane-mode"], "ambient",
            "other labels kept"
        );
        assert_eq!(run(list_of(&dir)).await.unwrap(), "demo/waypoint  used by: demo\n");
        let status = run(Command::Status { target: target(&dir) }).await.unwrap();
        assert!(status.contains("declared; used by: demo"), "{status}");
        run(Command::Delete { target: target(&dir) }).await.unwrap();
        assert_eq!(run(list_of(&dir)).await.unwrap(), "no waypoints\n");
        let again = run(Command::Delete { target: target(&dir) }).await.unwrap_err();
        assert!(again.to_string().contains("was not applied"));
        let bad = run(Command::Apply {
            target: Target {
                namespace: "Demo_1".into(),
                ..target(&dir)
            },
            enroll_namespace: false,
        })
        .await;
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("\"Demo_1\" is not a valid Kubernetes name")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
