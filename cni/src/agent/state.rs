//! The held pods on disk (`--state-file`), so that an agent that restarts (an upgrade, a crash)
//! still holds every pod it enrolled: at start it reopens each pod's network namespace by the path
//! the runtime gave, keeps it only when it is the same namespace (device and inode), and makes
//! sure its rules are in; a ztunnel that connects then gets them all in its snapshot, as if the
//! agent had never been away. A namespace that went while the agent was down is a pod that is
//! gone: dropped. The file lives on a tmpfs (`/var/run`) and so goes when the node reboots, with
//! every namespace it names.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_core::capture;
use mesh_core::netns::NetNs;
use mesh_core::zds::WorkloadInfo;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{HeldPod, Pods};

/// One held pod, as written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    uid: String,
    container_id: String,
    netns: PathBuf,
    device: u64,
    inode: u64,
    name: String,
    namespace: String,
    service_account: String,
}

/// The identity of a namespace held open (the same through any path to it).
fn identity(netns: &NetNs) -> std::io::Result<(u64, u64)> {
    let metadata = File::from(netns.as_fd().try_clone_to_owned()?).metadata()?;
    Ok((metadata.dev(), metadata.ino()))
}

/// Writes `pods` to `path` (replacing it whole, so a crash leaves the old or the new file).
pub async fn save(path: &Path, pods: &Pods) {
    let entries: Vec<Entry> = pods
        .values()
        .filter_map(|pod| {
            let (device, inode) = identity(&pod.netns).ok()?;
            Some(Entry {
                uid: pod.uid.clone(),
                container_id: pod.container_id.clone(),
                netns: pod.netns.path().to_owned(),
                device,
                inode,
                name: pod.info.name.clone(),
                namespace: pod.info.namespace.clone(),
                service_account: pod.info.service_account.clone(),
            })
        })
        .collect();
    let text = serde_json::to_string_pretty(&entries).expect("entries serialize");
    let file = path.to_owned();
    let written = tokio::task::spawn_blocking(move || {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let partial = file.with_extension("partial");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, &file)
    });
    if let Err(error) = written.await.expect("writing does not panic") {
        warn!(%error, file = %path.display(), "the held pods could not be saved: an agent restart would lose them");
    }
}

/// The pods of a previous run whose namespaces are still there, rules in place. Blocking.
pub fn load(path: &Path, mark: u32) -> Pods {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Pods::new(),
        Err(error) => {
            warn!(%error, file = %path.display(), "the held pods of the previous run cannot be read");
            return Pods::new();
        }
    };
    let entries: Vec<Entry> = match serde_json::from_str(&text) {
        Ok(entries) => entries,
        Err(error) => {
            warn!(%error, file = %path.display(), "the held pods of the previous run cannot be decoded");
            return Pods::new();
        }
    };
    let mut pods = Pods::new();
    for entry in entries {
        let pod = format!("{}/{}", entry.namespace, entry.name);
        let reopened = File::open(&entry.netns)
            .and_then(|file| NetNs::from_fd(file.into(), &entry.netns))
            .and_then(|netns| Ok((identity(&netns)?, netns)));
        let netns = match reopened {
            Ok((id, netns)) if id == (entry.device, entry.inode) => netns,
            Ok(_) => {
                info!(%pod, netns = %entry.netns.display(), "the pod's namespace is another one now: the pod is gone");
                continue;
            }
            Err(error) => {
                info!(%pod, netns = %entry.netns.display(), %error, "the pod's namespace is gone: so is the pod");
                continue;
            }
        };
        if let Err(error) = capture::install(&netns, mark) {
            warn!(%pod, %error, "the capture rules of a held pod could not be renewed");
        }
        info!(%pod, uid = %entry.uid, "held again");
        pods.insert(
            entry.uid.clone(),
            HeldPod {
                uid: entry.uid,
                container_id: entry.container_id,
                netns: Arc::new(netns),
                info: WorkloadInfo {
                    name: entry.name,
                    namespace: entry.namespace,
                    service_account: entry.service_account,
                },
            },
        );
    }
    pods
}
