//! The network configuration on stdin: the specification's fields (through
//! [`rscni_types::types::NetConf`]), this plugin's own `agentSocket`, and `prevResult` kept as
//! the raw JSON the previous plugin produced.

use std::path::PathBuf;

use rscni_types::types::{Cmd, NetConf as SpecNetConf};
use rscni_types::version::{PluginInfo, SpecVersion};
use serde_json::{Map, Value};

use super::PluginError;
use crate::protocol::DEFAULT_AGENT_SOCKET;

/// This plugin's view of its netconf.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    /// `cniVersion` as the runtime spelled it (results carry it back unchanged).
    pub cni_version: String,
    /// `cniVersion`, parsed and negotiated.
    pub version: SpecVersion,
    /// `name`: the network (the chain's).
    pub name: String,
    /// `agentSocket`: where the node agent listens.
    pub agent_socket: PathBuf,
    /// `prevResult`: the result of the plugins before this one in the chain.
    pub prev_result: Option<Map<String, Value>>,
}

/// The `cniVersion` of a netconf that could not be read, for its error result: the declared one
/// when it is at least legible, else the current version.
pub fn declared_version(stdin: &[u8]) -> SpecVersion {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str()?.parse().ok())
        .unwrap_or_default()
}

/// Parses and validates the netconf for `command`.
pub fn parse(stdin: &[u8], command: Cmd) -> Result<NetConf, PluginError> {
    let value: Value = serde_json::from_slice(stdin)
        .map_err(|e| PluginError::Decode(format!("the netconf on stdin is not JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(PluginError::Decode(format!(
            "the netconf on stdin is not a JSON object: {value}"
        )));
    };
    let prev_result = match object.remove("prevResult") {
        None | Some(Value::Null) => None,
        Some(Value::Object(result)) => Some(result),
        Some(other) => {
            return Err(PluginError::InvalidNetconf(format!(
                "netconf field prevResult must be an object (a CNI result), found {other}"
            )));
        }
    };
    let spec: SpecNetConf = serde_path_to_error::deserialize(Value::Object(object))
        .map_err(|e| PluginError::Decode(format!("netconf field {}: {}", e.path(), e.inner())))?;
    spec.validate_name()
        .map_err(|e| PluginError::InvalidNetconf(format!("netconf field name={:?}: {}", spec.name, e.details())))?;
    if spec.r#type.is_empty() {
        return Err(PluginError::InvalidNetconf("netconf field type is empty".into()));
    }
    let version = PluginInfo::default()
        .negotiate(&spec, command)
        .map_err(|e| PluginError::Version(format!("netconf field cniVersion={:?}: {e}", spec.cni_version)))?;
    let agent_socket = match spec.custom.get("agentSocket") {
        None | Some(Value::Null) => PathBuf::from(DEFAULT_AGENT_SOCKET),
        Some(Value::String(path)) if path.starts_with('/') => PathBuf::from(path),
        Some(other) => {
            return Err(PluginError::InvalidNetconf(format!(
                "netconf field agentSocket={other} is not an absolute path"
            )));
        }
    };
    Ok(NetConf {
        cni_version: spec.cni_version,
        version,
        name: spec.name,
        agent_socket,
        prev_result,
    })
}

impl NetConf {
    /// The ADD result: `prevResult` unchanged, declared in this netconf's `cniVersion`.
    pub fn result(&self) -> Result<String, PluginError> {
        let mut result = self.prev_result.clone().ok_or_else(|| {
            PluginError::InvalidNetconf(
                "netconf field prevResult is missing: mesh-cni is a chained plugin and runs after the plugin that \
                 gives the pod its network (add it to the end of the conflist's plugins)"
                    .into(),
            )
        })?;
        result.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        Ok(Value::Object(result).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAINED: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"mesh-cni",
        "agentSocket":"/run/agent.sock",
        "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/p","vendor":"x"}],
                      "ips":[{"address":"10.1.0.5/24","interface":0}]}}"#;

    #[test]
    fn prev_result_passes_through_unchanged() {
        let conf = parse(CHAINED.as_bytes(), Cmd::Add).unwrap();
        assert_eq!(conf.agent_socket, PathBuf::from("/run/agent.sock"));
        let result: Value = serde_json::from_str(&conf.result().unwrap()).unwrap();
        let given: Value = serde_json::from_str(CHAINED).unwrap();
        assert_eq!(result, given["prevResult"], "unknown fields (vendor) kept too");
    }

    #[test]
    fn a_legacy_result_keeps_its_layout() {
        let conf = r#"{"cniVersion":"0.4.0","name":"net","type":"mesh-cni",
            "prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.0.5/24"}]}}"#;
        let conf = parse(conf.as_bytes(), Cmd::Add).unwrap();
        assert_eq!(conf.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert!(conf.result().unwrap().contains(r#""version":"4""#));
    }

    #[test]
    fn invalid_netconfs_name_the_field() {
        let cases = [
            ("{not json", "the netconf on stdin is not JSON"),
            ("[]", "not a JSON object"),
            (r#"{"cniVersion":"1.0.0","name":"n"}"#, "missing field `type`"),
            (r#"{"cniVersion":"1.0.0","name":"n","type":7}"#, "netconf field type:"),
            (
                r#"{"cniVersion":"1.0.0","name":"-n","type":"mesh-cni"}"#,
                "netconf field name=\"-n\"",
            ),
            (
                r#"{"cniVersion":"9.0.0","name":"n","type":"mesh-cni"}"#,
                "cniVersion=\"9.0.0\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","agentSocket":"rel"}"#,
                "agentSocket=\"rel\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","prevResult":3}"#,
                "prevResult must be an object",
            ),
        ];
        for (input, expected) in cases {
            let error = parse(input.as_bytes(), Cmd::Add).unwrap_err().to_string();
            assert!(error.contains(expected), "{input}: {error}");
        }
        let conf = parse(br#"{"cniVersion":"1.0.0","name":"n","type":"mesh-cni"}"#, Cmd::Add).unwrap();
        assert!(conf.result().unwrap_err().to_string().contains("prevResult is missing"));
    }
}
