//! The CNI environment: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` among its `KEY=VALUE;...`).
//! `CNI_PATH` is not needed: this plugin delegates to none.

use std::path::PathBuf;

use rscni_types::types::Cmd;

use super::PluginError;

/// The variables of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: Cmd,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub pod: Option<PodArgs>,
}

/// The Kubernetes pod `CNI_ARGS` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

impl Env {
    /// Reads the variables through `var` (the process environment in the binary). `None` when
    /// `CNI_COMMAND` is unset: the plugin was run by hand, not by a runtime.
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, PluginError> {
        let set = |name: &str| var(name).filter(|value| !value.is_empty());
        let Some(command) = set("CNI_COMMAND") else {
            return Ok(None);
        };
        let command = command.parse::<Cmd>().map_err(|_| {
            PluginError::InvalidEnv(format!(
                "CNI_COMMAND={command:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"
            ))
        })?;
        Ok(Some(Self {
            command,
            container_id: set("CNI_CONTAINERID"),
            netns: set("CNI_NETNS").map(PathBuf::from),
            ifname: set("CNI_IFNAME"),
            pod: set("CNI_ARGS").map(|args| pod_args(&args)).transpose()?.flatten(),
        }))
    }

    /// The variables `command` requires, as the specification lists them: the container and
    /// interface for ADD, DEL and CHECK; the namespace for ADD and CHECK (DEL may come after it
    /// is gone).
    pub fn require(&self) -> Result<(), PluginError> {
        let mut missing = Vec::new();
        if matches!(self.command, Cmd::Add | Cmd::Del | Cmd::Check) {
            if self.container_id.is_none() {
                missing.push("CNI_CONTAINERID");
            }
            if self.ifname.is_none() {
                missing.push("CNI_IFNAME");
            }
        }
        if matches!(self.command, Cmd::Add | Cmd::Check) && self.netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(PluginError::InvalidEnv(format!(
                "{} not set: {} needs {}",
                missing.join(", "),
                <&str>::from(self.command),
                if missing.len() == 1 { "it" } else { "them" }
            )))
        }
    }
}

/// The pod of `CNI_ARGS` (`KEY=VALUE` pairs separated by `;`). `None` when it names no pod (a
/// container not run by Kubernetes, which is no mesh workload).
fn pod_args(args: &str) -> Result<Option<PodArgs>, PluginError> {
    let (mut namespace, mut name, mut uid) = (None, None, None);
    for entry in args.split(';').filter(|e| !e.is_empty()) {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(PluginError::InvalidEnv(format!(
                "CNI_ARGS={args:?}: entry {entry:?} is not KEY=VALUE"
            )));
        };
        let value = (!value.is_empty()).then(|| value.to_owned());
        match key {
            "K8S_POD_NAMESPACE" => namespace = value,
            "K8S_POD_NAME" => name = value,
            "K8S_POD_UID" => uid = value,
            _ => {}
        }
    }
    match (namespace, name) {
        (Some(namespace), Some(name)) => Ok(Some(PodArgs { namespace, name, uid })),
        (None, None) => Ok(None),
        (namespace, _) => Err(PluginError::InvalidEnv(format!(
            "CNI_ARGS={args:?}: {} is missing",
            if namespace.is_none() {
                "K8S_POD_NAMESPACE"
            } else {
                "K8S_POD_NAME"
            }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Option<Env>, PluginError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::read(|name| vars.get(name).cloned())
    }

    #[test]
    fn kubernetes_args_name_the_pod() {
        let env = env(&[
            ("CNI_COMMAND", "ADD"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u-1",
            ),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            env.pod,
            Some(PodArgs {
                namespace: "demo".into(),
                name: "client".into(),
                uid: Some("u-1".into())
            })
        );
        assert_eq!(env.command, Cmd::Add);
    }

    #[test]
    fn malformed_variables_are_named() {
        let error = env(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "K8S_POD_NAME")]).unwrap_err();
        assert!(error.to_string().contains("CNI_ARGS=\"K8S_POD_NAME\""), "{error}");
        let error = env(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "K8S_POD_NAME=a")]).unwrap_err();
        assert!(error.to_string().contains("K8S_POD_NAMESPACE is missing"), "{error}");
        let error = env(&[("CNI_COMMAND", "RUN")]).unwrap_err();
        assert!(error.to_string().starts_with("CNI_COMMAND=\"RUN\""), "{error}");
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(
            env(&[("CNI_COMMAND", "DEL"), ("CNI_ARGS", "IgnoreUnknown=1")])
                .unwrap()
                .unwrap()
                .pod,
            None
        );
    }

    #[test]
    fn required_variables_depend_on_the_command() {
        let add = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c")])
            .unwrap()
            .unwrap();
        assert_eq!(
            add.require().unwrap_err().to_string(),
            "CNI_IFNAME, CNI_NETNS not set: ADD needs them"
        );
        let del = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")])
            .unwrap()
            .unwrap();
        assert!(del.require().is_ok(), "DEL may come without CNI_NETNS");
    }
}
