//! Pods as a Kubernetes node runs them: a sandbox (network namespace wired to the pod's node),
//! the `mesh-cni` plugin's ADD on it ([`crate::cni`]), and only then the pod's apps; on the way
//! out the apps stop, DEL runs, the namespace goes. Each sandbox is new: its own container id, uid
//! and node-side link, so a pod restarted while its previous namespace lingers (a socket still
//! holding it) never meets that one's leftovers by name.

use std::fs::File;
use std::io::Write as _;

use anyhow::Context as _;

use crate::cni::{self, CniCommand, Sandbox};
use crate::plan::{App, Pod};
use crate::runner::Lab;
use crate::topology::{self, Namespace};

impl Lab {
    /// Starts a pod as a Kubernetes node does: its sandbox, the plugin's ADD, then its apps (not
    /// when ADD fails: the error says why).
    pub fn start_pod(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let sandbox = self.create_sandbox(pod)?;
        self.cni_add(&sandbox)?;
        self.start_apps(pod)
    }

    /// Stops a pod's apps, runs DEL and deletes its namespace.
    pub fn stop_pod(&mut self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let pod = Some((namespace.to_owned(), name.to_owned()));
        for mut running in self.processes.extract_if(.., |r| r.pod == pod).collect::<Vec<_>>() {
            running.process.stop();
        }
        let sandbox = self
            .sandbox(namespace, name)
            .cloned()
            .with_context(|| format!("pod {namespace}/{name} has no sandbox"))?;
        self.remove_sandbox(&sandbox)
    }

    /// Stops the pod `namespace/name` and starts it again (a new sandbox: the agent decides
    /// afresh whether it is captured).
    pub fn restart_pod(&mut self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let pod = self
            .pod(namespace, name)
            .cloned()
            .with_context(|| format!("no pod {namespace}/{name}"))?;
        self.stop_pod(namespace, name)?;
        self.start_pod(&pod)
    }

    /// The names of the processes (apps, waypoint) that run for the pod `namespace/name`.
    pub fn processes_of(&self, namespace: &str, name: &str) -> Vec<&str> {
        let pod = Some((namespace.to_owned(), name.to_owned()));
        self.processes
            .iter()
            .filter(|r| r.pod == pod)
            .map(|r| r.name.as_str())
            .collect()
    }

    /// The sandbox the pod `namespace/name` runs in.
    pub fn sandbox(&self, namespace: &str, name: &str) -> Option<&Sandbox> {
        self.state
            .sandboxes
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// Creates a pod's network namespace and wires it to its node, as the primary CNI plugin
    /// would; each sandbox has its own container id, uid and node-side link.
    pub fn create_sandbox(&mut self, pod: &Pod) -> anyhow::Result<Sandbox> {
        self.sandboxes_made += 1;
        let n = self.sandboxes_made;
        let netns = self.names.pod(&pod.namespace, &pod.name);
        let namespace = self.create_namespace(&netns)?;
        let node = Namespace::existing(&self.names.node(&pod.node));
        topology::attach(Some(&node), &namespace, &format!("p{n}"), pod.ip)
            .with_context(|| format!("wiring pod {}/{}", pod.namespace, pod.name))?;
        Ok(Sandbox {
            container_id: format!("lab-{}-{}-{n}", pod.namespace, pod.name),
            netns,
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod
                .uid
                .clone()
                .unwrap_or_else(|| format!("{}-{}-{n}", pod.namespace, pod.name)),
            ip: pod.ip,
            agent_socket: self.node_dir(&pod.node).join("agent.sock"),
        })
    }

    /// Runs the plugin's ADD on `sandbox` (recorded first, so `down` runs its DEL whatever
    /// happens). An error is the plugin's, with its CNI code and message: the pod must not start.
    /// As a runtime does, a failed ADD is followed by DEL (the namespace stays until the pod is
    /// started again or the lab goes).
    pub fn cni_add(&mut self, sandbox: &Sandbox) -> anyhow::Result<()> {
        self.state.sandboxes.retain(|s| s.netns != sandbox.netns);
        self.state.sandboxes.push(sandbox.clone());
        self.state.save(&self.dir)?;
        let ran = cni::run(&self.binaries, CniCommand::Add, sandbox);
        self.log_cni(CniCommand::Add, sandbox, &ran);
        let error = match ran {
            Ok(ran) => {
                let skipped = ran
                    .stderr
                    .lines()
                    .find_map(|l| l.strip_prefix("mesh-cni: not captured: "));
                let outcome = match skipped {
                    Some(reason) => format!("not captured: {reason}"),
                    None => "captured (rules in its namespace, ztunnel holds it)".to_owned(),
                };
                self.enrolment.insert(sandbox.pod(), outcome);
                return Ok(());
            }
            Err(error) => error,
        };
        let deleted = cni::run(&self.binaries, CniCommand::Del, sandbox);
        self.log_cni(CniCommand::Del, sandbox, &deleted);
        if deleted.is_ok() {
            self.state.sandboxes.retain(|s| s.container_id != sandbox.container_id);
            self.state.save(&self.dir)?;
        }
        Err(error.context(format!("pod {} not started", sandbox.pod())))
    }

    /// Runs DEL on `sandbox`, then deletes its namespace.
    pub fn remove_sandbox(&mut self, sandbox: &Sandbox) -> anyhow::Result<()> {
        let ran = cni::run(&self.binaries, CniCommand::Del, sandbox);
        self.log_cni(CniCommand::Del, sandbox, &ran);
        ran?;
        self.state.sandboxes.retain(|s| s.container_id != sandbox.container_id);
        self.delete_namespace(&sandbox.netns)
    }

    /// One line per plugin run in `logs/cni.log`: what was asked, what came back.
    pub(crate) fn log_cni(&self, command: CniCommand, sandbox: &Sandbox, ran: &anyhow::Result<cni::Ran>) {
        let line = match ran {
            Ok(ran) => format!(
                "{command:?} {} ({}): ok {}{}\n",
                sandbox.pod(),
                sandbox.container_id,
                ran.stdout,
                if ran.stderr.is_empty() {
                    String::new()
                } else {
                    format!(" | {}", ran.stderr)
                }
            ),
            Err(error) => format!("{command:?} {} ({}): {error:#}\n", sandbox.pod(), sandbox.container_id),
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join("cni.log"));
        if let Ok(mut log) = log {
            let _ = log.write_all(line.as_bytes());
        }
    }

    /// Starts the apps of `pod` in its namespace.
    fn start_apps(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let namespace = self.names.pod(&pod.namespace, &pod.name);
        for app in &pod.apps {
            match app {
                App::Echo(port) | App::Http(port) => {
                    let role = if matches!(app, App::Echo(_)) { "echo" } else { "http" };
                    let flags = [format!("--listen={}:{port}", pod.ip), format!("--name={}", pod.name)];
                    let name = format!("app-{}-{}-{port}", pod.namespace, pod.name);
                    self.spawn(&name, &namespace, role, &flags, Some(pod))?;
                }
                App::Waypoint => self.spawn_waypoint(pod)?,
            }
        }
        Ok(())
    }
}
