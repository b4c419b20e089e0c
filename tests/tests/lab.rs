//! End to end on the lab: the real programs as processes, each node and pod a network namespace,
//! each pod started through the real `mesh-cni` plugin (run as a container runtime runs it), the
//! node agent installing its rules and handing it to ztunnel over ZDS. Two labs in turn: the L4 demo (`deploy/local/manifests`) and
//! the waypoint example (`deploy/local/examples/waypoint`). Each lab serves its scenarios in turn
//! (each puts back what it changed); it is removed at the end, also when a scenario fails, and
//! the last scenario checks that nothing of it is left.
//!
//! Not a libtest harness: the lab re-runs this binary as its components (`--mesh-role`), so
//! `main` dispatches those first, then runs the scenarios and prints libtest's summary line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use mesh_lab::plan::Pod;
use mesh_lab::runner::{self, Lab, Names, Options};
use mesh_lab::topology::Namespace;

/// The labs' namespace prefixes, each followed by this process's id (`mlt1234-net`): labs of
/// test runs that overlap (engineers sharing a machine) never touch each other's namespaces.
const L4_PREFIX: &str = "mlt";
const L7_PREFIX: &str = "mlw";
const CLIENT: (&str, &str) = ("demo", "client");
const LEGACY_CLIENT: (&str, &str) = ("legacy", "legacy-client");
const SERVER_1: &str = "10.11.2.10:8080";
const SERVER_2: &str = "10.11.2.11:8080";
const SERVICE: &str = "10.96.0.10:80";
const LEGACY_SERVER: &str = "10.11.1.21:8080";

fn at(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

/// Sends `data` from a pod; the answer (empty when refused).
fn call(lab: &Lab, from: (&str, &str), to: &str, data: &str) -> anyhow::Result<String> {
    let answer = runner::exchange(&lab.names.pod(from.0, from.1), at(to), data.as_bytes())?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Retries `check` until it holds or 20 s pass.
fn eventually(what: &str, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if check()? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what}: not within 20s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes one file of the running configuration (atomically, as a tool would).
fn configure(lab: &Lab, name: &str, yaml: &str) -> anyhow::Result<()> {
    let temporary = lab.dir.join("config").join(format!(".{name}.tmp"));
    std::fs::write(&temporary, yaml)?;
    std::fs::rename(temporary, lab.dir.join("config").join(name))?;
    Ok(())
}

fn unconfigure(lab: &Lab, name: &str) -> anyhow::Result<()> {
    std::fs::remove_file(lab.dir.join("config").join(name))?;
    Ok(())
}

fn captured(lab: &Lab, pod: (&str, &str)) -> bool {
    Namespace::existing(&lab.names.pod(pod.0, pod.1))
        .exec("nft", &["list", "table", "inet", "ztunnel"], None)
        .is_ok()
}

/// tcpdump on node-1's link to the cluster network, printing packets with their payloads.
struct Capture {
    child: Child,
    output: PathBuf,
}

impl Capture {
    fn start(lab: &Lab) -> anyhow::Result<Self> {
        let output = lab.dir.join("capture.txt");
        let file = std::fs::File::create(&output)?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.names.network(),
                "tcpdump",
                "-i",
                "n1",
                "-nn",
                "-l",
                "-A",
                "tcp",
            ])
            .stdout(Stdio::from(file))
            .stderr(Stdio::null())
            .spawn()
            .context("tcpdump (is it installed?)")?;
        // tcpdump needs a moment before it sees packets.
        std::thread::sleep(Duration::from_millis(700));
        let mut capture = Self { child, output };
        if let Some(status) = capture.child.try_wait()? {
            anyhow::bail!("tcpdump exited ({status}) before capturing: is it installed (apt-get install tcpdump)?");
        }
        Ok(capture)
    }

    fn finish(mut self) -> anyhow::Result<String> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(std::fs::read_to_string(&self.output)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cross_node_traffic_is_mutual_tls_on_the_wire(lab: &mut Lab) -> anyhow::Result<()> {
    let capture = Capture::start(lab)?;
    let secret = "plaintext-that-must-not-cross-the-wire";
    let direct = call(lab, CLIENT, SERVER_1, secret)?;
    let service = call(lab, CLIENT, SERVICE, secret)?;
    let wire = capture.finish()?;
    ensure!(direct == format!("server-1: {secret}"), "pod → pod answered {direct:?}");
    ensure!(
        service.ends_with(secret) && service.starts_with("server-"),
        "pod → service answered {service:?}"
    );
    ensure!(
        wire.contains("10.11.1.10."),
        "the capture saw the client's traffic:\n{wire}"
    );
    ensure!(
        wire.contains(".15008:"),
        "traffic crossed to port 15008 (HBONE):\n{wire}"
    );
    ensure!(
        !wire.contains(".8080:"),
        "nothing went to the app port on the wire:\n{wire}"
    );
    ensure!(
        !wire.contains(secret),
        "the application's bytes never crossed in the clear"
    );
    Ok(())
}

fn an_l4_policy_admits_the_client_and_denies_the_rest(lab: &mut Lab) -> anyhow::Result<()> {
    ensure!(
        call(lab, CLIENT, SERVER_1, "x")? == "server-1: x",
        "the allowed client is admitted"
    );
    ensure!(
        call(lab, LEGACY_CLIENT, SERVER_1, "x")?.is_empty(),
        "others are refused"
    );
    Ok(())
}

fn ambient_to_legacy_passes_through(lab: &mut Lab) -> anyhow::Result<()> {
    let answer = call(lab, CLIENT, LEGACY_SERVER, "out")?;
    ensure!(answer == "legacy-server: out", "answered {answer:?}");
    Ok(())
}

fn legacy_to_ambient_permissive_admits_and_strict_refuses(lab: &mut Lab) -> anyhow::Result<()> {
    // Let the legacy client past the demo's ALLOW policy, by address (it has no identity).
    configure(
        lab,
        "allow-legacy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-legacy, namespace: demo}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {ipBlocks: [10.11.1.20/32]}}]}]\n",
    )?;
    eventually("PERMISSIVE admits plaintext", || {
        Ok(call(lab, LEGACY_CLIENT, SERVER_1, "p")? == "server-1: p")
    })?;
    configure(
        lab,
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n",
    )?;
    eventually("STRICT refuses plaintext", || {
        Ok(call(lab, LEGACY_CLIENT, SERVER_1, "p")?.is_empty())
    })?;
    ensure!(
        call(lab, CLIENT, SERVER_1, "m")? == "server-1: m",
        "mTLS still admitted under STRICT"
    );
    unconfigure(lab, "strict.yaml")?;
    unconfigure(lab, "allow-legacy.yaml")?;
    eventually("back to the demo's policy", || {
        Ok(call(lab, LEGACY_CLIENT, SERVER_1, "p")?.is_empty())
    })?;
    Ok(())
}

/// Labels (or unlabels) namespace `legacy` ambient in the running configuration, as `kubectl
/// label` would: the Namespace object itself changes (in the lab's copy of the demo manifests).
fn label_legacy(lab: &Lab, ambient: bool) -> anyhow::Result<()> {
    let plain = "kind: Namespace\nmetadata:\n  name: legacy\n";
    let labelled = "kind: Namespace\nmetadata:\n  name: legacy\n  labels: {istio.io/dataplane-mode: ambient}\n";
    let text = std::fs::read_to_string(lab.dir.join("config").join("demo.yaml"))?;
    let (from, to) = if ambient { (plain, labelled) } else { (labelled, plain) };
    ensure!(text.contains(from), "demo.yaml has the legacy Namespace as expected");
    configure(lab, "demo.yaml", &text.replacen(from, to, 1))
}

/// Enrolment is decided when a pod starts (the plugin asks the agent, which reads the pod and its
/// namespace): labelling a namespace enrols its pods as they restart, unlabelling unenrols them.
fn labelling_a_namespace_enrols_its_pods_at_restart_and_unlabelling_unenrols(lab: &mut Lab) -> anyhow::Result<()> {
    ensure!(!captured(lab, LEGACY_CLIENT), "legacy pods start outside the mesh");
    label_legacy(lab, true)?;
    for (namespace, name) in [LEGACY_CLIENT, ("legacy", "legacy-server")] {
        lab.restart_pod(namespace, name)?;
    }
    ensure!(captured(lab, LEGACY_CLIENT), "legacy pods enrolled at their restart");
    // Enrolled, the legacy client now speaks mTLS with its own identity: the demo's policy
    // (which admits only demo/client) refuses it by principal, and passthrough to the legacy
    // server now goes over HBONE too (once istiod-lite has the label: until then the client's
    // ztunnel sends it plaintext, which the server's captured inbound also answers).
    // (The previous scenario's ipBlocks policy may still be in its removal grace period.)
    eventually("still refused by principal", || {
        Ok(call(lab, LEGACY_CLIENT, SERVER_1, "x")?.is_empty())
    })?;
    eventually("client → legacy over HBONE", || {
        Ok(call(lab, CLIENT, LEGACY_SERVER, "in")? == "legacy-server: in" && legacy_server_saw_mutual_tls(lab)?)
    })?;
    label_legacy(lab, false)?;
    for (namespace, name) in [LEGACY_CLIENT, ("legacy", "legacy-server")] {
        lab.restart_pod(namespace, name)?;
    }
    ensure!(!captured(lab, LEGACY_CLIENT), "legacy pods unenrolled at their restart");
    eventually("client → legacy in plaintext again", || {
        Ok(call(lab, CLIENT, LEGACY_SERVER, "out")? == "legacy-server: out")
    })?;
    Ok(())
}

/// Whether node-1's ztunnel counted a connection to the legacy server over mTLS.
fn legacy_server_saw_mutual_tls(lab: &Lab) -> anyhow::Result<bool> {
    Ok(tcp_opened(
        lab,
        "10.10.0.1:15020",
        &[
            "reporter=\"destination\"",
            "destination_workload=\"legacy-server\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    )? > 0)
}

/// `istio_tcp_connections_opened_total` of the ztunnel whose metrics are at `metrics`, summed
/// over the series carrying every one of `labels`.
fn tcp_opened(lab: &Lab, metrics: &str, labels: &[&str]) -> anyhow::Result<u64> {
    let (_, body) = runner::http_get(&lab.names.network(), at(metrics), "/metrics")?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{") && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

fn a_ztunnel_restart_keeps_rules_and_serves_again(lab: &mut Lab) -> anyhow::Result<()> {
    lab.crash_ztunnel("node-2")?;
    ensure!(captured(lab, ("demo", "server-1")), "the rules outlive a crash");
    ensure!(
        call(lab, CLIENT, SERVER_1, "while-down")?.is_empty(),
        "with no ztunnel on node-2, connections to its pods are refused (fail closed)"
    );
    // A pod that starts meanwhile does not start: its ADD fails (ztunnel is not connected to the
    // node agent, a CNI error the runtime retries on) and none of its processes runs.
    let server_2 = lab.pod("demo", "server-2").cloned().context("demo/server-2")?;
    lab.stop_pod("demo", "server-2")?;
    let refused = lab.start_pod(&server_2).map_err(|e| format!("{e:#}"));
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("CNI error 11") && e.contains("ztunnel is not connected")),
        "starting a pod with no ztunnel on its node: {refused:?}"
    );
    ensure!(
        lab.processes_of("demo", "server-2").is_empty(),
        "the refused pod's app does not run"
    );
    lab.restart_ztunnel("node-2")?;
    // Ready means it has the agent's snapshot: the pods are served at once, no retry needed.
    let again = call(lab, CLIENT, SERVER_1, "again")?;
    ensure!(again == "server-1: again", "right after the restart answered {again:?}");
    ensure!(
        captured(lab, ("demo", "server-1")),
        "the rules are in place after the restart"
    );
    lab.start_pod(&server_2)?;
    // The pod is captured when start_pod returns; its app process may still be binding its port.
    let deadline = Instant::now() + Duration::from_secs(10);
    let started = loop {
        let started = call(lab, CLIENT, SERVER_2, "started")?;
        if started == "server-2: started" || Instant::now() >= deadline {
            break started;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        started == "server-2: started",
        "the pod started again answered {started:?}"
    );
    Ok(())
}

/// What a pod's first connection met.
struct FirstConnection {
    answer: String,
    /// From ADD's return to the pod's `connect()`.
    cue_to_connect: Duration,
}

/// Issue 11's acceptance: a pod whose first action, the instant ADD returns, is a connection to a
/// mesh service. Its process is in the pod's namespace before ADD runs and connects as soon as
/// ADD returns; the connection must be answered and counted by the destination ztunnel over
/// mTLS with the pod's identity, and no byte of it may cross the wire in the clear; 50 starts.
///
/// Each start is a pod of its own (`demo/starter-<i>`, its own address), as a scheduler's fresh
/// pods are: a pod started again at the address and with the identity of one that just left gets
/// that one's pooled HBONE connections, which died with its namespace (see `STARTERS`).
fn a_pod_connecting_the_instant_it_starts_is_carried_over_hbone_50_times(lab: &mut Lab) -> anyhow::Result<()> {
    let pods = starters(50);
    let mut manifests = String::from(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-starter, namespace: demo}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/starter]}}]}]\n",
    );
    for pod in pods.iter().take(STARTERS) {
        manifests.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: demo, labels: {{app: starter}}}}\nspec: {{serviceAccountName: starter, nodeName: node-1, containers: [{{name: c, image: mesh-lab/idle}}]}}\nstatus: {{podIP: {}, conditions: [{{type: Ready, status: \"True\"}}]}}\n",
            pod.name, pod.ip
        ));
    }
    configure(lab, "zz-starters.yaml", &manifests)?;
    let result = pod_start_loop(lab, &pods);
    for pod in pods.iter().take(STARTERS) {
        if let Some(sandbox) = lab.sandbox(&pod.namespace, &pod.name).cloned() {
            let _ = lab.remove_sandbox(&sandbox);
        }
    }
    unconfigure(lab, "zz-starters.yaml")?;
    result
}

/// How many distinct pods the starts cycle through. 1 (the same pod, at the same address, each
/// time) shows a ztunnel bug: from the third start on, the pod's first connection rides a
/// pooled HBONE connection made from a previous sandbox's namespace, and hangs.
const STARTERS: usize = 50;

/// `demo/starter-<i>` on node-1 at 10.11.1.(100 + i), service account `starter`.
fn starters(starts: usize) -> Vec<Pod> {
    (0..starts)
        .map(|i| Pod {
            namespace: "demo".into(),
            name: format!("starter-{}", i % STARTERS),
            uid: None,
            node: "node-1".into(),
            ip: std::net::Ipv4Addr::new(10, 11, 1, 100 + (i % STARTERS) as u8),
            apps: Vec::new(),
            service_account: "starter".into(),
            gateway: None,
        })
        .collect()
}

fn pod_start_loop(lab: &mut Lab, pods: &[Pod]) -> anyhow::Result<()> {
    let starts = pods.len();
    let principal = "source_principal=\"spiffe://cluster.local/ns/demo/sa/starter\"";
    // istiod-lite has to have told node-1's ztunnel the pods (its outbound knows a source by its
    // address) and node-2's the policy that admits them.
    let dump = |lab: &Lab, node: &str| -> anyhow::Result<serde_json::Value> {
        let namespace = lab.names.node(node);
        let (_, body) = runner::http_get(&namespace, at("127.0.0.1:15000"), "/config_dump")?;
        Ok(serde_json::from_str(&body)?)
    };
    eventually("node-1's ztunnel knows the starter pods", || {
        let known = dump(lab, "node-1")?;
        let addresses: Vec<&serde_json::Value> = known["workloads"]
            .as_array()
            .map(|w| w.iter().map(|w| &w["addresses"][0]).collect())
            .unwrap_or_default();
        Ok(pods.iter().all(|p| addresses.iter().any(|a| **a == p.ip.to_string())))
    })?;
    eventually("node-2's ztunnel has the policy admitting them", || {
        Ok(dump(lab, "node-2")?["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "demo/allow-starter")))
    })?;
    let node_2 = "10.10.0.2:15020";
    let mutual_tls = [
        principal,
        "reporter=\"destination\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let plaintext = ["reporter=\"destination\"", "connection_security_policy=\"unknown\""];
    let capture = Capture::start(lab)?;
    let (mut escapes, mut unanswered) = (Vec::new(), Vec::new());
    let (mut times, mut adds, mut gaps) = (Vec::new(), Vec::new(), Vec::new());
    for (i, pod) in pods.iter().enumerate() {
        let started = Instant::now();
        let (mtls_before, plain_before) = (
            tcp_opened(lab, node_2, &mutual_tls)?,
            tcp_opened(lab, node_2, &plaintext)?,
        );
        let sandbox = lab.create_sandbox(pod)?;
        let payload = format!("first-connection-{i}");
        // The pod's process: already in its namespace, it connects the moment it is let go.
        let (go, cue) = std::sync::mpsc::channel::<Instant>();
        let sent = payload.clone();
        let process = Namespace::existing(&sandbox.netns).spawn(move || -> anyhow::Result<FirstConnection> {
            let added = cue.recv()?;
            let cue_to_connect = added.elapsed();
            let mut stream = std::net::TcpStream::connect_timeout(&at(SERVICE), Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let _ = std::io::Write::write_all(&mut stream, sent.as_bytes());
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut answer = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stream, &mut answer);
            Ok(FirstConnection {
                answer: String::from_utf8_lossy(&answer).into_owned(),
                cue_to_connect,
            })
        })?;
        let adding = Instant::now();
        let added = lab.cni_add(&sandbox);
        adds.push(adding.elapsed());
        // Let the process go only when ADD succeeded (a runtime starts nothing otherwise: the
        // process's cue is dropped and it ends without connecting).
        match &added {
            Ok(()) => go.send(Instant::now())?,
            Err(_) => drop(go),
        }
        added.with_context(|| format!("start {i}"))?;
        let first = process
            .join()
            .map_err(|_| anyhow::anyhow!("the pod's process panicked"))?
            .and_then(|r| r)
            .with_context(|| format!("start {i}: the pod's first connection"))?;
        gaps.push(first.cue_to_connect);
        lab.remove_sandbox(&sandbox)?;
        let answered = first.answer.starts_with("server-") && first.answer.ends_with(&payload);
        let mtls = tcp_opened(lab, node_2, &mutual_tls)? - mtls_before;
        let plain = tcp_opened(lab, node_2, &plaintext)? - plain_before;
        if plain > 0 || (answered && mtls == 0) {
            escapes.push(format!(
                "start {i}: {plain} plaintext at the destination, answered {answered}, mTLS {mtls}"
            ));
        }
        if !answered {
            unanswered.push(format!("start {i}: answered {:?}", first.answer));
        }
        times.push(started.elapsed());
    }
    let wire = capture.finish()?;
    let total: Duration = times.iter().sum();
    let mean = total / starts as u32;
    let slowest = times.iter().max().copied().unwrap_or_default();
    let widest_gap = gaps.iter().max().copied().unwrap_or_default();
    let add_mean = adds.iter().sum::<Duration>() / starts as u32;
    println!(
        "  {starts} pod starts: {} escapes, {} unanswered; per start {mean:.1?} mean, {slowest:.1?} slowest \
         (sandbox, ADD, first connection, DEL), of which ADD {add_mean:.1?} mean; ADD's return to \
         connect() at most {widest_gap:.1?}",
        escapes.len(),
        unanswered.len()
    );
    ensure!(escapes.is_empty(), "escapes: {escapes:#?}");
    ensure!(unanswered.is_empty(), "unanswered: {unanswered:#?}");
    ensure!(
        !wire.contains("first-connection-"),
        "a pod's bytes crossed the wire in the clear"
    );
    ensure!(
        wire.contains(&format!("{}.", pods[0].ip)),
        "the capture saw the starters' traffic:\n{wire}"
    );
    Ok(())
}

/// An HTTP/1.1 request from the demo client to `reviews` (through the waypoint): status, body.
fn http(lab: &Lab, method: &str, path: &str, headers: &str) -> anyhow::Result<(u16, String)> {
    let request = format!("{method} {path} HTTP/1.1\r\nhost: reviews\r\n{headers}connection: close\r\n\r\n");
    let answer = runner::http_request(
        &lab.names.pod(CLIENT.0, CLIENT.1),
        at("10.96.0.20:80"),
        request.as_bytes(),
    )?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.get(9..12).unwrap_or("0").parse().unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `istio_requests_total` of the waypoint for `code`, summed.
fn requests_total(lab: &Lab, code: u16) -> anyhow::Result<u64> {
    let (_, metrics) = runner::http_get(&lab.names.network(), at("10.11.1.30:15020"), "/metrics")?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&format!("response_code=\"{code}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

fn get_passes_and_delete_is_forbidden_by_the_waypoint_policy(lab: &mut Lab) -> anyhow::Result<()> {
    let (status, body) = http(lab, "GET", "/allowed", "")?;
    ensure!(
        status == 200 && body.ends_with("GET /allowed"),
        "GET answered {status} {body:?}"
    );
    let (status, body) = http(lab, "DELETE", "/", "")?;
    ensure!(
        (status, body.as_str()) == (403, "RBAC: access denied"),
        "DELETE answered {status} {body:?}"
    );
    Ok(())
}

fn a_90_10_split_holds_over_1000_requests(lab: &mut Lab) -> anyhow::Result<()> {
    let mut v2 = 0;
    for _ in 0..1000 {
        let (status, body) = http(lab, "GET", "/split", "")?;
        ensure!(status == 200, "answered {status} {body:?}");
        v2 += usize::from(body.starts_with("reviews-v2"));
    }
    ensure!((50..=150).contains(&v2), "v2 got {v2} of 1000 (want 100 ± 50)");
    Ok(())
}

fn a_header_match_routes_to_v2(lab: &mut Lab) -> anyhow::Result<()> {
    for _ in 0..10 {
        let (status, body) = http(lab, "GET", "/any", "x-version: v2\r\n")?;
        ensure!(
            (status, body.as_str()) == (200, "reviews-v2 GET /any"),
            "answered {status} {body:?}"
        );
    }
    Ok(())
}

fn a_retry_turns_a_flaky_503_into_200(lab: &mut Lab) -> anyhow::Result<()> {
    for _ in 0..4 {
        let (status, body) = http(lab, "GET", "/flaky", "")?;
        ensure!(status == 200, "answered {status} {body:?}");
    }
    Ok(())
}

fn a_timeout_fires(lab: &mut Lab) -> anyhow::Result<()> {
    let started = Instant::now();
    let (status, body) = http(lab, "GET", "/slow", "")?;
    ensure!(
        (status, body.as_str()) == (504, "upstream request timeout"),
        "answered {status} {body:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "the timeout answered, not the slow app"
    );
    Ok(())
}

fn requests_total_counts_exactly_what_was_sent(lab: &mut Lab) -> anyhow::Result<()> {
    let (ok, forbidden) = (requests_total(lab, 200)?, requests_total(lab, 403)?);
    for _ in 0..25 {
        http(lab, "GET", "/counted", "")?;
    }
    for _ in 0..3 {
        http(lab, "DELETE", "/counted", "")?;
    }
    let counted = (requests_total(lab, 200)? - ok, requests_total(lab, 403)? - forbidden);
    ensure!(counted == (25, 3), "counted {counted:?}, sent (25, 3)");
    Ok(())
}

fn the_waypoint_cli_gets_a_waypoint_deployed_and_traffic_follows(lab: &mut Lab) -> anyhow::Result<()> {
    use waypoint::cli::{Command, Store, Target};
    let config_dir = lab.dir.join("config");
    let target = || Target {
        namespace: "demo".into(),
        name: "waypoint".into(),
        store: Store::directory(&config_dir),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let run = |command| runtime.block_on(waypoint::cli::run(command));
    // The demo's policy admits only the client at the servers; through a waypoint the servers see
    // the waypoint's identity, so admit that too.
    configure(
        lab,
        "allow-waypoint.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-waypoint, namespace: demo}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/waypoint]}}]}]\n",
    )?;
    run(Command::Apply {
        target: target(),
        enroll_namespace: true,
    })?;
    let changes = lab.reconcile_waypoints()?;
    ensure!(changes == ["deployed waypoint demo/waypoint"], "{changes:?}");
    let through_waypoint = |lab: &Lab| -> anyhow::Result<bool> {
        let (_, metrics) = runner::http_get(&lab.names.network(), at("10.10.0.2:15020"), "/metrics")?;
        Ok(metrics.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/waypoint\"")
        }))
    };
    eventually("service traffic through the deployed waypoint", || {
        Ok(call(lab, CLIENT, SERVICE, "via")?.ends_with("via") && through_waypoint(lab)?)
    })?;
    let listed = run(Command::List {
        store: Store::directory(&config_dir),
    })?;
    ensure!(listed == "demo/waypoint  used by: demo\n", "{listed:?}");
    run(Command::Delete { target: target() })?;
    let changes = lab.reconcile_waypoints()?;
    ensure!(changes == ["removed waypoint demo/waypoint"], "{changes:?}");
    ensure!(lab.pod("demo", "waypoint-0").is_none(), "the waypoint pod is gone");
    eventually("service traffic straight again", || {
        Ok(call(lab, CLIENT, SERVICE, "direct")?.ends_with("direct"))
    })?;
    unconfigure(lab, "allow-waypoint.yaml")?;
    Ok(())
}

type Scenario = fn(&mut Lab) -> anyhow::Result<()>;

fn main() {
    if let Some(result) = mesh_lab::component::run_role_if_asked() {
        if let Err(error) = result {
            eprintln!("{error:#}");
            std::process::exit(1);
        }
        return;
    }
    if !mesh_tests::netns::privileged("lab end-to-end scenarios") {
        println!("test result: ok. 0 passed; 0 failed; 16 ignored; 0 measured; 0 filtered out");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local");
    for prefix in [L4_PREFIX, L7_PREFIX] {
        reap_leftovers(prefix);
    }
    let options = |manifests: PathBuf, prefix: &str| lab_options(&root, manifests, prefix, std::process::id());
    let l4: Vec<(&str, Scenario)> = vec![
        (
            "cross_node_traffic_is_mutual_tls_on_the_wire",
            cross_node_traffic_is_mutual_tls_on_the_wire,
        ),
        (
            "an_l4_policy_admits_the_client_and_denies_the_rest",
            an_l4_policy_admits_the_client_and_denies_the_rest,
        ),
        ("ambient_to_legacy_passes_through", ambient_to_legacy_passes_through),
        (
            "legacy_to_ambient_permissive_admits_and_strict_refuses",
            legacy_to_ambient_permissive_admits_and_strict_refuses,
        ),
        (
            "labelling_a_namespace_enrols_its_pods_at_restart_and_unlabelling_unenrols",
            labelling_a_namespace_enrols_its_pods_at_restart_and_unlabelling_unenrols,
        ),
        (
            "a_ztunnel_restart_keeps_rules_and_serves_again",
            a_ztunnel_restart_keeps_rules_and_serves_again,
        ),
        (
            "a_pod_connecting_the_instant_it_starts_is_carried_over_hbone_50_times",
            a_pod_connecting_the_instant_it_starts_is_carried_over_hbone_50_times,
        ),
        (
            "the_waypoint_cli_gets_a_waypoint_deployed_and_traffic_follows",
            the_waypoint_cli_gets_a_waypoint_deployed_and_traffic_follows,
        ),
    ];
    let l7: Vec<(&str, Scenario)> = vec![
        (
            "get_passes_and_delete_is_forbidden_by_the_waypoint_policy",
            get_passes_and_delete_is_forbidden_by_the_waypoint_policy,
        ),
        (
            "a_90_10_split_holds_over_1000_requests",
            a_90_10_split_holds_over_1000_requests,
        ),
        ("a_header_match_routes_to_v2", a_header_match_routes_to_v2),
        ("a_retry_turns_a_flaky_503_into_200", a_retry_turns_a_flaky_503_into_200),
        ("a_timeout_fires", a_timeout_fires),
        (
            "requests_total_counts_exactly_what_was_sent",
            requests_total_counts_exactly_what_was_sent,
        ),
    ];
    let labs = [
        (options(root.join("manifests"), L4_PREFIX), l4),
        (options(root.join("examples/waypoint"), L7_PREFIX), l7),
    ];
    let (mut passed, mut failed) = (0, 0);
    let mut report = |name: &str, result: anyhow::Result<()>| match result {
        Ok(()) => {
            passed += 1;
            println!("test {name} ... ok");
        }
        Err(error) => {
            failed += 1;
            println!("test {name} ... FAILED\n  {error:#}");
        }
    };
    // As libtest does: a first argument that is not a flag keeps only the scenarios whose names
    // contain it (`cargo test -p mesh-tests --test lab -- instant`); a lab left with none is not
    // brought up.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mut filtered = 0;
    for (options, mut scenarios) in labs {
        if let Some(filter) = &filter {
            let before = scenarios.len();
            scenarios.retain(|(name, _)| name.contains(filter.as_str()));
            filtered += before - scenarios.len();
            if scenarios.is_empty() {
                filtered += 1;
                continue;
            }
        }
        match Lab::up(&options) {
            Ok(mut lab) => {
                for (name, scenario) in scenarios {
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&mut lab)))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")));
                    report(name, outcome);
                }
                let name = format!("down_leaves_nothing_behind ({})", options.names.prefix);
                report(&name, down_leaves_nothing(lab, &options));
            }
            Err(error) => {
                report(&format!("lab_up ({})", options.names.prefix), Err(error));
                let _ = runner::down(&options.dir, &options.names);
            }
        }
    }
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out"
    );
    if failed > 0 {
        std::process::exit(1);
    }
}

/// A lab of run `pid`: its namespaces are `<prefix><pid>-…`, its files in the temporary directory.
fn lab_options(root: &std::path::Path, manifests: PathBuf, prefix: &str, pid: u32) -> Options {
    let prefix = format!("{prefix}{pid}-");
    Options {
        topology: root.join("topology.yaml"),
        manifests,
        dir: std::env::temp_dir().join(format!("mesh-lab-test-{prefix}")),
        names: Names { prefix },
    }
}

/// Removes the labs of runs that ended without removing them (killed, say): namespaces named
/// `<prefix><pid>-…` whose process is gone, with whatever their state file lists.
fn reap_leftovers(prefix: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local");
    let mut dead: Vec<u32> = Namespace::list()
        .iter()
        .filter_map(|n| n.strip_prefix(prefix)?.split_once('-')?.0.parse().ok())
        .filter(|pid| !PathBuf::from(format!("/proc/{pid}")).exists())
        .collect();
    dead.sort_unstable();
    dead.dedup();
    for pid in dead {
        let options = lab_options(&root, PathBuf::new(), prefix, pid);
        if let Ok(removed) = runner::down(&options.dir, &options.names) {
            println!("removed the lab a run {pid} left behind: {} items", removed.len());
        }
    }
}

/// Brings the lab down and checks that no namespace, rule holder, process or file is left.
fn down_leaves_nothing(lab: Lab, options: &Options) -> anyhow::Result<()> {
    let pids: Vec<u32> = std::fs::read_to_string(options.dir.join("state.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            v["pids"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p.as_u64()).map(|p| p as u32).collect())
        })
        .unwrap_or_default();
    lab.down()?;
    let left: Vec<String> = Namespace::list()
        .into_iter()
        .filter(|n| n.starts_with(&options.names.prefix))
        .collect();
    ensure!(left.is_empty(), "namespaces left: {left:?}");
    for pid in pids {
        ensure!(
            !PathBuf::from(format!("/proc/{pid}")).exists(),
            "process {pid} still runs"
        );
    }
    ensure!(!options.dir.exists(), "{} still exists", options.dir.display());
    Ok(())
}
