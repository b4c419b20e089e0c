//! RBAC as the API server evaluates it, for comparing what a manifest grants with what a program
//! does: the Roles, ClusterRoles and bindings of rendered manifests, the rules that reach one
//! service account, and a comparison with the requests the Kubernetes API double recorded
//! ([`kube_api_double::ApiServer::calls`]).
//!
//! A grant is *used* when some request needed it. [`Grants::compare`] reports requests no rule
//! allows, rule parts (group × resource × verb × name) no request needed, wildcards, and
//! cluster-wide grants that were only ever used in the subject's own namespace (a Role there would
//! do). The program's tests include this file by path (`#[path]`), so it depends on nothing but
//! `serde_json`, `serde-saphyr` and the double.

use std::collections::BTreeSet;
use std::fmt;

use kube_api_double::ApiCall;
use serde_json::Value;

/// One request as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub verb: String,
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl From<&ApiCall> for Access {
    fn from(call: &ApiCall) -> Self {
        let resource = match &call.subresource {
            Some(sub) => format!("{}/{sub}", call.resource),
            None => call.resource.clone(),
        };
        Self {
            verb: call.verb.clone(),
            group: call.group.clone(),
            resource,
            namespace: call.namespace.clone(),
            name: call.name.clone(),
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = if self.group.is_empty() { "core" } else { &self.group };
        write!(f, "{} {group}/{}", self.verb, self.resource)?;
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        match &self.namespace {
            Some(namespace) => write!(f, " in {namespace}"),
            None => write!(f, " (cluster scope)"),
        }
    }
}

/// The requests `calls` made as `user`, with what the API server also authorizes for them: a
/// server-side apply (`patch`) that creates its object is authorized as `create` of that name too.
/// `existed` says whether an object was there before the program's first write to it (the test
/// knows what it seeded); later writes find what the first one made.
pub fn requests_of(user: &str, calls: &[ApiCall], existed: impl Fn(&Access) -> bool) -> Vec<Access> {
    let mut written = BTreeSet::new();
    let mut requests = Vec::new();
    for access in calls.iter().filter(|c| c.user == user).map(Access::from) {
        let object = (
            access.group.clone(),
            access.resource.clone(),
            access.namespace.clone(),
            access.name.clone(),
        );
        if access.verb == "patch" && !access.resource.contains('/') && access.name.is_some() {
            if !existed(&access) && !written.contains(&object) {
                requests.push(Access {
                    verb: "create".into(),
                    ..access.clone()
                });
            }
            written.insert(object);
        }
        requests.push(access);
    }
    requests
}

#[derive(Clone, Debug, PartialEq)]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    resource_names: Vec<String>,
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

impl Rule {
    fn parse(value: &Value) -> Self {
        Self {
            api_groups: strings(&value["apiGroups"]),
            resources: strings(&value["resources"]),
            verbs: strings(&value["verbs"]),
            resource_names: strings(&value["resourceNames"]),
        }
    }

    fn has_wildcard(&self) -> bool {
        [&self.api_groups, &self.resources, &self.verbs]
            .iter()
            .any(|list| list.iter().any(|v| v == "*"))
    }

    /// Every group × resource × verb × name this rule grants (name `None`: any name).
    fn atoms(&self) -> Vec<Atom> {
        let names: Vec<Option<String>> = match self.resource_names.is_empty() {
            true => vec![None],
            false => self.resource_names.iter().cloned().map(Some).collect(),
        };
        let mut atoms = Vec::new();
        for group in &self.api_groups {
            for resource in &self.resources {
                for verb in &self.verbs {
                    for name in &names {
                        atoms.push(Atom {
                            group: group.clone(),
                            resource: resource.clone(),
                            verb: verb.clone(),
                            name: name.clone(),
                        });
                    }
                }
            }
        }
        atoms
    }
}

/// The smallest part of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Atom {
    group: String,
    resource: String,
    verb: String,
    name: Option<String>,
}

fn matches(pattern: &str, value: &str) -> bool {
    pattern == "*" || pattern == value
}

impl Atom {
    /// As the RBAC authorizer decides: a rule with resourceNames matches only requests that name
    /// one of them (so never a list, a watch or a create).
    fn allows(&self, access: &Access) -> bool {
        matches(&self.group, &access.group)
            && matches(&self.resource, &access.resource)
            && matches(&self.verb, &access.verb)
            && match &self.name {
                None => true,
                Some(name) => access.name.as_deref() == Some(name),
            }
    }
}

/// A rule, where it applies, and where it came from.
#[derive(Clone, Debug)]
struct Granted {
    /// `None`: every namespace and cluster-scoped resources (a ClusterRoleBinding).
    namespace: Option<String>,
    rule: Rule,
    origin: String,
}

impl Granted {
    fn in_scope(&self, access: &Access) -> bool {
        match &self.namespace {
            None => true,
            Some(namespace) => access.namespace.as_deref() == Some(namespace),
        }
    }
}

/// The RBAC objects of a set of manifests.
#[derive(Clone, Debug, Default)]
pub struct Rbac {
    objects: Vec<Value>,
}

impl Rbac {
    /// The RBAC objects among `documents` (others are ignored).
    pub fn new(documents: &[Value]) -> Self {
        let objects = documents
            .iter()
            .filter(|d| d["apiVersion"] == "rbac.authorization.k8s.io/v1")
            .cloned()
            .collect();
        Self { objects }
    }

    /// Parses multi-document YAML (e.g. `kubectl kustomize` output). Panics on invalid YAML.
    pub fn from_yaml(yaml: &str) -> Self {
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(yaml).unwrap_or_else(|error| panic!("invalid YAML: {error}"));
        Self::new(&documents)
    }

    fn role(&self, kind: &str, name: &str, namespace: Option<&str>) -> Option<&Value> {
        self.objects.iter().find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == name
                && (kind == "ClusterRole" || o["metadata"]["namespace"].as_str() == namespace)
        })
    }

    /// Every rule bound to the service account `namespace/name`. Panics when a binding names a
    /// role the manifests lack (the API server would accept it, and it would grant nothing).
    pub fn grants(&self, namespace: &str, name: &str) -> Grants {
        let mut granted = Vec::new();
        let bindings = self
            .objects
            .iter()
            .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding");
        for binding in bindings {
            let bound = binding["subjects"].as_array().into_iter().flatten().any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == name && s["namespace"].as_str() == Some(namespace)
            });
            if !bound {
                continue;
            }
            let scope = match binding["kind"].as_str() {
                Some("RoleBinding") => binding["metadata"]["namespace"].as_str().map(str::to_owned),
                _ => None,
            };
            let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
            let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
            let role = self.role(role_kind, role_name, scope.as_deref()).unwrap_or_else(|| {
                panic!(
                    "{} {} binds {role_kind} {role_name}, which the manifests do not define",
                    binding["kind"].as_str().unwrap_or_default(),
                    binding["metadata"]["name"].as_str().unwrap_or_default()
                )
            });
            for (index, rule) in role["rules"].as_array().into_iter().flatten().enumerate() {
                granted.push(Granted {
                    namespace: scope.clone(),
                    rule: Rule::parse(rule),
                    origin: format!("{role_kind} {role_name} rule {}", index + 1),
                });
            }
        }
        Grants {
            subject_namespace: namespace.to_owned(),
            granted,
        }
    }
}

/// The rules that reach one service account.
#[derive(Clone, Debug)]
pub struct Grants {
    subject_namespace: String,
    granted: Vec<Granted>,
}

/// What [`Grants::compare`] found; [`Comparison::is_exact`] when it found nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Comparison {
    /// Requests no rule allows (the program would be refused).
    pub refused: Vec<String>,
    /// Rule parts no request needed.
    pub unused: Vec<String>,
    /// Rules that grant more than any request can need (wildcards, a cluster-wide grant used in
    /// the subject's own namespace only).
    pub too_wide: Vec<String>,
}

impl Comparison {
    pub fn is_exact(&self) -> bool {
        self.refused.is_empty() && self.unused.is_empty() && self.too_wide.is_empty()
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (title, list) in [
            ("not granted", &self.refused),
            ("granted but never used", &self.unused),
            ("granted too widely", &self.too_wide),
        ] {
            if !list.is_empty() {
                writeln!(f, "{title}:")?;
                for line in list {
                    writeln!(f, "  {line}")?;
                }
            }
        }
        Ok(())
    }
}

impl Grants {
    /// Whether some rule allows `access`.
    pub fn allows(&self, access: &Access) -> bool {
        self.granted
            .iter()
            .any(|g| g.in_scope(access) && g.rule.atoms().iter().any(|a| a.allows(access)))
    }

    /// Compares the grants with `requests` (see [`requests_of`]).
    pub fn compare(&self, requests: &[Access]) -> Comparison {
        let mut comparison = Comparison::default();
        let refused: BTreeSet<String> = requests
            .iter()
            .filter(|r| !self.allows(r))
            .map(ToString::to_string)
            .collect();
        comparison.refused = refused.into_iter().collect();
        for granted in &self.granted {
            if granted.rule.has_wildcard() {
                comparison.too_wide.push(format!(
                    "{}: a wildcard grants more than any request needs",
                    granted.origin
                ));
            }
            for atom in granted.rule.atoms() {
                let users: Vec<&Access> = requests
                    .iter()
                    .filter(|r| granted.in_scope(r) && atom.allows(r))
                    .collect();
                let named = atom.name.as_deref().map(|n| format!(" {n}")).unwrap_or_default();
                let part = format!("{} {}/{}{named}", atom.verb, group(&atom.group), atom.resource);
                if users.is_empty() {
                    comparison.unused.push(format!("{}: {part}", granted.origin));
                } else if granted.namespace.is_none()
                    && users
                        .iter()
                        .all(|r| r.namespace.as_deref() == Some(self.subject_namespace.as_str()))
                {
                    comparison.too_wide.push(format!(
                        "{}: {part} is granted in every namespace but only used in {} (a Role there would do)",
                        granted.origin, self.subject_namespace
                    ));
                }
            }
        }
        comparison
    }
}

fn group(group: &str) -> &str {
    if group.is_empty() { "core" } else { group }
}

/// `kubectl kustomize deploy/kubernetes` (relative to the including crate's directory), or `None` (skipped with a message) without kubectl,
/// except in CI (`CI=true`), where that is a failure.
pub fn rendered(test: &str) -> Option<Vec<Value>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let output = match std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
    {
        Ok(output) => output,
        Err(error) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: needs kubectl ({error}), and CI=true requires it to run"
            );
            eprintln!("SKIPPED {test}: needs kubectl ({error})");
            return None;
        }
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let documents: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(output.stdout).unwrap()).unwrap();
    Some(documents.into_iter().filter(|d| !d.is_null()).collect())
}
