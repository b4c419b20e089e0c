//! End to end on the lab: the real programs as processes, each node and pod a network namespace,
//! ztunnel enrolling pods in-pod. Two labs in turn: the L4 demo (`deploy/local/manifests`) and
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
use mesh_lab::runner::{self, Lab, Names, Options};
use mesh_lab::topology::Namespace;

const PREFIX: &str = "mlt-";
const CLIENT: (&str, &str) = ("demo", "client");
const LEGACY_CLIENT: (&str, &str) = ("legacy", "legacy-client");
const SERVER_1: &str = "10.11.2.10:8080";
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
        Ok(Self { child, output })
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

fn labelling_a_namespace_enrols_its_pods_and_unlabelling_unenrols(lab: &mut Lab) -> anyhow::Result<()> {
    ensure!(!captured(lab, LEGACY_CLIENT), "legacy pods start outside the mesh");
    configure(
        lab,
        "zz-legacy-ambient.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy, labels: {istio.io/dataplane-mode: ambient}}\n",
    )?;
    eventually("legacy pods enrolled", || Ok(captured(lab, LEGACY_CLIENT)))?;
    // Enrolled, the legacy client now speaks mTLS with its own identity: the demo's policy
    // (which admits only demo/client) refuses it by principal, and passthrough to the legacy
    // server now goes over HBONE too.
    ensure!(
        call(lab, LEGACY_CLIENT, SERVER_1, "x")?.is_empty(),
        "still refused by principal"
    );
    ensure!(
        call(lab, CLIENT, LEGACY_SERVER, "in")? == "legacy-server: in",
        "client → legacy over HBONE"
    );
    unconfigure(lab, "zz-legacy-ambient.yaml")?;
    eventually("legacy pods unenrolled", || Ok(!captured(lab, LEGACY_CLIENT)))?;
    Ok(())
}

fn a_ztunnel_restart_keeps_rules_and_serves_again(lab: &mut Lab) -> anyhow::Result<()> {
    lab.crash_ztunnel("node-2")?;
    ensure!(captured(lab, ("demo", "server-1")), "the rules outlive a crash");
    lab.restart_ztunnel("node-2")?;
    eventually("traffic after the restart", || {
        Ok(call(lab, CLIENT, SERVER_1, "again")? == "server-1: again")
    })?;
    ensure!(
        captured(lab, ("demo", "server-1")),
        "the rules are in place after the restart"
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
        println!("test result: ok. 0 passed; 0 failed; 15 ignored; 0 measured; 0 filtered out");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local");
    let options = |manifests: PathBuf, prefix: &str| Options {
        topology: root.join("topology.yaml"),
        manifests,
        dir: std::env::temp_dir().join(format!("mesh-lab-test-{prefix}{}", std::process::id())),
        names: Names { prefix: prefix.into() },
    };
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
            "labelling_a_namespace_enrols_its_pods_and_unlabelling_unenrols",
            labelling_a_namespace_enrols_its_pods_and_unlabelling_unenrols,
        ),
        (
            "a_ztunnel_restart_keeps_rules_and_serves_again",
            a_ztunnel_restart_keeps_rules_and_serves_again,
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
        (options(root.join("manifests"), PREFIX), l4),
        (options(root.join("examples/waypoint"), "mlw-"), l7),
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
    for (options, scenarios) in labs {
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
    println!("\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out");
    if failed > 0 {
        std::process::exit(1);
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
        .filter(|n| n.starts_with(PREFIX))
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
