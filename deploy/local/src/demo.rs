//! The demo a newcomer sees: traffic between the demo pods, then what the mesh made of it, read
//! back from the ztunnels' access logs and metrics.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::runner::{Lab, exchange, http_get, http_request};

/// One connection the demo makes, and what it sends.
struct Call {
    from: (&'static str, &'static str),
    to: &'static str,
    address: SocketAddr,
    send: Payload,
}

/// What a call sends.
enum Payload {
    /// Bytes to the echo apps, half-closed after.
    Echo(&'static str),
    /// An HTTP/1.1 request line (`GET /path`) and extra header lines.
    Http(&'static str, &'static str),
}

/// The calls of the waypoint example (`examples/waypoint`): HTTP through the waypoint.
fn waypoint_calls() -> Vec<Call> {
    let at = |text: &str| text.parse().expect("demo address");
    let reviews = |line, headers| Call {
        from: ("demo", "client"),
        to: "service demo/reviews",
        address: at("10.96.0.20:80"),
        send: Payload::Http(line, headers),
    };
    vec![
        reviews("GET /", ""),
        reviews("GET /", "x-version: v2\r\n"),
        reviews("GET /flaky", ""),
        reviews("GET /slow", ""),
        reviews("DELETE /", ""),
    ]
}

fn calls() -> Vec<Call> {
    let at = |text: &str| text.parse().expect("demo address");
    let mut calls: Vec<Call> = (0..4)
        .map(|_| Call {
            from: ("demo", "client"),
            to: "service demo/server",
            address: at("10.96.0.10:80"),
            send: Payload::Echo("hello"),
        })
        .collect();
    calls.push(Call {
        from: ("legacy", "legacy-client"),
        to: "pod demo/server-1",
        address: at("10.11.2.10:8080"),
        send: Payload::Echo("hello"),
    });
    calls.push(Call {
        from: ("demo", "client"),
        to: "pod legacy/legacy-server",
        address: at("10.11.1.21:8080"),
        send: Payload::Echo("hello"),
    });
    calls
}

/// Sends the demo traffic and describes what happened, as text for a terminal.
pub fn run(lab: &Lab) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "\n== The mesh is up: istiod-lite in {} ({}), a node agent and a ztunnel in each of {} nodes, {} pods",
        lab.names.network(),
        lab.topology.controller,
        lab.topology.nodes.len(),
        lab.pods.len()
    )?;
    writeln!(
        out,
        "\n== Pod starts (each pod's sandbox, then mesh-cni ADD as a container runtime runs it, then its apps)"
    )?;
    for (pod, outcome) in &lab.enrolment {
        writeln!(out, "  {pod}: {outcome}")?;
    }
    writeln!(
        out,
        "\n== Traffic (each pod's app connects to a plain address; it knows nothing of the mesh)"
    )?;
    let with_waypoint = lab.pod("demo", "reviews-v1").is_some();
    let calls = if with_waypoint { waypoint_calls() } else { calls() };
    for call in calls.into_iter().filter(|c| lab.pod(c.from.0, c.from.1).is_some()) {
        let pod = lab.names.pod(call.from.0, call.from.1);
        let (answer, what) = match call.send {
            Payload::Echo(bytes) => (exchange(&pod, call.address, bytes.as_bytes())?, String::new()),
            Payload::Http(line, headers) => {
                let request = format!("{line} HTTP/1.1\r\nhost: reviews\r\n{headers}connection: close\r\n\r\n");
                (
                    http_request(&pod, call.address, request.as_bytes())?,
                    format!(" {line}"),
                )
            }
        };
        let answer = String::from_utf8_lossy(&answer);
        let outcome = if let Some(head) = answer.strip_prefix("HTTP/1.1 ") {
            let status = head.get(..3).unwrap_or("?");
            let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or_default();
            format!("HTTP {status}: {body}")
        } else {
            match answer.split_once(": ") {
                Some((who, _)) => format!("answered by {who}"),
                None if answer.is_empty() => "refused".to_owned(),
                None => format!("answered {answer:?}"),
            }
        };
        writeln!(
            out,
            "  {}/{} → {} ({}){what}: {outcome}",
            call.from.0, call.from.1, call.to, call.address
        )?;
    }
    // A connection's log line is written as it closes: give the last ones a moment.
    std::thread::sleep(std::time::Duration::from_millis(300));
    writeln!(out, "\n== What the ztunnels saw (one access-log line per connection)")?;
    for node in &lab.topology.nodes {
        let log = std::fs::read_to_string(lab.dir.join("logs").join(format!("ztunnel-{}.log", node.name)))
            .unwrap_or_default();
        for line in log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            if line["target"] != "access" {
                continue;
            }
            let field = |name: &str| line[name].as_str().unwrap_or("-").to_owned();
            let source = match field("src.identity").as_str() {
                "-" => format!("{} (no identity)", field("src.addr")),
                identity => identity.to_owned(),
            };
            let destination = match field("dst.workload").as_str() {
                "-" => field("dst.addr"),
                workload => workload.to_owned(),
            };
            writeln!(
                out,
                "  {:<7} {:<8} {source} → {destination} [{}] {}",
                node.name,
                field("direction"),
                field("security"),
                field("result")
            )?;
        }
    }
    writeln!(out, "\n== Metrics: istio_tcp_connections_opened_total")?;
    for node in &lab.topology.nodes {
        let metrics = http_get(
            &lab.names.network(),
            SocketAddr::from((node.address, 15020)),
            "/metrics",
        )
        .map(|(_, body)| body)
        .unwrap_or_default();
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        {
            let label = |name: &str| metric_label(line, name);
            let count = line.rsplit(' ').next().unwrap_or("?");
            writeln!(
                out,
                "  {:<7} {:<11} {} → {} ({}, {}) = {count}",
                node.name,
                label("reporter"),
                label("source_workload"),
                label("destination_workload"),
                label("connection_security_policy"),
                label("response_flags"),
            )?;
        }
    }
    for pod in lab.pods.iter().filter(|p| p.apps.contains(&crate::plan::App::Waypoint)) {
        writeln!(
            out,
            "\n== Metrics of waypoint {}/{}: istio_requests_total",
            pod.namespace, pod.name
        )?;
        let metrics = http_get(&lab.names.network(), SocketAddr::from((pod.ip, 15020)), "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        for line in metrics.lines().filter(|l| l.starts_with("istio_requests_total{")) {
            let label = |name: &str| metric_label(line, name);
            let count = line.rsplit(' ').next().unwrap_or("?");
            writeln!(
                out,
                "  {} → {} via {} ({}) = {count}",
                label("source_workload"),
                label("destination_service"),
                label("destination_workload"),
                label("response_code"),
            )?;
        }
    }
    Ok(out)
}

/// The value of label `name` on a metrics line, `?` when absent.
fn metric_label(line: &str, name: &str) -> String {
    line.split(&format!("{name}=\""))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("?")
        .to_owned()
}
