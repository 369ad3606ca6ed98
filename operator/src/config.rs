//! The operator's settings: flags (and their environment variables),
//! parsed into typed values and validated once.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::ipam::{check_pools, Pool, PoolError};

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// IPv4 pool that node pod CIDRs are carved from.
    #[arg(long, env = "SINEW_POOL_V4", default_value = "10.244.0.0/16")]
    pub pool_v4: Option<IpNet>,
    /// Prefix length of each node's IPv4 block.
    #[arg(long, env = "SINEW_NODE_PREFIX_V4", default_value_t = 24)]
    pub node_prefix_v4: u8,
    /// IPv6 pool (dual stack), none by default.
    #[arg(long, env = "SINEW_POOL_V6")]
    pub pool_v6: Option<IpNet>,
    #[arg(long, env = "SINEW_NODE_PREFIX_V6", default_value_t = 64)]
    pub node_prefix_v6: u8,
    /// How long an identity must be unreferenced (and exist) before GC
    /// deletes it, in seconds.
    #[arg(long, env = "SINEW_IDENTITY_GC_GRACE", default_value_t = 900)]
    pub identity_gc_grace_secs: u64,
    /// How often identity GC runs, in seconds.
    #[arg(long, env = "SINEW_IDENTITY_GC_INTERVAL", default_value_t = 60)]
    pub identity_gc_interval_secs: u64,
    /// Namespace and name of the leader election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,
    #[arg(long, default_value = "sinew-operator")]
    pub lease_name: String,
    /// This candidate's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "sinew-operator")]
    pub identity: String,
    #[arg(long, default_value_t = 15)]
    pub lease_duration_secs: u64,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SINEW_OPERATOR_METRICS", default_value = "0.0.0.0:9963")]
    pub metrics_addr: SocketAddr,
}

/// Settings that passed validation.
#[derive(Clone, Debug)]
pub struct Config {
    pub pools: Vec<Pool>,
    pub gc_grace: Duration,
    pub gc_interval: Duration,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub metrics_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("--pool-v4 {0} is not an IPv4 prefix; pass e.g. --pool-v4 10.244.0.0/16")]
    NotV4(IpNet),
    #[error("--pool-v6 {0} is not an IPv6 prefix; pass e.g. --pool-v6 fd00:10:244::/56")]
    NotV6(IpNet),
    #[error("no pool: pass --pool-v4 or --pool-v6")]
    NoPool,
    #[error("--{name} {value}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl RunArgs {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let mut pools = Vec::new();
        if let Some(p) = self.pool_v4 {
            if !matches!(p, IpNet::V4(_)) {
                return Err(ConfigError::NotV4(p));
            }
            pools.push(Pool::new(p, self.node_prefix_v4)?);
        }
        if let Some(p) = self.pool_v6 {
            if !matches!(p, IpNet::V6(_)) {
                return Err(ConfigError::NotV6(p));
            }
            pools.push(Pool::new(p, self.node_prefix_v6)?);
        }
        if pools.is_empty() {
            return Err(ConfigError::NoPool);
        }
        check_pools(&pools)?;
        if self.lease_duration_secs < 2 {
            return Err(ConfigError::Invalid {
                name: "lease-duration-secs",
                value: self.lease_duration_secs.to_string(),
                reason: "must be at least 2 (renewal runs every third of it)",
            });
        }
        if self.identity_gc_interval_secs == 0 {
            return Err(ConfigError::Invalid {
                name: "identity-gc-interval-secs",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        Ok(Config {
            pools,
            gc_grace: Duration::from_secs(self.identity_gc_grace_secs),
            gc_interval: Duration::from_secs(self.identity_gc_interval_secs),
            lease_namespace: self.lease_namespace.clone(),
            lease_name: self.lease_name.clone(),
            identity: self.identity.clone(),
            lease_duration: Duration::from_secs(self.lease_duration_secs),
            metrics_addr: self.metrics_addr,
        })
    }
}
