//! The plugin ↔ node agent protocol. The plugin connects to the agent's unix stream socket,
//! writes one [`Request`] as a JSON line, reads one [`Response`] as a JSON line, and closes:
//!
//! ```text
//! → {"command":"ADD","containerId":"c1","netns":"/var/run/netns/cni-1","namespace":"demo","name":"client","uid":"7d1c…"}
//! ← {"outcome":"captured","uid":"7d1c…"}
//! ← {"outcome":"skipped","reason":"namespace legacy is not ambient"}
//! ← {"outcome":"released","known":true}
//! ← {"outcome":"failed","code":11,"message":"ztunnel is not connected to the node agent (ZDS socket /var/run/ztunnel/ztunnel.sock)"}
//! ```

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where the agent listens for the plugin unless the netconf's `agentSocket` says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/mesh-cni/agent.sock";

/// The longest line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// What the plugin asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum Request {
    /// Enrol the pod: rules in its namespace, handed to ztunnel, acknowledged.
    Add(PodRequest),
    /// Release the pod: ztunnel told, rules removed, forgotten. Succeeds for unknown pods.
    Del(PodRequest),
    /// Whether the pod is still captured as ADD left it.
    Check(PodRequest),
}

/// The pod a request is about, from the CNI environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRequest {
    /// `CNI_CONTAINERID`: the sandbox; DEL releases only what this sandbox's ADD enrolled.
    pub container_id: String,
    /// `CNI_NETNS` (may be absent for DEL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// `K8S_POD_NAMESPACE` of `CNI_ARGS`.
    pub namespace: String,
    /// `K8S_POD_NAME` of `CNI_ARGS`.
    pub name: String,
    /// `K8S_POD_UID` of `CNI_ARGS`, when the runtime passes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl PodRequest {
    /// `namespace/name`, for messages.
    pub fn pod(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum Response {
    /// ADD: the rules are in the pod's namespace and ztunnel acknowledged the pod (`uid` is the
    /// one ztunnel was given). CHECK: that is still so.
    Captured { uid: String },
    /// ADD or CHECK: the pod is not ambient, nothing was done; `reason` says why.
    Skipped { reason: String },
    /// DEL: done; `known` says whether the agent held the pod.
    Released { known: bool },
    /// The request failed: the CNI error code and message the plugin reports.
    Failed { code: u32, message: String },
}

/// The CNI error codes of the plugin's failures. 4, 6, 7 and 11 are the specification's; 100
/// and above are this plugin's own.
pub mod code {
    /// A CNI environment variable is missing or invalid (its name is in the message).
    pub const INVALID_ENV: u32 = 4;
    /// The netconf on stdin is not JSON of the expected shape.
    pub const DECODE: u32 = 6;
    /// The netconf is well-formed but invalid (a chained plugin without `prevResult`, ...).
    pub const INVALID_NETCONF: u32 = 7;
    /// A transient condition (agent or ztunnel away, API unreachable): the runtime retries.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The pod named by `CNI_ARGS` is unknown, or its uid differs.
    pub const POD_UNKNOWN: u32 = 101;
    /// The capture rules could not be installed.
    pub const RULES: u32 = 102;
    /// ztunnel refused the pod or did not acknowledge it in time.
    pub const ZTUNNEL: u32 = 103;
    /// The pod's `ambient.istio.io/redirection` annotation could not be written.
    pub const ANNOTATION: u32 = 104;
    /// CHECK: the pod should be captured and is not.
    pub const NOT_CAPTURED: u32 = 105;
    /// The agent's answer made no sense for the request.
    pub const PROTOCOL: u32 = 106;
}

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach the mesh node agent at {}: {source}", path.display())]
    Unreachable { path: PathBuf, source: std::io::Error },
    #[error("the mesh node agent at {} did not answer within {}", path.display(), humantime::format_duration(*timeout))]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("talking to the mesh node agent at {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the mesh node agent at {} sent an unreadable answer {answer:?}: {source}", path.display())]
    Decode {
        path: PathBuf,
        answer: String,
        source: serde_json::Error,
    },
}

/// Sends `request` to the agent at `socket` and waits at most `timeout` for its answer. Blocking
/// (the plugin is a short-lived process with nothing else to do).
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, CallError> {
    let deadline = Instant::now() + timeout;
    let path = socket.to_owned();
    let mut stream = UnixStream::connect(socket).map_err(|source| CallError::Unreachable {
        path: path.clone(),
        source,
    })?;
    let io = |source: std::io::Error| match source.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CallError::Timeout {
            path: path.clone(),
            timeout,
        },
        _ => CallError::Io {
            path: path.clone(),
            source,
        },
    };
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(line.as_bytes()).map_err(io)?;
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(remaining)).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_LINE as u64))
        .read_line(&mut answer)
        .map_err(io)?;
    if answer.is_empty() {
        return Err(io(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            "the agent closed the connection without an answer",
        )));
    }
    serde_json::from_str(answer.trim_end()).map_err(|source| CallError::Decode {
        path: path.clone(),
        answer,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_documented_wire_form() {
        let request = Request::Add(PodRequest {
            container_id: "c1".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            namespace: "demo".into(),
            name: "client".into(),
            uid: None,
        });
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"command":"ADD","containerId":"c1","netns":"/var/run/netns/cni-1","namespace":"demo","name":"client"}"#
        );
        let failed: Response = serde_json::from_str(r#"{"outcome":"failed","code":11,"message":"x"}"#).unwrap();
        assert_eq!(
            failed,
            Response::Failed {
                code: code::TRY_AGAIN_LATER,
                message: "x".into()
            }
        );
        assert_eq!(
            serde_json::to_string(&Response::Released { known: false }).unwrap(),
            r#"{"outcome":"released","known":false}"#
        );
    }

    #[test]
    fn an_absent_agent_is_named_with_its_socket() {
        let path = Path::new("/nonexistent/mesh-cni/agent.sock");
        let request = Request::Check(PodRequest {
            container_id: "c".into(),
            netns: None,
            namespace: "n".into(),
            name: "p".into(),
            uid: None,
        });
        let error = call(path, &request, Duration::from_secs(1)).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("cannot reach the mesh node agent at /nonexistent/mesh-cni/agent.sock: "),
            "{error}"
        );
    }
}
