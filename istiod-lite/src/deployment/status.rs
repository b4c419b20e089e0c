//! A waypoint Gateway's status as the Gateway API defines it, with Istio's reasons and messages:
//! `Accepted` (are the Gateway and its parameters usable) and `Programmed` (does its Service have
//! an address), and `status.addresses` (the Service's ClusterIPs, then its hostname, as Istio
//! reports both for waypoints). A pure function of the Gateway, the Service we observed and the
//! problems met; `lastTransitionTime` moves only when a condition's status does, so an unchanged
//! state yields an unchanged status and no write.

use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::objects::Gateway;
use crate::objects::gateway::{GatewayAddress, GatewayStatus};
use crate::translate::waypoints::HBONE_PORT;

pub const ACCEPTED: &str = "Accepted";
pub const PROGRAMMED: &str = "Programmed";
/// Gateway API reasons (GatewayConditionReason).
pub const REASON_INVALID_PARAMETERS: &str = "InvalidParameters";
pub const REASON_INVALID: &str = "Invalid";
pub const REASON_ADDRESS_NOT_ASSIGNED: &str = "AddressNotAssigned";

/// Why a Gateway is not (fully) deployed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Its parametersRef is unusable: `Accepted=False`, nothing applied.
    InvalidParameters(String),
    /// An object of its name exists without our label; we leave it alone.
    Unmanaged {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    /// The API refused what we applied (a validation error: the overlay's, most likely).
    Rejected {
        kind: &'static str,
        namespace: String,
        name: String,
        message: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidParameters(message) => f.write_str(message),
            Self::Unmanaged { kind, namespace, name } => write!(
                f,
                "{kind} {namespace}/{name} exists and is not managed by istiod-lite; not taking it over"
            ),
            Self::Rejected {
                kind,
                namespace,
                name,
                message,
            } => write!(f, "{kind} {namespace}/{name} was refused: {message}"),
        }
    }
}

/// The hostname of the Gateway's Service, as Istio reports it.
pub fn hostname(gateway: &Gateway, domain_suffix: &str) -> String {
    format!(
        "{}.{}.svc.{domain_suffix}",
        gateway.metadata.name.as_deref().unwrap_or_default(),
        gateway.metadata.namespace.as_deref().unwrap_or_default()
    )
}

/// The Service's assigned cluster IPs (none while it has none, or if it is headless).
fn cluster_ips(service: &Service) -> Vec<String> {
    let Some(spec) = &service.spec else { return Vec::new() };
    let ips = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec.cluster_ip.iter().cloned().collect(),
    };
    ips.into_iter().filter(|ip| ip.parse::<IpAddr>().is_ok()).collect()
}

/// The status `gateway` should have: our conditions and addresses (other fields are not ours).
pub fn gateway_status(
    gateway: &Gateway,
    service: Option<&Service>,
    problems: &[Problem],
    domain_suffix: &str,
    now: &Time,
) -> GatewayStatus {
    let current = gateway.status.as_ref();
    let previous = current.map_or(&[][..], |s| &s.conditions[..]);
    let generation = gateway.metadata.generation;
    let hostname = hostname(gateway, domain_suffix);
    let ips = service.map(cluster_ips).unwrap_or_default();

    let invalid: Vec<String> = problems
        .iter()
        .filter(|p| matches!(p, Problem::InvalidParameters(_)))
        .map(ToString::to_string)
        .collect();
    let accepted = if invalid.is_empty() {
        (true, ACCEPTED, "Resource accepted".to_owned())
    } else {
        (false, REASON_INVALID_PARAMETERS, invalid.join("; "))
    };
    let programmed = if !problems.is_empty() {
        let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
        (false, REASON_INVALID, all.join("; "))
    } else if ips.is_empty() {
        let why = match service {
            Some(_) => format!("no cluster IP is assigned to Service {hostname} yet"),
            None => format!("Service {hostname} does not exist yet"),
        };
        (
            false,
            REASON_ADDRESS_NOT_ASSIGNED,
            format!("Failed to assign to any requested addresses: {why}"),
        )
    } else {
        let message = format!("Resource programmed, assigned to service(s) {hostname}:{HBONE_PORT}");
        (true, PROGRAMMED, message)
    };
    let conditions = [(ACCEPTED, accepted), (PROGRAMMED, programmed)]
        .into_iter()
        .map(|(kind, (ok, reason, message))| condition(previous, kind, ok, reason, message, generation, now))
        .collect();

    // Istio's rule: no address until there is one, and an address once reported is not withdrawn.
    let addresses = if ips.is_empty() {
        current.map(|s| s.addresses.clone()).unwrap_or_default()
    } else {
        let address = |kind: &str, value: String| GatewayAddress {
            kind: Some(kind.to_owned()),
            value,
        };
        ips.into_iter()
            .map(|ip| address("IPAddress", ip))
            .chain([address("Hostname", hostname)])
            .collect()
    };
    GatewayStatus { addresses, conditions }
}

/// A condition of type `kind`, keeping the previous `lastTransitionTime` if its status is the
/// same (the Kubernetes convention: the time says when the status last flipped).
pub fn condition(
    previous: &[Condition],
    kind: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Whether the Gateway's `current` status lacks any of `desired`'s conditions or addresses.
pub fn needs_write(current: Option<&GatewayStatus>, desired: &GatewayStatus) -> bool {
    let (conditions, addresses) = current.map_or((&[][..], &[][..]), |s| (&s.conditions[..], &s.addresses[..]));
    missing(conditions, &desired.conditions) || addresses != desired.addresses
}

/// Whether any of `desired` is not in `current` as it is (conditions of other types, written by
/// someone else, do not count).
pub fn missing(current: &[Condition], desired: &[Condition]) -> bool {
    desired.iter().any(|want| !current.contains(want))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    use super::*;

    const SUFFIX: &str = "cluster.local";

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    fn gateway(generation: i64, status: Option<GatewayStatus>) -> Gateway {
        let mut gateway: Gateway = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "demo", "generation": generation},
            "spec": {"gatewayClassName": "istio-waypoint"},
        }))
        .unwrap();
        gateway.status = status;
        gateway
    }

    fn service(ips: &[&str]) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "waypoint", "namespace": "demo"},
            "spec": {"clusterIP": ips.first(), "clusterIPs": ips},
        }))
        .unwrap()
    }

    fn get<'a>(status: &'a GatewayStatus, kind: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == kind).unwrap()
    }

    fn summary(condition: &Condition) -> (&str, &str, &str, Option<i64>) {
        let c = condition;
        (
            c.status.as_str(),
            c.reason.as_str(),
            c.message.as_str(),
            c.observed_generation,
        )
    }

    #[test]
    fn before_the_service_has_an_ip_the_gateway_is_accepted_but_not_programmed() {
        let status = gateway_status(&gateway(2, None), Some(&service(&[])), &[], SUFFIX, &at(100));
        assert_eq!(
            summary(get(&status, ACCEPTED)),
            ("True", "Accepted", "Resource accepted", Some(2))
        );
        assert_eq!(
            summary(get(&status, PROGRAMMED)),
            (
                "False",
                "AddressNotAssigned",
                "Failed to assign to any requested addresses: no cluster IP is assigned to Service waypoint.demo.svc.cluster.local yet",
                Some(2)
            )
        );
        assert_eq!(get(&status, PROGRAMMED).last_transition_time, at(100));
        assert!(status.addresses.is_empty());
        let missing = gateway_status(&gateway(2, None), None, &[], SUFFIX, &at(100));
        assert!(
            get(&missing, PROGRAMMED)
                .message
                .ends_with("Service waypoint.demo.svc.cluster.local does not exist yet")
        );
    }

    #[test]
    fn with_a_cluster_ip_it_is_programmed_and_reports_ip_then_hostname() {
        let status = gateway_status(
            &gateway(2, None),
            Some(&service(&["10.96.0.10", "fd00::10"])),
            &[],
            SUFFIX,
            &at(1),
        );
        assert_eq!(
            summary(get(&status, PROGRAMMED)),
            (
                "True",
                "Programmed",
                "Resource programmed, assigned to service(s) waypoint.demo.svc.cluster.local:15008",
                Some(2)
            )
        );
        let addresses: Vec<(Option<&str>, &str)> = status
            .addresses
            .iter()
            .map(|a| (a.kind.as_deref(), a.value.as_str()))
            .collect();
        assert_eq!(
            addresses,
            [
                (Some("IPAddress"), "10.96.0.10"),
                (Some("IPAddress"), "fd00::10"),
                (Some("Hostname"), "waypoint.demo.svc.cluster.local")
            ]
        );
        let headless = gateway_status(&gateway(2, None), Some(&service(&["None"])), &[], SUFFIX, &at(1));
        assert_eq!(get(&headless, PROGRAMMED).status, "False");
    }

    #[test]
    fn transition_times_move_only_when_a_status_flips_and_nothing_changed_means_no_write() {
        let pending = gateway_status(&gateway(1, None), Some(&service(&[])), &[], SUFFIX, &at(100));
        let assigned = gateway(1, Some(pending.clone()));
        let programmed = gateway_status(&assigned, Some(&service(&["10.96.0.10"])), &[], SUFFIX, &at(200));
        assert_eq!(
            get(&programmed, ACCEPTED).last_transition_time,
            at(100),
            "Accepted stayed True"
        );
        assert_eq!(
            get(&programmed, PROGRAMMED).last_transition_time,
            at(200),
            "Programmed flipped"
        );
        assert!(needs_write(assigned.status.as_ref(), &programmed));

        let settled = gateway(1, Some(programmed.clone()));
        let again = gateway_status(&settled, Some(&service(&["10.96.0.10"])), &[], SUFFIX, &at(300));
        assert_eq!(again, programmed);
        assert!(
            !needs_write(settled.status.as_ref(), &again),
            "no write when nothing changed"
        );

        // A new generation is observed (and written) without moving the transition times.
        let edited = gateway(2, Some(programmed.clone()));
        let observed = gateway_status(&edited, Some(&service(&["10.96.0.10"])), &[], SUFFIX, &at(400));
        assert_eq!(get(&observed, PROGRAMMED).observed_generation, Some(2));
        assert_eq!(get(&observed, PROGRAMMED).last_transition_time, at(200));
        assert!(needs_write(edited.status.as_ref(), &observed));
    }

    #[test]
    fn conditions_of_others_do_not_force_a_write() {
        let ours = gateway_status(&gateway(1, None), Some(&service(&["10.96.0.10"])), &[], SUFFIX, &at(1));
        let mut current = ours.clone();
        current
            .conditions
            .push(condition(&[], "Ready", true, "Ready", "other".into(), Some(1), &at(1)));
        assert!(!needs_write(Some(&current), &ours));
    }

    #[test]
    fn an_address_once_reported_is_not_withdrawn() {
        let programmed = gateway_status(&gateway(1, None), Some(&service(&["10.96.0.10"])), &[], SUFFIX, &at(1));
        let later = gateway_status(&gateway(1, Some(programmed.clone())), None, &[], SUFFIX, &at(2));
        assert_eq!(later.addresses, programmed.addresses);
        assert_eq!(get(&later, PROGRAMMED).status, "False");
    }

    #[test]
    fn an_unmanaged_object_keeps_the_gateway_unprogrammed_and_says_which() {
        let problems = [Problem::Unmanaged {
            kind: "Deployment",
            namespace: "demo".into(),
            name: "waypoint".into(),
        }];
        let status = gateway_status(
            &gateway(3, None),
            Some(&service(&["10.96.0.10"])),
            &problems,
            SUFFIX,
            &at(1),
        );
        assert_eq!(get(&status, ACCEPTED).status, "True");
        assert_eq!(
            summary(get(&status, PROGRAMMED)),
            (
                "False",
                "Invalid",
                "Deployment demo/waypoint exists and is not managed by istiod-lite; not taking it over",
                Some(3)
            )
        );
    }

    #[test]
    fn invalid_parameters_are_not_accepted() {
        let message = "parametersRef targeting ConfigMap demo/params, but it does not exist";
        let problems = [Problem::InvalidParameters(message.into())];
        let status = gateway_status(&gateway(1, None), None, &problems, SUFFIX, &at(1));
        assert_eq!(
            summary(get(&status, ACCEPTED)),
            ("False", "InvalidParameters", message, Some(1))
        );
        assert_eq!(
            summary(get(&status, PROGRAMMED)),
            ("False", "Invalid", message, Some(1))
        );
    }
}
