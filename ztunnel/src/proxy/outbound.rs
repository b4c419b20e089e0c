//! Outbound: where a workload's connection really goes (its original destination) decides how it
//! is carried:
//! - a destination bound to a waypoint (the service, or the workload reached directly) goes over
//!   HBONE to the waypoint, with `:authority` the original VIP:port;
//! - a service VIP picks a healthy endpoint (target port honoured, round robin);
//! - an HBONE workload is reached over HBONE on its 15008 with the source's identity, verifying
//!   the destination's;
//! - a known non-mesh workload or an unknown address gets plain TCP (passthrough).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderMap;
use mesh_core::hbone::{self, H2Stream, HboneError, Pool, PoolKey};
use mesh_core::proto::workload::{GatewayAddress, Service, TunnelProtocol, Workload, WorkloadStatus, gateway_address};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::connection::{Accounting, Description, Endpoint};
use super::copy::{Transferred, copy_bidirectional};
use super::metrics::{Reporter, ResponseFlags, SecurityPolicy};
use super::{Context, identity_of};
use mesh_core::certificates::CertificateSource;
use mesh_core::state::{NetworkAddress, State, ip_from_bytes, service_key};

/// Why an outbound connection could not be carried.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("source {0} is not a workload on this node")]
    UnknownSource(IpAddr),
    #[error("{destination} is one of ztunnel's own ports on the source itself")]
    SelfCall { destination: SocketAddr },
    #[error("no healthy endpoint for service {service}:{port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("waypoint {waypoint} of {destination} has no healthy endpoint")]
    NoWaypoint { waypoint: String, destination: String },
    #[error("identity: {0}")]
    Identity(#[from] mesh_core::identity::SpiffeIdError),
    #[error("certificate: {0}")]
    Certificate(#[from] mesh_core::certificates::CertificateError),
    #[error("{0}")]
    Hbone(Box<HboneError>),
    #[error("connect to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: std::io::Error,
    },
}

impl From<HboneError> for OutboundError {
    fn from(error: HboneError) -> Self {
        Self::Hbone(Box::new(error))
    }
}

/// Where a connection goes and how.
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// HBONE to `gateway` (a 15008: the destination's, or its waypoint's) for `target`, expecting
    /// the identity of `workload` (the one behind `gateway`).
    Hbone {
        gateway: SocketAddr,
        target: SocketAddr,
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
    },
    /// Plain TCP to `target` (a non-mesh workload, or an address nobody knows).
    Direct {
        target: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
}

/// Resolves and carries outbound connections.
#[derive(Debug)]
pub struct Outbound<S> {
    context: Arc<Context<S>>,
    pool: Pool,
    next_endpoint: AtomicUsize,
}

fn healthy(workload: &Workload) -> bool {
    workload.status == WorkloadStatus::Healthy as i32 && !workload.addresses.is_empty()
}

fn first_ip(workload: &Workload) -> IpAddr {
    ip_from_bytes(&workload.addresses[0]).expect("validated on insert")
}

impl<S: CertificateSource> Outbound<S> {
    pub fn new(context: Arc<Context<S>>, pool: Pool) -> Self {
        Self {
            context,
            pool,
            next_endpoint: AtomicUsize::new(0),
        }
    }

    fn pick<T: Clone>(&self, candidates: &[T]) -> T {
        candidates[self.next_endpoint.fetch_add(1, Ordering::Relaxed) % candidates.len()].clone()
    }

    /// Where a connection from `source` to `destination` leads.
    pub fn route(&self, source: &Workload, destination: SocketAddr) -> Result<Route, OutboundError> {
        let state = self.context.state.read().expect("not poisoned");
        let address = NetworkAddress {
            network: self.context.network.clone(),
            ip: destination.ip(),
        };
        if let Some(service) = state.service_by_vip(&address) {
            if let Some(route) =
                self.via_waypoint(&state, source, service.waypoint.as_ref(), destination, Some(service))?
            {
                return Ok(route);
            }
            let candidates = state.healthy_endpoints(service, destination.port());
            if candidates.is_empty() {
                return Err(OutboundError::NoHealthyEndpoint {
                    service: service.hostname.clone(),
                    port: destination.port(),
                });
            }
            let (workload, target) = self.pick(&candidates);
            return Ok(direct_or_hbone(workload, target, Some(service.clone())));
        }
        match state.workload_by_ip(&address) {
            Some(workload) => {
                let waypoint = workload.waypoint.as_ref();
                if let Some(route) = self.via_waypoint(&state, source, waypoint, destination, None)? {
                    return Ok(route);
                }
                Ok(direct_or_hbone(workload.clone(), destination, None))
            }
            None => Ok(Route::Direct {
                target: destination,
                workload: None,
                service: None,
            }),
        }
    }

    /// HBONE to a healthy instance of `waypoint`, unless there is none or the source is that
    /// waypoint itself (its own traffic to the destination must not loop back to it).
    fn via_waypoint(
        &self,
        state: &State,
        source: &Workload,
        waypoint: Option<&GatewayAddress>,
        destination: SocketAddr,
        service: Option<&Arc<Service>>,
    ) -> Result<Option<Route>, OutboundError> {
        let Some(waypoint) = waypoint else {
            return Ok(None);
        };
        let port = u16::try_from(waypoint.hbone_mtls_port)
            .ok()
            .filter(|p| *p != 0)
            .unwrap_or(hbone::PORT);
        let (name, waypoint_service, instance) = match &waypoint.destination {
            Some(gateway_address::Destination::Hostname(host)) => {
                let key = format!("{}/{}", host.namespace, host.hostname);
                (key.clone(), state.service(&key).cloned(), None)
            }
            Some(gateway_address::Destination::Address(address)) => {
                let Some(ip) = ip_from_bytes(&address.address) else {
                    return Ok(None);
                };
                let at = NetworkAddress {
                    network: address.network.clone(),
                    ip,
                };
                let service = state.service_by_vip(&at).cloned();
                let instance = service.is_none().then(|| state.workload_by_ip(&at).cloned()).flatten();
                (ip.to_string(), service, instance)
            }
            None => return Ok(None),
        };
        if let Some(service) = &waypoint_service
            && source.services.contains_key(&service_key(service))
        {
            return Ok(None);
        }
        let instances: Vec<Arc<Workload>> = match (&waypoint_service, instance) {
            (Some(service), _) => state
                .endpoints(service)
                .map(|(w, _)| w.clone())
                .filter(|w| healthy(w))
                .collect(),
            (None, Some(workload)) => vec![workload].into_iter().filter(|w| healthy(w)).collect(),
            (None, None) => Vec::new(),
        };
        let instances: Vec<Arc<Workload>> = instances.into_iter().filter(|w| w.uid != source.uid).collect();
        if instances.is_empty() {
            return Err(OutboundError::NoWaypoint {
                waypoint: name,
                destination: destination.to_string(),
            });
        }
        let instance = self.pick(&instances);
        Ok(Some(Route::Hbone {
            gateway: SocketAddr::new(first_ip(&instance), port),
            target: destination,
            workload: instance,
            service: service.cloned(),
        }))
    }

    /// Carries one connection from the workload at `source` to `destination`.
    pub async fn proxy<C>(
        &self,
        client: C,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<Transferred, OutboundError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        Ok(self.open(source, destination).await?.carry(client).await)
    }

    /// Resolves `destination` and opens the next hop (counted and logged when refused).
    pub async fn open(&self, source: SocketAddr, destination: SocketAddr) -> Result<Opened, OutboundError> {
        // Only this node's workloads are carried: ztunnel never relays for anyone else.
        let source_workload = self
            .context
            .local_workload_at(source.ip())
            .ok_or(OutboundError::UnknownSource(source.ip()))?;
        let own_address = destination.ip().is_loopback()
            || source_workload
                .addresses
                .iter()
                .any(|a| ip_from_bytes(a) == Some(destination.ip()));
        if own_address && super::inbound::ZTUNNEL_PORTS.contains(&destination.port()) {
            let error = OutboundError::SelfCall { destination };
            warn!(%source, %destination, %error, "connection refused");
            return Err(error);
        }
        let route = self
            .route(&source_workload, destination)
            .inspect_err(|error| warn!(%source, %destination, %error, "connection refused"))?;
        debug!(%source, %destination, ?route, "outbound");
        let source_identity = identity_of(&source_workload)?;
        let (target, workload, service, secure) = match &route {
            Route::Hbone {
                target,
                workload,
                service,
                ..
            } => (*target, Some(workload.clone()), service.clone(), true),
            Route::Direct {
                target,
                workload,
                service,
            } => (*target, workload.clone(), service.clone(), false),
        };
        let description = Description {
            reporter: Reporter::source,
            source: Endpoint {
                address: source,
                workload: Some(source_workload.clone()),
                identity: Some(source_identity.clone()),
            },
            destination: Endpoint {
                address: target,
                identity: workload.as_deref().filter(|_| secure).and_then(|w| identity_of(w).ok()),
                workload,
            },
            service,
            security: if secure {
                SecurityPolicy::MutualTls
            } else {
                SecurityPolicy::Unknown
            },
        };
        let metrics = &self.context.metrics;
        let refuse = |description: Description, error: OutboundError| {
            let flags = match &error {
                OutboundError::Hbone(e) if matches!(**e, HboneError::Status { status, .. } if status == http::StatusCode::UNAUTHORIZED) => {
                    ResponseFlags::Denied
                }
                _ => ResponseFlags::ConnectFailure,
            };
            description.refused(metrics, flags, &error.to_string());
            error
        };
        let upstream = match route {
            Route::Direct { target, .. } => {
                match mesh_core::net::connect(&*self.context.sockets, target, Some(source.ip())).await {
                    Ok(upstream) => Upstream::Tcp(upstream),
                    Err(source) => {
                        return Err(refuse(
                            description,
                            OutboundError::Connect {
                                address: target,
                                source,
                            },
                        ));
                    }
                }
            }
            Route::Hbone {
                gateway,
                target,
                workload,
                ..
            } => {
                let tunnel = async {
                    let certificate = self.context.certificates.get(&source_identity).await?;
                    let key = PoolKey {
                        source: source_identity.clone(),
                        destination: identity_of(&workload)?,
                        address: gateway,
                        source_address: Some(source.ip()),
                    };
                    let mut headers = HeaderMap::new();
                    if let Ok(forwarded) = format!("for={}", source.ip()).parse() {
                        headers.insert("forwarded", forwarded);
                    }
                    Ok::<_, OutboundError>(self.pool.connect(&key, &certificate, target, headers).await?)
                };
                // Boxed: the handshake's state is large and only needed until the stream opens.
                match Box::pin(tunnel).await {
                    Ok(tunnel) => Upstream::Hbone(tunnel),
                    Err(error) => return Err(refuse(description, error)),
                }
            }
        };
        Ok(Opened {
            accounting: description.open(metrics, self.context.in_flight.token()),
            upstream,
        })
    }
}

/// The next hop of an outbound connection.
#[derive(Debug)]
enum Upstream {
    Tcp(TcpStream),
    Hbone(H2Stream),
}

/// A connection whose next hop is open and counted. [`Opened::carry`] moves its bytes; spawned
/// on its own, it is all an idle connection holds.
#[derive(Debug)]
pub struct Opened {
    accounting: Accounting,
    upstream: Upstream,
}

impl Opened {
    /// Copies between the client and the next hop until both are done, then logs the connection.
    pub async fn carry<C: AsyncRead + AsyncWrite + Unpin>(self, mut client: C) -> Transferred {
        let Self { accounting, upstream } = self;
        let (received, sent) = (&accounting.received, &accounting.sent);
        let outcome = match upstream {
            Upstream::Tcp(mut next) => copy_bidirectional(&mut client, &mut next, received, sent).await,
            Upstream::Hbone(mut next) => copy_bidirectional(&mut client, &mut next, received, sent).await,
        }
        .map_err(|e| e.to_string());
        accounting.close(outcome.clone());
        outcome.unwrap_or_default()
    }
}

/// HBONE when the workload speaks it, else plain TCP.
fn direct_or_hbone(workload: Arc<Workload>, target: SocketAddr, service: Option<Arc<Service>>) -> Route {
    if workload.tunnel_protocol == TunnelProtocol::Hbone as i32 {
        Route::Hbone {
            gateway: SocketAddr::new(target.ip(), hbone::PORT),
            target,
            workload,
            service,
        }
    } else {
        Route::Direct {
            target,
            workload: Some(workload),
            service,
        }
    }
}
