//! The resources istiod-lite serves, as immutable snapshots. Each resource's version is a digest
//! of its encoding, so a republished but unchanged resource is never sent again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use prost_types::Any;
use tokio::sync::watch;

/// One named, versioned resource of a type.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub name: String,
    pub version: String,
    pub body: Any,
}

impl Resource {
    /// Encodes `message` as a resource of `type_url`, versioned by the digest of its bytes.
    pub fn new(type_url: &str, name: impl Into<String>, message: &impl Message) -> Self {
        let value = message.encode_to_vec();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &value);
        let version = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            name: name.into(),
            version,
            body: Any {
                type_url: type_url.to_owned(),
                value,
            },
        }
    }
}

/// Every resource of every type, at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every published snapshot; 0 until the first is published.
    pub generation: u64,
    /// When it was published (for push latency).
    pub published: Option<Instant>,
    types: HashMap<String, BTreeMap<String, Arc<Resource>>>,
}

impl Snapshot {
    /// The resources of `type_url`, by name.
    pub fn resources(&self, type_url: &str) -> Option<&BTreeMap<String, Arc<Resource>>> {
        self.types.get(type_url)
    }

    pub fn len(&self, type_url: &str) -> usize {
        self.types.get(type_url).map_or(0, BTreeMap::len)
    }
}

/// Publishes snapshots to every connected client.
#[derive(Debug)]
pub struct Publisher {
    sender: watch::Sender<Arc<Snapshot>>,
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new()
    }
}

impl Publisher {
    pub fn new() -> Self {
        Self {
            sender: watch::Sender::new(Arc::new(Snapshot::default())),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.sender.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.sender.borrow().clone()
    }

    /// Replaces all resources of the given types (types not named keep their resources).
    /// Resources whose bytes did not change keep their `Arc`, so the diff per client is cheap.
    pub fn publish(&self, updates: impl IntoIterator<Item = (String, Vec<Resource>)>) {
        self.sender.send_modify(|current| {
            let mut types = current.types.clone();
            for (type_url, resources) in updates {
                let previous = types.remove(&type_url).unwrap_or_default();
                let next = resources
                    .into_iter()
                    .map(|resource| {
                        let kept = previous
                            .get(&resource.name)
                            .filter(|old| old.version == resource.version);
                        let resource = kept.cloned().unwrap_or_else(|| Arc::new(resource));
                        (resource.name.clone(), resource)
                    })
                    .collect();
                types.insert(type_url, next);
            }
            *current = Arc::new(Snapshot {
                generation: current.generation + 1,
                published: Some(Instant::now()),
                types,
            });
        });
    }
}
