//! The rendered manifests against the programs they run, through each program's own flag parser
//! (`Config::try_parse_from`): every flag and environment variable a container passes is one its
//! binary accepts with that value; every port a container declares, a probe checks, a Service
//! targets or Prometheus scrapes is one the program listens on; the programs find each other
//! (xDS address and certificate names, root certificate, token audience, ZDS and CNI sockets,
//! socket mark); the node DaemonSets and the controller have the shape and privileges the README
//! promises; the waypoints istiod-lite deploys pass only what the waypoint binary accepts.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use mesh_deploy_tests::manifests::{Manifests, Workload, have, image_name};
use serde_json::{Value, json};

const TEST_TOOL: (&str, &[&str]) = ("kubectl", &["version", "--client"]);

fn rendered(test: &str) -> Option<Vec<Manifests>> {
    have(test, TEST_TOOL.0, TEST_TOOL.1).then(Manifests::all)
}

/// The programs of the mesh, by the image that runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Program {
    Istiod,
    Ztunnel,
    NodeAgent,
    Waypoint,
}

impl Program {
    fn of_image(image: &str) -> Option<Self> {
        match image_name(image).0 {
            "ghcr.io/ambient-mesh/istiod-lite" => Some(Self::Istiod),
            "ghcr.io/ambient-mesh/ztunnel" => Some(Self::Ztunnel),
            "ghcr.io/ambient-mesh/mesh-node-agent" => Some(Self::NodeAgent),
            "ghcr.io/ambient-mesh/waypoint" => Some(Self::Waypoint),
            _ => None,
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Self::Istiod => "istiod-lite",
            Self::Ztunnel => "ztunnel",
            Self::NodeAgent => "mesh-node-agent",
            Self::Waypoint => "waypoint",
        }
    }

    fn command(self) -> clap::Command {
        match self {
            Self::Istiod => istiod_lite::Config::command(),
            Self::Ztunnel => ztunnel::Config::command(),
            Self::NodeAgent => mesh_cni::Config::command(),
            Self::Waypoint => waypoint::Config::command(),
        }
    }

    /// The binary's parser and start-up validation on `argv`.
    fn parse(self, argv: &[String]) -> Result<Parsed, String> {
        let error = |e: clap::Error| e.to_string();
        Ok(match self {
            Self::Istiod => {
                let config = istiod_lite::Config::try_parse_from(argv).map_err(error)?;
                config.validate()?;
                Parsed::Istiod(Box::new(config))
            }
            Self::Ztunnel => Parsed::Ztunnel(Box::new(ztunnel::Config::try_parse_from(argv).map_err(error)?)),
            Self::NodeAgent => {
                let config = mesh_cni::Config::try_parse_from(argv).map_err(error)?;
                config.validate().map_err(|e| e.to_string())?;
                Parsed::NodeAgent(Box::new(config))
            }
            Self::Waypoint => Parsed::Waypoint(Box::new(waypoint::Config::try_parse_from(argv).map_err(error)?)),
        })
    }
}

/// A program's configuration as its binary would start with it.
#[derive(Debug)]
enum Parsed {
    Istiod(Box<istiod_lite::Config>),
    Ztunnel(Box<ztunnel::Config>),
    NodeAgent(Box<mesh_cni::Config>),
    Waypoint(Box<waypoint::Config>),
}

impl Parsed {
    /// Every address the program listens on.
    fn listeners(&self) -> Vec<SocketAddr> {
        match self {
            Self::Istiod(c) => vec![
                c.xds_plaintext_addr,
                c.xds_addr,
                c.admin_addr,
                c.metrics_addr,
                c.readiness_addr,
            ],
            Self::Ztunnel(c) => {
                let mut all = vec![c.admin_addr, c.metrics_addr, c.readiness_addr];
                all.extend(c.socks5_addr);
                all
            }
            Self::NodeAgent(c) => vec![c.admin_addr, c.metrics_addr, c.readiness_addr],
            Self::Waypoint(c) => vec![c.hbone_addr, c.admin_addr, c.metrics_addr, c.readiness_addr],
        }
    }

    /// The ports reachable from outside the pod (not on loopback).
    fn public_ports(&self) -> BTreeSet<u16> {
        let public = self.listeners().into_iter().filter(|a| !a.ip().is_loopback());
        public.map(|a| a.port()).collect()
    }

    fn readiness(&self) -> SocketAddr {
        match self {
            Self::Istiod(c) => c.readiness_addr,
            Self::Ztunnel(c) => c.readiness_addr,
            Self::NodeAgent(c) => c.readiness_addr,
            Self::Waypoint(c) => c.readiness_addr,
        }
    }

    fn metrics(&self) -> SocketAddr {
        match self {
            Self::Istiod(c) => c.metrics_addr,
            Self::Ztunnel(c) => c.metrics_addr,
            Self::NodeAgent(c) => c.metrics_addr,
            Self::Waypoint(c) => c.metrics_addr,
        }
    }

    /// How long the program drains after SIGTERM (the node agent's is fixed at 5s).
    fn drain(&self) -> Duration {
        match self {
            Self::Istiod(c) => c.drain_deadline,
            Self::Ztunnel(c) => c.drain_deadline,
            Self::NodeAgent(_) => Duration::from_secs(5),
            Self::Waypoint(c) => c.drain_deadline,
        }
    }
}

/// What the kubelet would put in a downward-API variable, for the parser to see a real value.
fn downward(workload: &Workload<'_>, value_from: &Value) -> Result<String, String> {
    let path = value_from["fieldRef"]["fieldPath"].as_str();
    let namespace = workload.object["metadata"]["namespace"].as_str().unwrap_or("default");
    let account = workload.pod["spec"]["serviceAccountName"].as_str().unwrap_or("default");
    Ok(match path {
        Some("metadata.name") => format!(
            "{}-7d9f8-x2p4q",
            workload.object["metadata"]["name"].as_str().unwrap_or("pod")
        ),
        Some("metadata.namespace") => namespace.to_owned(),
        Some("spec.nodeName") => "node-1".to_owned(),
        Some("spec.serviceAccountName") => account.to_owned(),
        Some("status.podIP") => "10.244.1.7".to_owned(),
        _ => {
            return Err(format!(
                "valueFrom {value_from} is not a downward-API field this test knows"
            ));
        }
    })
}

/// The command line equal to what `container` passes its binary: its arguments, then each
/// environment variable as the flag that reads it (downward-API values replaced by what the
/// kubelet would give). Fails naming any variable no flag of the binary reads.
fn command_line(program: Program, workload: &Workload<'_>, container: &Value) -> Result<Vec<String>, String> {
    let name = container["name"].as_str().unwrap_or_default();
    let at = format!("{} container {name}", workload.id());
    let mut argv = vec![program.binary().to_owned()];
    let strings = |value: &Value| -> Vec<String> {
        let items = value.as_array().into_iter().flatten();
        items.filter_map(|s| s.as_str().map(str::to_owned)).collect()
    };
    let command = strings(&container["command"]);
    if let Some(first) = command.first() {
        if !first.ends_with(&format!("/{}", program.binary())) {
            return Err(format!("{at}: command {first} is not the image's {}", program.binary()));
        }
        argv.extend(command[1..].iter().cloned());
    }
    argv.extend(strings(&container["args"]));
    let flags = program.command();
    for env in container["env"].as_array().into_iter().flatten() {
        let variable = env["name"].as_str().unwrap_or_default();
        let arg = flags
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == variable))
            .ok_or_else(|| format!("{at}: env {variable} is read by no flag of {}", program.binary()))?;
        let value = match env.get("valueFrom") {
            Some(from) => downward(workload, from).map_err(|e| format!("{at}: env {variable}: {e}"))?,
            None => env["value"].as_str().unwrap_or_default().to_owned(),
        };
        let long = arg.get_long().expect("every env flag has a long name");
        if arg.get_action().takes_values() {
            argv.push(format!("--{long}={value}"));
        } else if value == "true" {
            argv.push(format!("--{long}"));
        } else {
            return Err(format!(
                "{at}: env {variable}={value:?}: the switch --{long} is set only by \"true\""
            ));
        }
    }
    Ok(argv)
}

/// A container of ours, parsed as its binary would parse it.
struct Running<'a> {
    workload: Workload<'a>,
    container: &'a Value,
    program: Program,
    parsed: Parsed,
}

impl Running<'_> {
    fn id(&self) -> String {
        format!(
            "{} container {}",
            self.workload.id(),
            self.container["name"].as_str().unwrap_or_default()
        )
    }
}

/// Every container of `manifests` that runs one of our binaries (not the init containers that
/// copy files), parsed; panics with the parser's message when one does not parse.
fn running(manifests: &Manifests) -> Vec<Running<'_>> {
    let variant = &manifests.name;
    let mut all = Vec::new();
    for workload in manifests.workloads() {
        for container in workload.containers() {
            let image = container["image"].as_str().unwrap_or_default();
            let program = Program::of_image(image)
                .unwrap_or_else(|| panic!("{variant}: {} runs {image}, which is none of ours", workload.id()));
            let argv = command_line(program, &workload, container).unwrap_or_else(|e| panic!("{variant}: {e}"));
            let parsed = program.parse(&argv).unwrap_or_else(|e| {
                panic!(
                    "{variant}: {} {argv:?} is refused by {}: {e}",
                    workload.id(),
                    program.binary()
                )
            });
            all.push(Running {
                workload,
                container,
                program,
                parsed,
            });
        }
    }
    all
}

/// `documents` as a variant of its own, for a test that changes them.
fn variant(name: &str, documents: Vec<Value>) -> Manifests {
    Manifests {
        name: name.to_owned(),
        yaml: String::new(),
        documents,
    }
}

fn find<'a, 'm>(all: &'a [Running<'m>], program: Program) -> &'a Running<'m> {
    all.iter()
        .find(|r| r.program == program)
        .unwrap_or_else(|| panic!("no container runs {}", program.binary()))
}

#[test]
fn every_flag_and_env_var_is_one_the_binary_accepts() {
    let Some(variants) = rendered("every_flag_and_env_var_is_one_the_binary_accepts") else {
        return;
    };
    for manifests in &variants {
        let all = running(manifests);
        let programs: BTreeSet<&str> = all.iter().map(|r| r.program.binary()).collect();
        assert_eq!(
            programs,
            BTreeSet::from(["istiod-lite", "mesh-node-agent", "ztunnel"]),
            "{}",
            manifests.name
        );
        let istiod = find(&all, Program::Istiod);
        let Parsed::Istiod(config) = &istiod.parsed else {
            unreachable!()
        };
        assert!(
            config.kubernetes,
            "{}: istiod-lite runs with --kubernetes",
            manifests.name
        );
        let Parsed::NodeAgent(agent) = &find(&all, Program::NodeAgent).parsed else {
            unreachable!()
        };
        assert!(
            agent.kubernetes,
            "{}: the node agent runs with --kubernetes",
            manifests.name
        );
    }

    // The check bites: an unknown variable and a bad value are each refused, with the reason.
    let edited = |edit: &dyn Fn(&mut Vec<Value>)| {
        let mut documents = variants[0].documents.clone();
        let ztunnel = documents
            .iter_mut()
            .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "ztunnel")
            .unwrap();
        edit(
            ztunnel["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array_mut()
                .unwrap(),
        );
        variant("edited", documents)
    };
    let command_line_of = |manifests: &Manifests| {
        let workload = manifests.workloads().find(|w| w.id() == "DaemonSet/ztunnel").unwrap();
        command_line(Program::Ztunnel, &workload, workload.containers().next().unwrap())
    };
    let typo = edited(&|env| env.push(json!({"name": "ZTUNNEL_DRAIN_DEADLNE", "value": "30s"})));
    let refused = command_line_of(&typo).unwrap_err();
    assert!(
        refused.ends_with("env ZTUNNEL_DRAIN_DEADLNE is read by no flag of ztunnel"),
        "{refused}"
    );
    let bad_value = edited(&|env| {
        let drain = env.iter_mut().find(|e| e["name"] == "ZTUNNEL_DRAIN_DEADLINE").unwrap();
        drain["value"] = json!("thirty seconds");
    });
    let argv = command_line_of(&bad_value).unwrap();
    let error = Program::Ztunnel.parse(&argv).expect_err("a bad duration is refused");
    assert!(error.contains("--drain-deadline"), "{error}");
}

/// The containerPort a probe or Service names (`port` a number or a port name) in `container`.
fn resolve(port: &Value, container: &Value) -> Option<u16> {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).ok();
    }
    let name = port.as_str()?;
    let ports = container["ports"].as_array()?;
    let found = ports.iter().find(|p| p["name"] == name)?;
    found["containerPort"].as_u64().and_then(|p| u16::try_from(p).ok())
}

/// Checks the ports of `documents` against the programs: containers, probes, scrape annotations
/// and Services. Returns every problem found.
fn port_problems(manifests: &Manifests) -> Vec<String> {
    let mut problems = Vec::new();
    let all = running(manifests);
    let documents = &manifests.documents;
    for running in &all {
        let (id, container, parsed) = (running.id(), running.container, &running.parsed);
        let public = parsed.public_ports();
        let declared: BTreeSet<u16> = container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["containerPort"].as_u64())
            .map(|p| p as u16)
            .collect();
        for port in declared.difference(&public) {
            problems.push(format!(
                "{id}: declares port {port}, which {} does not listen on outside the pod (it does on {public:?})",
                running.program.binary()
            ));
        }
        for port in public.difference(&declared) {
            problems.push(format!("{id}: listens on {port} but does not declare it"));
        }
        for probe in ["readinessProbe", "startupProbe", "livenessProbe"] {
            let check = &container[probe]["httpGet"];
            if check.is_null() {
                continue;
            }
            let port = resolve(&check["port"], container);
            if port != Some(parsed.readiness().port()) || check["path"] != "/healthz/ready" {
                problems.push(format!(
                    "{id}: {probe} checks {}:{}, but readiness is /healthz/ready on {}",
                    check["path"],
                    check["port"],
                    parsed.readiness()
                ));
            }
        }
        if container["readinessProbe"].is_null() {
            problems.push(format!("{id}: no readinessProbe"));
        }
        let scraped = &running.workload.pod["metadata"]["annotations"]["prometheus.io/port"];
        if scraped.as_str() != Some(parsed.metrics().port().to_string().as_str()) {
            problems.push(format!(
                "{id}: prometheus.io/port is {scraped}, metrics are on {}",
                parsed.metrics()
            ));
        }
    }
    for service in documents.iter().filter(|d| d["kind"] == "Service") {
        let name = service["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = &service["metadata"]["namespace"];
        let selector = service["spec"]["selector"].as_object().cloned().unwrap_or_default();
        let selected: Vec<&Running<'_>> = all
            .iter()
            .filter(|r| &r.workload.object["metadata"]["namespace"] == namespace)
            .filter(|r| {
                let labels = &r.workload.pod["metadata"]["labels"];
                !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
            })
            .collect();
        if selected.is_empty() {
            problems.push(format!("Service {name}: selects no pod of ours"));
        }
        for port in service["spec"]["ports"].as_array().into_iter().flatten() {
            let target = match &port["targetPort"] {
                Value::Null => port["port"].clone(),
                target => target.clone(),
            };
            for running in &selected {
                let resolved = resolve(&target, running.container);
                if !resolved.is_some_and(|p| running.parsed.public_ports().contains(&p)) {
                    problems.push(format!(
                        "Service {name} port {}: targets {target}, which {} does not listen on",
                        port["port"],
                        running.id()
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn every_probe_service_and_metrics_port_is_one_the_program_listens_on() {
    let Some(variants) = rendered("every_probe_service_and_metrics_port_is_one_the_program_listens_on") else {
        return;
    };
    for manifests in &variants {
        let problems = port_problems(manifests);
        assert!(problems.is_empty(), "{}:\n{}", manifests.name, problems.join("\n"));
    }

    // The check bites: a Service aimed at the loopback-only admin port is named.
    let mut documents = variants[0].documents.clone();
    let service = documents
        .iter_mut()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "istiod-lite")
        .unwrap();
    service["spec"]["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "admin", "port": 15000}));
    let problems = port_problems(&variant("admin-port", documents));
    assert_eq!(
        problems,
        [
            "Service istiod-lite port 15000: targets 15000, which Deployment/istiod-lite container discovery does not listen on"
        ]
    );
}

/// `https://<service>.<namespace>.svc:<port>` → (service, namespace, port).
fn service_address(address: &str) -> (String, String, u16) {
    let rest = address
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("{address}: not https (xDS and the CA are TLS-only off the pod)"));
    let (host, port) = rest.rsplit_once(':').unwrap();
    let mut labels = host.split('.');
    let service = labels.next().unwrap().to_owned();
    let namespace = labels.next().unwrap().to_owned();
    assert_eq!(labels.next(), Some("svc"), "{address}: not <service>.<namespace>.svc");
    (service, namespace, port.parse().unwrap())
}

/// Whether `address` reaches istiod-lite's xDS port through a rendered Service, with a name its
/// serving certificate carries.
fn reaches_istiod(manifests: &Manifests, istiod: &Running<'_>, address: &str) -> Result<(), String> {
    let Parsed::Istiod(config) = &istiod.parsed else {
        unreachable!()
    };
    let (service, namespace, port) = service_address(address);
    let host = format!("{service}.{namespace}.svc");
    if !config.dns_names.contains(&host) {
        return Err(format!(
            "{address}: {host} is not in istiod-lite's certificate ({:?})",
            config.dns_names
        ));
    }
    let found = manifests
        .of_kind("Service")
        .find(|s| s["metadata"]["name"] == service.as_str() && s["metadata"]["namespace"] == namespace.as_str())
        .ok_or_else(|| format!("{address}: no Service {namespace}/{service}"))?;
    let ports = found["spec"]["ports"].as_array().cloned().unwrap_or_default();
    let entry = ports
        .iter()
        .find(|p| p["port"] == port)
        .ok_or_else(|| format!("{address}: Service {service} has no port {port}"))?;
    let target = resolve(&entry["targetPort"], istiod.container);
    if target != Some(config.xds_addr.port()) {
        return Err(format!(
            "{address}: port {port} targets {target:?}, xDS is on {}",
            config.xds_addr
        ));
    }
    Ok(())
}

fn host_path_at<'a>(running: &Running<'a>, path: &str) -> Result<(&'a Value, String), String> {
    let (volume, mount) = running
        .workload
        .volume_at(running.container, path)
        .ok_or_else(|| format!("{}: nothing mounted at {path}", running.id()))?;
    let host = volume["hostPath"]["path"]
        .as_str()
        .ok_or_else(|| format!("{}: {mount} is not a hostPath volume", running.id()))?;
    if host != mount {
        return Err(format!(
            "{}: {mount} is the host's {host}: the other side looks for {path} on the host",
            running.id()
        ));
    }
    Ok((volume, mount))
}

#[test]
fn the_programs_are_wired_to_each_other() {
    let Some(variants) = rendered("the_programs_are_wired_to_each_other") else {
        return;
    };
    for manifests in &variants {
        let variant = &manifests.name;
        let all = running(manifests);
        let (istiod, ztunnel, agent) = (
            find(&all, Program::Istiod),
            find(&all, Program::Ztunnel),
            find(&all, Program::NodeAgent),
        );
        let (Parsed::Istiod(istiod_config), Parsed::Ztunnel(ztunnel_config), Parsed::NodeAgent(agent_config)) =
            (&istiod.parsed, &ztunnel.parsed, &agent.parsed)
        else {
            unreachable!()
        };
        let check = |result: Result<(), String>| result.unwrap_or_else(|e| panic!("{variant}: {e}"));

        // ztunnel and the waypoints reach istiod-lite's xDS and CA by a name its certificate has.
        check(reaches_istiod(manifests, istiod, &ztunnel_config.control.xds_address));
        assert_eq!(
            ztunnel_config.control.ca_address, None,
            "{variant}: the CA is on the xDS address"
        );
        check(reaches_istiod(manifests, istiod, &istiod_config.waypoint_xds_address));

        // ztunnel's root certificate is the root-cert ConfigMap's key.
        let root = ztunnel_config
            .control
            .root_cert
            .as_ref()
            .expect("ROOT_CERT")
            .display()
            .to_string();
        let (volume, mount) = ztunnel
            .workload
            .volume_at(ztunnel.container, &root)
            .expect("root cert mounted");
        assert_eq!(volume["configMap"]["name"], "istio-ca-root-cert", "{variant}");
        assert_eq!(format!("{mount}/root-cert.pem"), root, "{variant}: the ConfigMap's key");

        // Its token is a projected one for an audience istiod-lite's TokenReview asks for, and its
        // service account is one istiod-lite trusts to ask for its pods' identities.
        let token = ztunnel_config
            .control
            .token_file
            .as_ref()
            .expect("NODE_TOKEN_FILE")
            .display()
            .to_string();
        let (volume, mount) = ztunnel
            .workload
            .volume_at(ztunnel.container, &token)
            .expect("token mounted");
        let projected = &volume["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(
            format!("{mount}/{}", projected["path"].as_str().unwrap()),
            token,
            "{variant}"
        );
        let audience = projected["audience"].as_str().unwrap().to_owned();
        assert!(
            istiod_config.token_audiences.contains(&audience),
            "{variant}: {audience}"
        );
        let account = format!(
            "{}/{}",
            ztunnel.workload.object["metadata"]["namespace"].as_str().unwrap(),
            ztunnel.workload.pod["spec"]["serviceAccountName"].as_str().unwrap()
        );
        let trusted: Vec<String> = istiod_config
            .trusted_node_accounts
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(trusted.contains(&account), "{variant}: {account} not in {trusted:?}");

        // ztunnel and the node agent meet at the ZDS socket on the host; the plugin (on the host,
        // with no agentSocket in its netconf) finds the agent at its default socket.
        assert_eq!(ztunnel_config.zds_socket, agent_config.zds_socket, "{variant}");
        let zds = agent_config.zds_socket.display().to_string();
        check(host_path_at(ztunnel, &zds).map(drop));
        check(host_path_at(agent, &zds).map(drop));
        assert_eq!(
            agent_config.cni_socket,
            std::path::Path::new(mesh_cni::protocol::DEFAULT_AGENT_SOCKET),
            "{variant}"
        );
        check(host_path_at(agent, &agent_config.cni_socket.display().to_string()).map(drop));
        check(host_path_at(agent, &agent_config.state_file.display().to_string()).map(drop));
        // The capture rules the agent installs let ztunnel's own connections pass.
        assert_eq!(ztunnel_config.mark(), Some(agent_config.mark), "{variant}");

        // The agent sees the runtime's network namespaces, also those made after it started.
        let (netns, mount) = check_ok(host_path_at(agent, "/var/run/netns/cni-0"), variant);
        assert_eq!(netns["hostPath"]["path"], "/var/run/netns");
        let mounts = agent.container["volumeMounts"].as_array().unwrap();
        let netns_mount = mounts.iter().find(|m| m["mountPath"] == mount.as_str()).unwrap();
        assert_eq!(netns_mount["mountPropagation"], "HostToContainer", "{variant}");

        // The plugin binary reaches the host's CNI bin directory from the agent's image.
        let installs: Vec<&Value> = agent.workload.init_containers().collect();
        let copy = installs
            .iter()
            .find(|c| c["command"][0] == "/bin/cp")
            .expect("an install init container");
        assert_eq!(copy["command"][1], "/usr/local/bin/mesh-cni", "{variant}");
        let rename = installs
            .iter()
            .find(|c| c["command"][0] == "/bin/mv")
            .expect("a rename init container");
        assert_eq!(
            rename["command"][2], copy["command"][2],
            "{variant}: renames what was copied"
        );
        let target = rename["command"][3].as_str().unwrap();
        assert!(target.ends_with("/mesh-cni"), "{variant}: {target}");
        let volume = &rename["volumeMounts"][0];
        let bin = agent.workload.volume(volume["name"].as_str().unwrap()).unwrap();
        assert!(bin["hostPath"]["path"].as_str().is_some(), "{variant}: {bin}");
    }
}

fn check_ok<T>(result: Result<T, String>, variant: &str) -> T {
    result.unwrap_or_else(|e| panic!("{variant}: {e}"))
}

fn capabilities(container: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let set = |key: &str| -> BTreeSet<String> {
        let items = container["securityContext"]["capabilities"][key].as_array();
        items
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect()
    };
    (set("add"), set("drop"))
}

fn grace(workload: &Workload<'_>) -> Duration {
    Duration::from_secs(
        workload.pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30),
    )
}

#[test]
fn the_node_daemonsets_have_only_the_privileges_they_need() {
    let Some(variants) = rendered("the_node_daemonsets_have_only_the_privileges_they_need") else {
        return;
    };
    for manifests in &variants {
        let variant = &manifests.name;
        let all = running(manifests);
        // ztunnel runs in a network namespace of its own; the node agent in the host's, so that
        // its own pod never needs the CNI chain it answers for.
        for (program, added, host_network) in [
            (Program::Ztunnel, vec!["NET_ADMIN", "NET_RAW", "SYS_ADMIN"], false),
            (Program::NodeAgent, vec!["NET_ADMIN", "SYS_ADMIN"], true),
        ] {
            let running = find(&all, program);
            let (id, spec) = (running.id(), &running.workload.pod["spec"]);
            assert_eq!(running.workload.object["kind"], "DaemonSet", "{variant}: {id}");
            assert_eq!(spec["hostNetwork"] == true, host_network, "{variant}: {id} hostNetwork");
            assert_ne!(spec["hostPID"], true, "{variant}: {id}");
            let (add, drop) = capabilities(running.container);
            assert_eq!(add, added.iter().map(|c| c.to_string()).collect(), "{variant}: {id}");
            assert_eq!(drop, BTreeSet::from(["ALL".to_owned()]), "{variant}: {id}");
            let security = &running.container["securityContext"];
            assert_eq!(security["privileged"], false, "{variant}: {id}");
            assert_eq!(security["allowPrivilegeEscalation"], false, "{variant}: {id}");
            assert_eq!(spec["priorityClassName"], "system-node-critical", "{variant}: {id}");
            // One toleration of every taint: any key, any effect.
            let tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
            assert!(
                tolerations.contains(&json!({"operator": "Exists"})),
                "{variant}: {id} tolerates {tolerations:?}"
            );
            let drain = running.parsed.drain();
            let grace = grace(&running.workload);
            assert!(
                grace >= drain && grace <= drain + Duration::from_secs(10),
                "{variant}: {id}: terminationGracePeriodSeconds {grace:?} does not match the drain of {drain:?}"
            );
        }

        // ztunnel: upgrades start the new one beside the old one, never leaving a node without.
        let ztunnel = find(&all, Program::Ztunnel);
        let strategy = &ztunnel.workload.object["spec"]["updateStrategy"];
        assert_eq!(strategy["type"], "RollingUpdate", "{variant}");
        assert_eq!(
            strategy["rollingUpdate"],
            json!({"maxSurge": 1, "maxUnavailable": 0}),
            "{variant}"
        );
        // It calls no Kubernetes API: no API token in the pod.
        assert_eq!(
            ztunnel.workload.pod["spec"]["automountServiceAccountToken"], false,
            "{variant}"
        );
        let zds = &ztunnel.workload.volume("ztunnel-socket").unwrap()["hostPath"];
        assert_eq!(zds["path"], "/var/run/ztunnel", "{variant}");
    }
}

#[test]
fn every_container_runs_locked_down_and_the_controller_has_a_leader_identity() {
    let Some(variants) = rendered("every_container_runs_locked_down_and_the_controller_has_a_leader_identity") else {
        return;
    };
    for manifests in &variants {
        let variant = &manifests.name;
        for workload in manifests.workloads() {
            for container in workload.containers().chain(workload.init_containers()) {
                let id = format!("{variant}: {} container {}", workload.id(), container["name"]);
                let security = &container["securityContext"];
                assert_eq!(security["readOnlyRootFilesystem"], true, "{id}");
                assert_eq!(security["allowPrivilegeEscalation"], false, "{id}");
                assert!(capabilities(container).1.contains("ALL"), "{id}: drops ALL");
            }
        }

        let all = running(manifests);
        let istiod = find(&all, Program::Istiod);
        let (spec, security) = (&istiod.workload.pod["spec"], &istiod.container["securityContext"]);
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{variant}");
        assert_eq!(security["runAsNonRoot"], true, "{variant}");
        assert!(spec["securityContext"]["runAsUser"].as_u64().unwrap() > 0, "{variant}");
        assert_eq!(
            capabilities(istiod.container).0,
            BTreeSet::new(),
            "{variant}: adds none"
        );
        let Parsed::Istiod(config) = &istiod.parsed else {
            unreachable!()
        };
        // The Lease holder's identity and the namespace of its Lease and CA, from the pod.
        let env = istiod.container["env"].as_array().unwrap();
        let field = |name: &str| {
            let var = env.iter().find(|e| e["name"] == name);
            var.map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
        };
        assert_eq!(field("POD_NAME"), Some(json!("metadata.name")), "{variant}");
        assert_eq!(field("POD_NAMESPACE"), Some(json!("metadata.namespace")), "{variant}");
        assert_eq!(config.system_namespace, "istio-system", "{variant}");
        let drain = istiod.parsed.drain();
        assert!(
            grace(&istiod.workload) >= drain,
            "{variant}: grace shorter than the drain"
        );

        let replicas = istiod.workload.object["spec"]["replicas"].as_u64().unwrap();
        let budgets: Vec<&Value> = manifests.of_kind("PodDisruptionBudget").collect();
        match variant.as_str() {
            "overlays/single-replica" => {
                assert_eq!(replicas, 1);
                assert!(budgets.is_empty(), "one replica and a PDB would block every drain");
            }
            _ => {
                assert_eq!(replicas, 2, "{variant}");
                assert_eq!(budgets.len(), 1, "{variant}");
                assert_eq!(budgets[0]["spec"]["minAvailable"], 1, "{variant}");
                let selector = budgets[0]["spec"]["selector"]["matchLabels"].as_object().unwrap();
                let labels = &istiod.workload.pod["metadata"]["labels"];
                assert!(
                    selector.iter().all(|(k, v)| &labels[k] == v),
                    "{variant}: the PDB selects istiod-lite"
                );
            }
        }
    }
}

#[test]
fn waypoints_istiod_lite_deploys_pass_only_what_the_waypoint_accepts() {
    let Some(variants) = rendered("waypoints_istiod_lite_deploys_pass_only_what_the_waypoint_accepts") else {
        return;
    };
    let manifests = &variants[0];
    let all = running(manifests);
    let Parsed::Istiod(config) = &find(&all, Program::Istiod).parsed else {
        unreachable!()
    };
    let gateway: istiod_lite::objects::Gateway = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "demo", "uid": "gw-uid", "generation": 1,
                     "labels": {"topology.istio.io/network": "net-1"}},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }))
    .unwrap();
    let desired = istiod_lite::deployment::render::desired(&gateway, None, &config.deployment()).unwrap();
    let deployment = serde_json::to_value(&desired.deployment).unwrap();
    let service = serde_json::to_value(&desired.service).unwrap();
    let image = deployment["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    assert_eq!(image, json!(config.waypoint_image));
    assert_eq!(Program::of_image(image.as_str().unwrap()), Some(Program::Waypoint));

    let waypoint_objects = variant("waypoint", vec![deployment, service]);
    let waypoints = running(&waypoint_objects);
    assert_eq!(waypoints.len(), 1);
    let Parsed::Waypoint(waypoint) = &waypoints[0].parsed else {
        unreachable!()
    };
    assert_eq!(
        (waypoint.namespace.as_str(), waypoint.gateway.as_str()),
        ("demo", "waypoint")
    );
    assert_eq!(waypoint.network, "net-1");
    let xds = &waypoint.control.xds_address;
    assert_eq!(xds, &config.waypoint_xds_address);
    let problems = port_problems(&waypoint_objects);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_gateway_class_is_the_one_istiod_lite_serves() {
    let Some(variants) = rendered("the_gateway_class_is_the_one_istiod_lite_serves") else {
        return;
    };
    for manifests in &variants {
        let class = manifests.get("GatewayClass", istiod_lite::translate::waypoints::WAYPOINT_CLASS);
        let expected = istiod_lite::deployment::class::default_class();
        assert_eq!(
            class["spec"],
            serde_json::to_value(&expected.spec).unwrap(),
            "{}",
            manifests.name
        );
        assert_eq!(
            class["spec"]["controllerName"],
            istiod_lite::deployment::CONTROLLER_NAME,
            "{}",
            manifests.name
        );
    }
}
