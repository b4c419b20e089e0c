//! The ztunnel binary: --help explains, bad flags name the value, and a running ztunnel serves
//! readiness and metrics, then drains and exits 0 on SIGTERM.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ztunnel");

/// Kills the child if the test fails before it exits.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    (
        response[9..12].parse().unwrap(),
        response.split_once("\r\n\r\n").unwrap().1.to_owned(),
    )
}

#[test]
fn help_explains_every_flag_and_its_variable() {
    let output = Command::new(BIN).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "HBONE",
        "--admin-addr",
        "ZTUNNEL_ADMIN_ADDR",
        "--log-format",
        "LOG_FORMAT",
        "--drain-deadline",
    ] {
        assert!(help.contains(expected), "--help lacks {expected}:\n{help}");
    }
}

#[test]
fn bad_values_are_named() {
    let output = Command::new(BIN)
        .args([
            "--node-name",
            "n",
            "--root-cert",
            "/dev/null",
            "--metrics-addr",
            "nowhere",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(error.contains("nowhere") && error.contains("--metrics-addr"), "{error}");
    let output = Command::new(BIN)
        .args(["--node-name", "n", "--root-cert", "/dev/null"])
        .env("LOG_FORMAT", "xml")
        .output()
        .unwrap();
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(
        error.contains("log format \"xml\" is not one of: text, json"),
        "{error}"
    );
}

#[test]
fn serves_readiness_and_metrics_then_drains_on_sigterm() {
    // A root for the flag; no controller is listening, so ztunnel stays unready waiting for xDS.
    let root = std::env::temp_dir().join(format!("ztunnel-lifecycle-root-{}.pem", std::process::id()));
    let ca = mesh_core::identity::Authority::self_signed("cluster.local").unwrap();
    std::fs::write(&root, &ca.pem().root_cert).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--node-name",
            "node-1",
            "--xds-address",
            "http://127.0.0.1:9",
            "--root-cert",
        ])
        .arg(&root)
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--readiness-addr",
            "127.0.0.1:0",
        ])
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut running = Running(child);

    // Servers log where they listen; collect the three addresses.
    let mut lines = BufReader::new(stdout).lines();
    let mut servers = HashMap::new();
    while servers.len() < 3 {
        let line = lines.next().expect("ztunnel exited before listening").unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        if event["message"] == "listening" {
            let address: SocketAddr = event["address"].as_str().unwrap().parse().unwrap();
            servers.insert(event["server"].as_str().unwrap().to_owned(), address);
        }
    }
    let _ = std::fs::remove_file(&root);
    assert_eq!(
        http_get(servers["readiness"], "/healthz/ready"),
        (503, "not ready: waiting for node-agent, xds\n".into()),
        "not ready without a controller"
    );
    let (status, metrics) = http_get(servers["metrics"], "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    assert_eq!(http_get(servers["admin"], "/logging").1, "log filter: info\n");

    let pid = running.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "ztunnel did not exit within 10s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("shutting down") && l.contains("SIGTERM")),
        "{rest:?}"
    );
}
