//! The typed objects from every source, merged, published as immutable snapshots that the
//! translation reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::objects::{
    AuthorizationPolicy, Gateway, HTTPRoute, Kind, Namespace, Object, ObjectKey, PeerAuthentication, Pod, Service,
    ServiceEntry, WorkloadEntry,
};

/// Every object, by key, at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    objects: BTreeMap<ObjectKey, Object>,
}

macro_rules! accessors {
    ($($all:ident, $one:ident: $variant:ident => $ty:ty;)*) => {$(
        pub fn $all(&self) -> impl Iterator<Item = &Arc<$ty>> {
            self.of_kind(Kind::$variant).filter_map(|o| match o {
                Object::$variant(inner) => Some(inner),
                _ => None,
            })
        }

        pub fn $one(&self, namespace: &str, name: &str) -> Option<&Arc<$ty>> {
            let key = ObjectKey { kind: Kind::$variant, namespace: namespace.to_owned(), name: name.to_owned() };
            match self.objects.get(&key)? {
                Object::$variant(inner) => Some(inner),
                _ => None,
            }
        }
    )*};
}

impl Objects {
    pub fn new(objects: impl IntoIterator<Item = Object>) -> Self {
        Self {
            objects: objects.into_iter().map(|o| (o.key(), o)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Object> {
        self.objects.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
    }

    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        let start = ObjectKey {
            kind,
            namespace: String::new(),
            name: String::new(),
        };
        self.objects
            .range(start..)
            .take_while(move |(key, _)| key.kind == kind)
            .map(|(_, o)| o)
    }

    /// A namespace by name (namespaces have no namespace of their own).
    pub fn namespace(&self, name: &str) -> Option<&Arc<Namespace>> {
        self.namespace_object("", name)
    }

    accessors! {
        namespaces, namespace_object: Namespace => Namespace;
        pods, pod: Pod => Pod;
        services, service: Service => Service;
        authorization_policies, authorization_policy: AuthorizationPolicy => AuthorizationPolicy;
        peer_authentications, peer_authentication: PeerAuthentication => PeerAuthentication;
        service_entries, service_entry: ServiceEntry => ServiceEntry;
        workload_entries, workload_entry: WorkloadEntry => WorkloadEntry;
        gateways, gateway: Gateway => Gateway;
        http_routes, http_route: HTTPRoute => HTTPRoute;
    }
}

/// Merges what each source holds and publishes the union whenever one changes.
#[derive(Debug)]
pub struct Store {
    sources: Mutex<BTreeMap<String, BTreeMap<ObjectKey, Object>>>,
    snapshots: watch::Sender<Arc<Objects>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self {
            sources: Mutex::default(),
            snapshots: watch::Sender::new(Arc::new(Objects::default())),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Objects>> {
        self.snapshots.subscribe()
    }

    pub fn current(&self) -> Arc<Objects> {
        self.snapshots.borrow().clone()
    }

    /// Replaces everything `source` holds; publishes only if the union changed.
    pub fn replace(&self, source: &str, objects: impl IntoIterator<Item = Object>) {
        let mut sources = self.sources.lock().expect("not poisoned");
        sources.insert(source.to_owned(), objects.into_iter().map(|o| (o.key(), o)).collect());
        let merged = Objects {
            objects: sources
                .values()
                .flat_map(|s| s.iter().map(|(k, o)| (k.clone(), o.clone())))
                .collect(),
        };
        self.snapshots.send_if_modified(|current| {
            if **current == merged {
                return false;
            }
            *current = Arc::new(merged);
            true
        });
    }
}
