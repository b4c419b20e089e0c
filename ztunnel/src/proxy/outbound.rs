//! Outbound: where a workload's connection really goes (its original destination) decides how it
//! is carried: a service VIP picks a healthy endpoint (target port honoured); an HBONE workload is
//! reached over HBONE on 15008 with the source's identity, verifying the destination's; a known
//! non-mesh workload or an unknown address gets plain TCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderMap;
use mesh_core::hbone::{self, Pool, PoolKey};
use mesh_core::proto::workload::{TunnelProtocol, Workload, WorkloadStatus};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{Context, identity_of};
use crate::certificates::CertificateSource;
use crate::state::NetworkAddress;

/// Why an outbound connection could not be carried.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("source {0} is not a known workload")]
    UnknownSource(IpAddr),
    #[error("no healthy endpoint for service {service}:{port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("identity: {0}")]
    Identity(#[from] mesh_core::identity::SpiffeIdError),
    #[error("certificate: {0}")]
    Certificate(#[from] crate::certificates::CertificateError),
    #[error("{0}")]
    Hbone(Box<hbone::HboneError>),
    #[error("connect to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: std::io::Error,
    },
}

impl From<hbone::HboneError> for OutboundError {
    fn from(error: hbone::HboneError) -> Self {
        Self::Hbone(Box::new(error))
    }
}

/// Where a connection goes and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// HBONE to `gateway` (the destination's 15008) for `target`, expecting `workload`'s identity.
    Hbone {
        gateway: SocketAddr,
        target: SocketAddr,
        workload: String,
    },
    /// Plain TCP to `target` (a non-mesh workload, or an address nobody knows).
    Direct { target: SocketAddr },
}

/// Resolves and carries outbound connections.
#[derive(Debug)]
pub struct Outbound<S> {
    context: Arc<Context<S>>,
    pool: Pool,
    next_endpoint: AtomicUsize,
}

impl<S: CertificateSource> Outbound<S> {
    pub fn new(context: Arc<Context<S>>, pool: Pool) -> Self {
        Self {
            context,
            pool,
            next_endpoint: AtomicUsize::new(0),
        }
    }

    /// Where `destination` leads: service VIP → an endpoint; HBONE workload → its 15008; else direct.
    pub fn route(&self, destination: SocketAddr) -> Result<Route, OutboundError> {
        let state = self.context.state.read().expect("not poisoned");
        let address = NetworkAddress {
            network: self.context.network.clone(),
            ip: destination.ip(),
        };
        let (workload, target) = if let Some(service) = state.service_by_vip(&address) {
            let port = u32::from(destination.port());
            let candidates: Vec<(&Arc<Workload>, u32)> = state
                .endpoints(service)
                .filter(|(w, _)| w.status == WorkloadStatus::Healthy as i32 && !w.addresses.is_empty())
                .filter_map(|(w, ports)| {
                    let target = ports
                        .ports
                        .iter()
                        .find(|p| p.service_port == port)
                        .map(|p| if p.target_port == 0 { port } else { p.target_port })?;
                    Some((w, target))
                })
                .collect();
            if candidates.is_empty() {
                return Err(OutboundError::NoHealthyEndpoint {
                    service: service.hostname.clone(),
                    port: destination.port(),
                });
            }
            // Spread load: round robin over the healthy endpoints.
            let (workload, target_port) =
                candidates[self.next_endpoint.fetch_add(1, Ordering::Relaxed) % candidates.len()];
            let ip = crate::state::ip_from_bytes(&workload.addresses[0]).expect("validated on insert");
            (
                Some(workload.clone()),
                SocketAddr::new(ip, u16::try_from(target_port).unwrap_or(destination.port())),
            )
        } else {
            (state.workload_by_ip(&address).cloned(), destination)
        };
        Ok(match workload {
            Some(workload) if workload.tunnel_protocol == TunnelProtocol::Hbone as i32 => Route::Hbone {
                gateway: SocketAddr::new(target.ip(), hbone::PORT),
                target,
                workload: workload.uid.clone(),
            },
            _ => Route::Direct { target },
        })
    }

    /// Carries one connection from the workload at `source` to `destination`.
    pub async fn proxy<C>(
        &self,
        mut client: C,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<(u64, u64), OutboundError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let source_workload = self
            .context
            .workload_at(source.ip())
            .ok_or(OutboundError::UnknownSource(source.ip()))?;
        let route = self
            .route(destination)
            .inspect_err(|error| warn!(%source, %destination, %error, "connection refused"))?;
        info!(%source, %destination, ?route, "outbound");
        match route {
            Route::Direct { target } => {
                let mut upstream = TcpStream::connect(target)
                    .await
                    .map_err(|source| OutboundError::Connect {
                        address: target,
                        source,
                    })?;
                let _ = upstream.set_nodelay(true);
                Ok(tokio::io::copy_bidirectional(&mut client, &mut upstream)
                    .await
                    .unwrap_or_default())
            }
            Route::Hbone {
                gateway,
                target,
                workload,
            } => {
                let destination_identity = {
                    let state = self.context.state.read().expect("not poisoned");
                    let workload = state
                        .workload(&workload)
                        .cloned()
                        .ok_or_else(|| OutboundError::UnknownSource(target.ip()))?;
                    identity_of(&workload)?
                };
                let source_identity = identity_of(&source_workload)?;
                let certificate = self.context.certificates.get(&source_identity).await?;
                let key = PoolKey {
                    source: source_identity,
                    destination: destination_identity,
                    address: gateway,
                };
                let mut headers = HeaderMap::new();
                if let Ok(forwarded) = format!("for={}", source.ip()).parse() {
                    headers.insert("forwarded", forwarded);
                }
                let mut tunnel = self.pool.connect(&key, &certificate, target, headers).await?;
                Ok(tokio::io::copy_bidirectional(&mut client, &mut tunnel)
                    .await
                    .unwrap_or_default())
            }
        }
    }
}
