//! `mesh-cni`, the chained CNI plugin, run by the container runtime for each pod sandbox.
//!
//! - ADD: asks the node agent to enrol the pod and prints `prevResult` back (with the netconf's
//!   `cniVersion`) only when the agent answers that the pod is captured, or that it is not an
//!   ambient pod. Anything else (agent away, rules failed, ztunnel not connected or refusing) is
//!   a CNI error with exit code 1: the runtime tears the sandbox down and retries, and the pod
//!   never runs uncaptured.
//! - DEL: asks the agent to release the pod. Succeeds when the agent did not know the pod, and
//!   also when the agent cannot be reached at all: the specification asks DEL to succeed when its
//!   resources are gone, and an agent that is not running holds nothing (the namespace and the
//!   rules in it go with the sandbox; a restarted agent's snapshot no longer names the pod, so
//!   ztunnel drops it). An agent that is reached and fails is an error.
//! - CHECK: an error when an ambient pod's capture table is missing or the agent does not hold it.
//! - VERSION: the specification versions this plugin speaks (0.3.0 to 1.1.0). GC and STATUS
//!   (1.1.0) succeed without asking the agent: STATUS failing would stop every pod on the node
//!   from starting, ztunnel's own included, while ADD already fails per pod.
//!
//! A container that `CNI_ARGS` names no Kubernetes pod for is no mesh workload: passed through.

mod env;
mod netconf;

use std::time::Duration;

use rscni_types::error::Error as CniError;
use rscni_types::types::{Cmd, ErrorResult};
use rscni_types::version::{PluginInfo, SpecVersion};

pub use env::{Env, PodArgs};
pub use netconf::NetConf;

use crate::protocol::{self, CallError, PodRequest, Request, Response, code};

/// How long ADD waits for the agent (which waits for ztunnel's acknowledgement).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an invocation failed; each has its CNI error code.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{0}")]
    InvalidEnv(String),
    #[error("{0}")]
    Decode(String),
    #[error("{0}")]
    InvalidNetconf(String),
    #[error("{0}")]
    Version(String),
    #[error("reading the netconf on stdin: {0}")]
    Stdin(std::io::Error),
    #[error(transparent)]
    Agent(#[from] CallError),
    #[error("{message}")]
    Refused { code: u32, message: String },
}

impl PluginError {
    pub fn code(&self) -> u32 {
        match self {
            Self::InvalidEnv(_) => code::INVALID_ENV,
            Self::Decode(_) => code::DECODE,
            Self::InvalidNetconf(_) => code::INVALID_NETCONF,
            Self::Version(_) => 1,
            Self::Stdin(_) => 5,
            Self::Agent(_) => code::TRY_AGAIN_LATER,
            Self::Refused { code, .. } => *code,
        }
    }
}

/// What the process prints and how it exits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    /// Unstructured notes for the runtime's log.
    pub stderr: String,
    pub exit_code: i32,
}

/// Printed when the plugin is run by hand (no `CNI_COMMAND`).
pub const ABOUT: &str = "mesh-cni: the ambient mesh's chained CNI plugin. A container runtime runs it with CNI_COMMAND \
(ADD, DEL, CHECK, GC, STATUS, VERSION), CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and CNI_ARGS \
(K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID) set and the netconf on stdin: {\"cniVersion\", \"name\", \
\"type\": \"mesh-cni\", \"agentSocket\" (default /var/run/mesh-cni/agent.sock), \"prevResult\"}. ADD succeeds only \
once the node agent (mesh-node-agent) has installed the pod's capture rules and ztunnel holds the pod.";

/// Runs one invocation: `var` reads the environment, `stdin` the netconf (read only when a
/// command needs it).
pub fn main(var: impl Fn(&str) -> Option<String>, stdin: impl FnOnce() -> std::io::Result<Vec<u8>>) -> Outcome {
    let about = || Outcome {
        stderr: format!("{ABOUT}\n"),
        ..Outcome::default()
    };
    if var("CNI_COMMAND").is_none_or(|c| c.is_empty()) {
        return about();
    }
    // Read first, whatever follows: a runtime writing the netconf must not meet a closed pipe.
    let input = match stdin() {
        Ok(input) => input,
        Err(error) => return failure(SpecVersion::default(), &PluginError::Stdin(error)),
    };
    let env = match Env::read(var) {
        Ok(Some(env)) => env,
        Ok(None) => return about(),
        Err(error) => return failure(netconf::declared_version(&input), &error),
    };
    let mut stderr = String::new();
    match invoke(&env, &input, &mut stderr) {
        Ok(stdout) => Outcome {
            stdout,
            stderr,
            exit_code: 0,
        },
        Err(error) => {
            let mut outcome = failure(netconf::declared_version(&input), &error);
            outcome.stderr = stderr + &outcome.stderr;
            outcome
        }
    }
}

/// The error result on stdout, exit code 1.
fn failure(version: SpecVersion, error: &PluginError) -> Outcome {
    let message = error.to_string();
    let result = ErrorResult::new(version, &CniError::Custom(error.code(), message.clone(), String::new()));
    Outcome {
        stdout: serde_json::to_string(&result).expect("error results serialize"),
        stderr: format!("mesh-cni: {message}\n"),
        exit_code: 1,
    }
}

fn invoke(env: &Env, stdin: &[u8], stderr: &mut String) -> Result<String, PluginError> {
    if env.command == Cmd::Version {
        return Ok(serde_json::to_string(&PluginInfo::default()).expect("plugin info serializes"));
    }
    let conf = netconf::parse(stdin, env.command)?;
    env.require()?;
    let request = env.pod.as_ref().map(|pod| PodRequest {
        container_id: env.container_id.clone().unwrap_or_default(),
        netns: env.netns.clone(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
    });
    match env.command {
        Cmd::Add => {
            let result = conf.result()?;
            let netns = env.netns.as_deref().expect("required for ADD");
            std::fs::metadata(netns)
                .map_err(|e| PluginError::InvalidEnv(format!("CNI_NETNS={}: {e}", netns.display())))?;
            let Some(request) = request else {
                stderr.push_str("mesh-cni: CNI_ARGS names no Kubernetes pod: not a mesh workload, passed through\n");
                return Ok(result);
            };
            match protocol::call(&conf.agent_socket, &Request::Add(request), AGENT_TIMEOUT)? {
                Response::Captured { .. } => Ok(result),
                Response::Skipped { reason } => {
                    stderr.push_str(&format!("mesh-cni: not captured: {reason}\n"));
                    Ok(result)
                }
                other => Err(refused("ADD", other)),
            }
        }
        Cmd::Del => {
            let Some(request) = request else {
                return Ok(String::new());
            };
            match protocol::call(&conf.agent_socket, &Request::Del(request), AGENT_TIMEOUT) {
                Ok(Response::Released { .. }) => Ok(String::new()),
                Ok(other) => Err(refused("DEL", other)),
                Err(error @ CallError::Unreachable { .. }) => {
                    stderr.push_str(&format!(
                        "mesh-cni: {error}; DEL succeeds: an agent that is not running holds nothing of this pod\n"
                    ));
                    Ok(String::new())
                }
                Err(error) => Err(error.into()),
            }
        }
        Cmd::Check => {
            let Some(request) = request else {
                return Ok(String::new());
            };
            match protocol::call(&conf.agent_socket, &Request::Check(request), AGENT_TIMEOUT)? {
                Response::Captured { .. } | Response::Skipped { .. } => Ok(String::new()),
                other => Err(refused("CHECK", other)),
            }
        }
        Cmd::Gc | Cmd::Status | Cmd::Version => Ok(String::new()),
    }
}

/// The agent's failure as the plugin's, or a protocol error for an answer that does not fit.
fn refused(command: &str, response: Response) -> PluginError {
    match response {
        Response::Failed { code, message } => PluginError::Refused { code, message },
        other => PluginError::Refused {
            code: code::PROTOCOL,
            message: format!("the mesh node agent answered {command} with {other:?}"),
        },
    }
}
