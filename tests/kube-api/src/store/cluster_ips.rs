//! Service cluster IPs, handed out in order from 10.96.0.0/12 as the API server's allocator does
//! for a cluster with that service CIDR.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

/// The first address handed out: 10.96.0.1.
const FIRST: u32 = 0x0a60_0001;
/// The last usable address of 10.96.0.0/12: 10.111.255.254.
const LAST: u32 = 0x0a6f_fffe;

/// The next address to try.
#[derive(Debug)]
pub struct ClusterIps {
    next: u32,
}

impl Default for ClusterIps {
    fn default() -> Self {
        ClusterIps { next: FIRST }
    }
}

impl ClusterIps {
    /// Sets `spec.clusterIP` and `spec.clusterIPs` of a new Service that has none (not for
    /// ExternalName Services, nor headless ones that ask for `None`), skipping addresses in use.
    pub fn allocate(&mut self, service: &mut Value, in_use: &HashSet<String>) {
        let spec = &mut service["spec"];
        if spec["type"] == "ExternalName" || spec["clusterIP"].as_str().is_some_and(|ip| !ip.is_empty()) {
            return;
        }
        for _ in FIRST..=LAST {
            let ip = Ipv4Addr::from(self.next).to_string();
            self.next = if self.next >= LAST { FIRST } else { self.next + 1 };
            if !in_use.contains(&ip) {
                spec["clusterIP"] = json!(ip);
                spec["clusterIPs"] = json!([ip]);
                return;
            }
        }
        panic!("every cluster IP of 10.96.0.0/12 is in use");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_wraps_around() {
        let mut ips = ClusterIps { next: LAST };
        let mut last = json!({"spec": {}});
        ips.allocate(&mut last, &HashSet::new());
        assert_eq!(last["spec"]["clusterIP"], "10.111.255.254");
        let mut first = json!({"spec": {}});
        ips.allocate(&mut first, &HashSet::from(["10.96.0.1".to_owned()]));
        assert_eq!(first["spec"]["clusterIPs"], json!(["10.96.0.2"]));
    }
}
