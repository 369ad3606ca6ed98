//! Services: from the snapshot's Services and EndpointSlices, the
//! frontends this node load-balances and their backends ([`desired`] and
//! [`compile`], both pure), and [`ServiceState`] ([`apply`]), which writes
//! the difference into the datapath in an order that never shows a service
//! pointing at a missing backend: backends first, then Maglev entries and
//! slots, then the service entries, then removals in the reverse order.
//! [`api`] answers `sinew service list`. None of them knows the node
//! state: each takes what it reads as arguments.

pub mod api;
pub mod apply;
pub mod compile;
pub mod desired;
#[cfg(test)]
mod fixtures;
pub mod maglev;

use std::net::Ipv4Addr;

use sinew_abi::LbSvcKey;
use sinew_model::{LbAlgorithm, Protocol, ServiceType};

pub use apply::ServiceState;
pub use compile::{compile, Compiled, Ids};
pub use desired::desired;

/// Node-wide service settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub local_node: String,
    /// This node's address: the address of its node ports.
    pub node_ip: Ipv4Addr,
    /// For services without the `service.sinew.io/lb-algorithm` annotation.
    pub default_algorithm: LbAlgorithm,
    pub maglev_table_size: u32,
}

/// An address, port and protocol that connections are made to, and
/// whether the sockets of this node (internal) or packets arriving from
/// outside (external: node ports, at the uplink) are load-balanced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
    pub external: bool,
}

impl Frontend {
    pub fn key(&self) -> LbSvcKey {
        LbSvcKey {
            vip: u32::from_ne_bytes(self.addr.octets()),
            port: self.port.to_be(),
            proto: self.proto.number(),
            scope: if self.external {
                sinew_abi::LB_SCOPE_EXTERNAL
            } else {
                sinew_abi::LB_SCOPE_INTERNAL
            },
        }
    }

    pub(crate) fn from_key(k: &LbSvcKey) -> Option<Self> {
        let proto = match k.proto {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            _ => return None,
        };
        let external = match k.scope {
            sinew_abi::LB_SCOPE_INTERNAL => false,
            sinew_abi::LB_SCOPE_EXTERNAL => true,
            _ => return None,
        };
        Some(Frontend {
            addr: Ipv4Addr::from(k.vip.to_ne_bytes()),
            port: u16::from_be(k.port),
            proto,
            external,
        })
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto.name())
    }
}

/// An endpoint's condition, as `sinew service list` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Ready,
    /// Terminating but still serving: used only when nothing is ready.
    ServingTerminating,
    /// Terminating and not serving, or simply not ready: never used.
    NotServing,
}

impl BackendState {
    pub fn name(self) -> &'static str {
        match self {
            BackendState::Ready => "ready",
            BackendState::ServingTerminating => "terminating",
            BackendState::NotServing => "not-serving",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub state: BackendState,
    pub node: Option<String>,
    /// Takes new connections (ready, or serving-terminating when nothing
    /// is ready; on this node only under internalTrafficPolicy Local).
    pub usable: bool,
}

/// One frontend of one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub port_name: Option<String>,
    pub service_type: ServiceType,
    /// Which address of the service: ClusterIP, ExternalIP, LoadBalancer,
    /// NodePort (this node's, for packets from outside) or NodeIP (any
    /// node's address and a node port, for sockets inside the cluster).
    pub address_kind: &'static str,
    pub frontend: Frontend,
    pub algorithm: LbAlgorithm,
    pub affinity_timeout: Option<u32>,
    pub local_only: bool,
    /// Every endpoint of the port (usable or not), by address and port.
    pub backends: Vec<Backend>,
}

impl Service {
    pub fn usable(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter().filter(|b| b.usable)
    }
}
