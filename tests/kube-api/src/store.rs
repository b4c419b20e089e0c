//! The objects, as etcd and the registry keep them: one global resourceVersion counter, server-set
//! metadata, a bounded history of changes that watches replay, and the garbage collector.

mod cluster_ips;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};

use crate::auth::{ApiCall, Auth, BoundPod};
use crate::meta;
use crate::resources::Kind;
use crate::status::{self, Status};
use crate::watch::{Change, EventType, Filter, Message, Subscription, Watches};
use cluster_ips::ClusterIps;

/// Where an object lives: kind, namespace (empty when cluster-scoped), name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    group: &'static str,
    plural: &'static str,
    namespace: String,
    name: String,
}

impl Key {
    pub fn new(kind: &'static Kind, namespace: Option<&str>, name: &str) -> Key {
        Key {
            group: kind.group,
            plural: kind.plural,
            namespace: namespace.filter(|_| kind.namespaced).unwrap_or_default().to_owned(),
            name: name.to_owned(),
        }
    }

    fn of(kind: &'static Kind, object: &Value) -> Key {
        let metadata = &object["metadata"];
        Key::new(
            kind,
            metadata["namespace"].as_str(),
            metadata["name"].as_str().unwrap_or_default(),
        )
    }
}

/// Everything the server holds, behind one lock (never held across an await).
#[derive(Debug)]
pub struct State {
    revision: u64,
    objects: BTreeMap<Key, (&'static Kind, Value)>,
    pub watches: Watches,
    uninstalled: HashSet<(String, String)>,
    cluster_ips: ClusterIps,
    pub auth: Auth,
    pub calls: Vec<ApiCall>,
}

/// The shared state of one API server, kept across stop and restart.
#[derive(Debug)]
pub struct Store {
    state: Mutex<State>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            state: Mutex::new(State {
                revision: 1,
                objects: BTreeMap::new(),
                watches: Watches::default(),
                uninstalled: HashSet::new(),
                cluster_ips: ClusterIps::default(),
                auth: Auth::default(),
                calls: Vec::new(),
            }),
        }
    }
}

impl Store {
    pub fn new() -> Arc<Store> {
        Arc::new(Store::default())
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Who creates an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A request: its Namespace must exist, and the server sets uid and creationTimestamp.
    Client,
    /// The test seeding the cluster: no Namespace needed, a given uid or creationTimestamp kept.
    Admin,
}

/// How an update treats the stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// The main resource: status stays as stored when the kind has a status subresource.
    Main,
    /// The status subresource: only status changes.
    Status,
    /// The test's own write: the object replaces what is stored, status included.
    Admin,
}

impl State {
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn installed(&self, kind: &Kind) -> bool {
        !self
            .uninstalled
            .contains(&(kind.group.to_owned(), kind.plural.to_owned()))
    }

    pub fn install(&mut self, kind: &'static Kind) {
        self.uninstalled
            .remove(&(kind.group.to_owned(), kind.plural.to_owned()));
    }

    /// Removes the CRD: its objects are deleted and the watches on it end.
    pub fn uninstall(&mut self, kind: &'static Kind) {
        let keys: Vec<Key> = self.objects.keys().filter(|k| is_of(k, kind)).cloned().collect();
        for key in keys {
            self.remove(&key);
        }
        self.watches.end_kind(kind);
        self.uninstalled.insert((kind.group.to_owned(), kind.plural.to_owned()));
    }

    /// Whether the pod a token is bound to still exists, with the same uid.
    pub fn pod_exists(&self, (namespace, name, uid): BoundPod<'_>) -> bool {
        let pods = crate::resources::by_kind("v1", "Pod").expect("in the table");
        self.get(pods, Some(namespace), name)
            .is_some_and(|pod| pod["metadata"]["uid"] == uid)
    }

    pub fn get(&self, kind: &'static Kind, namespace: Option<&str>, name: &str) -> Option<&Value> {
        self.objects
            .get(&Key::new(kind, namespace, name))
            .map(|(_, object)| object)
    }

    /// The objects of a kind, in one namespace or all, in key order.
    pub fn list(&self, kind: &'static Kind, namespace: Option<&str>) -> impl Iterator<Item = &Value> {
        self.objects
            .iter()
            .filter(move |(key, _)| is_of(key, kind) && namespace.is_none_or(|ns| key.namespace == ns))
            .map(|(_, (_, object))| object)
    }

    /// Creates `object` in `namespace`.
    pub fn create(
        &mut self,
        kind: &'static Kind,
        namespace: Option<&str>,
        mut object: Value,
        origin: Origin,
    ) -> Result<Value, Status> {
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let metadata = &mut object["metadata"];
        if metadata["name"].as_str().unwrap_or_default().is_empty()
            && let Some(prefix) = metadata["generateName"].as_str().filter(|p| !p.is_empty())
        {
            metadata["name"] = json!(format!("{prefix}{}", meta::generated_suffix()));
        }
        let name = metadata["name"].as_str().unwrap_or_default().to_owned();
        if name.is_empty() {
            let cause = "metadata.name: Required value: name or generateName is required";
            return Err(status::invalid(kind, "", cause));
        }
        match (kind.namespaced, namespace.or(metadata["namespace"].as_str())) {
            (true, Some(namespace)) => metadata["namespace"] = json!(namespace),
            (true, None) => {
                return Err(status::bad_request(
                    "the namespace of the object is required".to_owned(),
                ));
            }
            (false, _) => _ = metadata.as_object_mut().map(|m| m.remove("namespace")),
        }
        if origin == Origin::Client && kind.namespaced {
            let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
            let namespaces = crate::resources::by_kind("v1", "Namespace").expect("in the table");
            if self.get(namespaces, None, namespace).is_none() {
                return Err(status::not_found(namespaces, namespace));
            }
        }
        let key = Key::of(kind, &object);
        if self.objects.contains_key(&key) {
            return Err(status::already_exists(kind, &name));
        }
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind);
        let metadata = &mut object["metadata"];
        let server_sets = |field: &Value| origin == Origin::Client || field.as_str().is_none_or(str::is_empty);
        if server_sets(&metadata["uid"]) {
            metadata["uid"] = json!(meta::uid());
        }
        if server_sets(&metadata["creationTimestamp"]) {
            metadata["creationTimestamp"] = json!(meta::timestamp());
        }
        metadata["generation"] = json!(1);
        if kind.kind == "Service" {
            self.allocate_cluster_ip(&mut object);
        }
        Ok(self.commit(kind, key, object, None))
    }

    /// Replaces the stored object; `metadata.resourceVersion`, when set, must be the stored one.
    pub fn update(
        &mut self,
        kind: &'static Kind,
        namespace: Option<&str>,
        name: &str,
        mut object: Value,
        write: Write,
    ) -> Result<Value, Status> {
        let key = Key::new(kind, namespace, name);
        let Some((_, old)) = self.objects.get(&key) else {
            return Err(status::not_found(kind, &key.name));
        };
        let stored_version = &old["metadata"]["resourceVersion"];
        match &object["metadata"]["resourceVersion"] {
            Value::Null => {}
            Value::String(v) if v.is_empty() => {}
            version if write != Write::Admin && version != stored_version => {
                return Err(status::conflict(kind, &key.name));
            }
            _ => {}
        }
        let old = old.clone();
        if write == Write::Status {
            let status = object["status"].take();
            object = old.clone();
            object["status"] = status;
        } else if write == Write::Main && kind.status {
            object["status"] = old["status"].clone();
        }
        if let Some(fields) = object.as_object_mut()
            && fields.get("status").is_some_and(Value::is_null)
        {
            fields.remove("status");
        }
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind);
        for field in [
            "name",
            "uid",
            "creationTimestamp",
            "namespace",
            "generation",
            "resourceVersion",
        ] {
            object["metadata"][field] = old["metadata"][field].clone();
        }
        if object["metadata"]["managedFields"].is_null() {
            object["metadata"]["managedFields"] = old["metadata"]["managedFields"].clone();
        }
        if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.retain(|_, v| !v.is_null());
        }
        if kind.kind == "Service" {
            for field in ["clusterIP", "clusterIPs"] {
                if object["spec"][field].is_null() && !old["spec"][field].is_null() {
                    object["spec"][field] = old["spec"][field].clone();
                }
            }
        }
        if object == old {
            return Ok(old);
        }
        if spec_of(&object) != spec_of(&old) {
            let generation = old["metadata"]["generation"].as_u64().unwrap_or(1);
            object["metadata"]["generation"] = json!(generation + 1);
        }
        Ok(self.commit(kind, key, object, Some(old)))
    }

    /// Deletes the object and, as the garbage collector would, everything it owns; a deleted
    /// Namespace takes its objects with it.
    pub fn delete(&mut self, kind: &'static Kind, namespace: Option<&str>, name: &str) -> Result<Value, Status> {
        self.remove(&Key::new(kind, namespace, name))
            .ok_or_else(|| status::not_found(kind, name))
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let (kind, mut object) = self.objects.remove(key)?;
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        let object = Arc::new(object);
        self.record(Change {
            kind,
            event: EventType::Deleted,
            object: object.clone(),
            old: None,
            revision: self.revision,
        });
        let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
        let is_namespace = kind.kind == "Namespace" && kind.group.is_empty();
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(k, (_, o))| owned_by(o, uid) || (is_namespace && k.namespace == key.name))
            .map(|(k, _)| k.clone())
            .collect();
        for dependent in dependents {
            self.remove(&dependent);
        }
        Some(Arc::unwrap_or_clone(object))
    }

    /// Stores `object` at the next resourceVersion and tells the watches.
    fn commit(&mut self, kind: &'static Kind, key: Key, mut object: Value, old: Option<Value>) -> Value {
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.objects.insert(key, (kind, object.clone()));
        let event = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(Change {
            kind,
            event,
            object: Arc::new(object.clone()),
            old: old.map(Arc::new),
            revision: self.revision,
        });
        object
    }

    fn record(&mut self, change: Change) {
        self.watches.publish(change);
    }

    /// Opens a watch: from `from` when given (410 when compacted away), else from now after an
    /// ADDED for every object it selects (and the initial-events-end bookmark when asked).
    pub fn watch(&mut self, filter: Filter, from: Option<u64>, initial_events: bool) -> Subscription {
        let mut initial = Vec::new();
        if from.is_none() {
            let namespace = filter.namespace.as_deref();
            initial.extend(
                self.list(filter.kind, namespace)
                    .filter(|object| filter.selector.matches(object))
                    .map(|object| Message::Event("ADDED", Arc::new(object.clone()))),
            );
            if initial_events {
                initial.push(Message::Bookmark {
                    kind: filter.kind,
                    revision: self.revision,
                    initial_end: true,
                });
            }
        }
        self.watches.open(filter, from, self.revision, initial)
    }

    /// Drops the history: a watch from any earlier resourceVersion, open or new, gets 410.
    pub fn compact(&mut self) {
        self.watches.compact(self.revision);
    }

    fn allocate_cluster_ip(&mut self, service: &mut Value) {
        let in_use: HashSet<String> = self
            .objects
            .values()
            .filter(|(k, _)| k.kind == "Service")
            .filter_map(|(_, o)| o["spec"]["clusterIP"].as_str().map(str::to_owned))
            .collect();
        self.cluster_ips.allocate(service, &in_use);
    }
}

fn is_of(key: &Key, kind: &Kind) -> bool {
    key.group == kind.group && key.plural == kind.plural
}

fn owned_by(object: &Value, uid: &str) -> bool {
    object["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|owners| owners.iter().any(|o| o["uid"] == uid))
}

/// The object without metadata and status: what `metadata.generation` counts changes of.
fn spec_of(object: &Value) -> Value {
    let mut spec = object.clone();
    if let Some(fields) = spec.as_object_mut() {
        fields.remove("metadata");
        fields.remove("status");
    }
    spec
}
