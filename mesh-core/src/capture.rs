//! The capture rules inside a pod's network namespace, as one nftables table so they are applied
//! and removed atomically: outbound TCP leaving the pod goes to ztunnel's 15001; inbound TCP from
//! outside, except HBONE (15008), to its 15006. Traffic within the pod (over `lo`) and ztunnel's
//! own marked sockets are left alone. The node agent installs them before ztunnel holds the pod
//! and removes them only when the pod leaves the mesh: while no ztunnel listens, captured
//! connections are refused, never sent around it.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::netns::NetNs;

/// Outbound connections redirected from a pod (its netns' 15001).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext connections redirected to a pod (15006).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The mark Istio's rules skip (0x539): ztunnel's own sockets.
pub const DEFAULT_MARK: u32 = 1337;

pub const TABLE: &str = "ztunnel";

/// The table for a pod; replacing an existing one in the same transaction makes this idempotent.
pub fn table(mark: u32) -> String {
    let hbone = crate::hbone::PORT;
    format!(
        "table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"lo\" return
    tcp dport {{ {hbone}, {INBOUND_PLAINTEXT_PORT}, {OUTBOUND_PORT} }} return
    meta l4proto tcp redirect to :{INBOUND_PLAINTEXT_PORT}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {mark} return
    oifname \"lo\" return
    meta l4proto tcp redirect to :{OUTBOUND_PORT}
  }}
}}
"
    )
}

/// Runs `nft -f -` with `script` inside `netns`. Blocking.
fn nft(netns: &NetNs, script: &str) -> std::io::Result<()> {
    let output = netns.run(|| {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("piped").write_all(script.as_bytes())?;
        child.wait_with_output()
    })??;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "nft in {}: {}",
            netns.path().display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Installs (or replaces) the capture rules. Blocking.
pub fn install(netns: &NetNs, mark: u32) -> std::io::Result<()> {
    nft(netns, &table(mark))
}

/// Removes the capture rules, if present. Blocking.
pub fn remove(netns: &NetNs) -> std::io::Result<()> {
    nft(netns, &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"))
}

/// Whether the capture rules are in place (for tests and the admin dump). Blocking.
pub fn installed(netns: &NetNs) -> bool {
    netns
        .run(|| {
            Command::new("nft")
                .args(["list", "table", "inet", TABLE])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .unwrap_or(false)
}
