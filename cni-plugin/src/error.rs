//! The errors the plugin reports to the runtime, each with its CNI code.
//! Codes 1-11 and 50 are the spec's; 100 and up are ours.

use serde::Serialize;

use crate::config::{CniVersion, ConfigError};
use crate::env::EnvError;
use crate::lock::LockError;

/// The codes, as in the CNI 1.1 error table (SPEC.md, "Error"); 100 and up
/// are ours (the spec leaves them to plugins).
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    /// "Invalid necessary environment variables, like CNI_COMMAND, CNI_CONTAINERID".
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    /// "Failed to decode content", e.g. a config that is not JSON.
    pub const DECODE: u32 = 6;
    /// "Invalid network config": a config that decodes but does not validate.
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const POOL_EXHAUSTED: u32 = 100;
    pub const DATAPATH: u32 = 101;
    pub const AGENT_REJECTED: u32 = 102;
    pub const CHECK_MISMATCH: u32 = 103;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{0}")]
    IncompatibleVersion(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{0}")]
    ContainerUnknown(String),
    #[error("{msg}")]
    Io {
        msg: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Decode(String),
    #[error("{msg}")]
    TryAgainLater { msg: String, details: String },
    #[error("{msg}")]
    NotAvailable { msg: String, details: String },
    #[error("{msg}")]
    PoolExhausted { msg: String, details: String },
    #[error("{msg}")]
    Datapath { msg: String, details: String },
    #[error("{msg}")]
    AgentRejected { msg: String, details: String },
    #[error("{0}")]
    CheckMismatch(String),
}

impl CniError {
    pub fn code(&self) -> u32 {
        use codes::*;
        match self {
            Self::IncompatibleVersion(_) => INCOMPATIBLE_VERSION,
            Self::Config(ConfigError::UnknownVersion(_) | ConfigError::NoSupportedVersion(_)) => INCOMPATIBLE_VERSION,
            Self::Config(ConfigError::Unsupported { .. }) => UNSUPPORTED_FIELD,
            Self::Config(ConfigError::Malformed(_)) => DECODE,
            Self::Config(_) => INVALID_CONFIG,
            Self::Env(_) => INVALID_ENV,
            Self::Lock(LockError::Timeout { .. }) => TRY_AGAIN_LATER,
            Self::Lock(_) => IO,
            Self::ContainerUnknown(_) => CONTAINER_UNKNOWN,
            Self::Io { .. } => IO,
            Self::Decode(_) => DECODE,
            Self::TryAgainLater { .. } => TRY_AGAIN_LATER,
            Self::NotAvailable { .. } => NOT_AVAILABLE,
            Self::PoolExhausted { .. } => POOL_EXHAUSTED,
            Self::Datapath { .. } => DATAPATH,
            Self::AgentRejected { .. } => AGENT_REJECTED,
            Self::CheckMismatch(_) => CHECK_MISMATCH,
        }
    }

    /// The lower-level cause, for the spec's "details" field.
    pub fn details(&self) -> String {
        match self {
            Self::Io { source, .. } => source.to_string(),
            Self::Lock(LockError::Dir { source, .. } | LockError::File { source, .. }) => source.to_string(),
            Self::TryAgainLater { details, .. }
            | Self::NotAvailable { details, .. }
            | Self::PoolExhausted { details, .. }
            | Self::Datapath { details, .. }
            | Self::AgentRejected { details, .. } => details.clone(),
            _ => String::new(),
        }
    }

    /// Maps an error status of an agent call. `op` names the call for the
    /// message, e.g. "AllocateIp".
    pub fn from_status(op: &str, status: &tonic::Status) -> Self {
        use tonic::Code;
        let details = format!("{op}: {:?}: {}", status.code(), status.message());
        match status.code() {
            Code::ResourceExhausted => Self::PoolExhausted {
                msg: format!(
                    "the node's pod address pool is exhausted ({}): delete unused pods or give the node a larger pod CIDR",
                    status.message()
                ),
                details,
            },
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Self::TryAgainLater {
                msg: format!(
                    "sinew-agent did not answer {op} ({}): check that it is running and healthy (`systemctl status sinew-agent`)",
                    status.message()
                ),
                details,
            },
            _ => Self::AgentRejected {
                msg: format!("sinew-agent refused {op}: {}: see the agent log for the cause", status.message()),
                details,
            },
        }
    }

    /// The agent's socket could not be reached.
    pub fn agent_unreachable(socket: &std::path::Path, cause: &dyn std::fmt::Display) -> Self {
        Self::TryAgainLater {
            msg: format!(
                "cannot reach sinew-agent at {}: start sinew-agent on this node (`systemctl start sinew-agent`) or fix \"agentSocket\" in the CNI config; the runtime will retry",
                socket.display()
            ),
            details: cause.to_string(),
        }
    }

    pub fn to_json(&self, version: CniVersion) -> serde_json::Value {
        serde_json::to_value(ErrorBody {
            cni_version: version.as_str(),
            code: self.code(),
            msg: self.to_string(),
            details: self.details(),
        })
        .expect("error body always serializes")
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    cni_version: &'a str,
    code: u32,
    msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CNI 1.1 SPEC.md error table: "6 | Failed to decode content. For
    /// example, failed to unmarshal network config from bytes"; "7 | Invalid
    /// network config. If some validations on network configs do not pass".
    #[test]
    fn config_errors_map_to_spec_codes() {
        assert_eq!(CniError::from(ConfigError::UnknownVersion("9.9.9".into())).code(), 1);
        assert_eq!(CniError::from(ConfigError::NoSupportedVersion("[]".into())).code(), 1);
        assert_eq!(CniError::from(ConfigError::Malformed("x".into())).code(), 6);
        assert_eq!(CniError::from(ConfigError::Missing("name")).code(), 7);
        assert_eq!(
            CniError::from(ConfigError::Unsupported {
                field: "ipam",
                reason: "r"
            })
            .code(),
            2
        );
        assert_eq!(
            CniError::from(ConfigError::Invalid {
                field: "mtu",
                value: "0".into(),
                reason: "r"
            })
            .code(),
            7
        );
    }

    /// CNI 1.1 SPEC.md error table: "4 | Invalid necessary environment
    /// variables, like CNI_COMMAND, CNI_CONTAINERID, etc."
    #[test]
    fn env_errors_are_code_4() {
        assert_eq!(CniError::from(EnvError::Missing("CNI_COMMAND")).code(), 4);
        assert_eq!(CniError::from(EnvError::UnknownCommand("X".into())).code(), 4);
        assert_eq!(
            CniError::from(EnvError::NotANetns {
                path: "/tmp/f".into(),
                reason: "r".into()
            })
            .code(),
            4
        );
    }

    #[test]
    fn grpc_statuses_map_to_codes() {
        assert_eq!(
            CniError::from_status("AllocateIp", &tonic::Status::resource_exhausted("full")).code(),
            100
        );
        assert_eq!(
            CniError::from_status("AllocateIp", &tonic::Status::unavailable("down")).code(),
            11
        );
        assert_eq!(
            CniError::from_status("AllocateIp", &tonic::Status::deadline_exceeded("slow")).code(),
            11
        );
        assert_eq!(
            CniError::from_status("CreateEndpoint", &tonic::Status::internal("boom")).code(),
            102
        );
    }

    #[test]
    fn json_body_has_spec_fields() {
        let e = CniError::from_status("AllocateIp", &tonic::Status::resource_exhausted("no free address"));
        let j = e.to_json(CniVersion::V1_0_0);
        assert_eq!(j["cniVersion"], "1.0.0");
        assert_eq!(j["code"], 100);
        assert!(j["msg"].as_str().unwrap().contains("no free address"));
        assert!(j["details"].as_str().unwrap().contains("ResourceExhausted"));
    }

    #[test]
    fn empty_details_are_omitted() {
        let j = CniError::Decode("bad".into()).to_json(CniVersion::V1_1_0);
        assert_eq!(j["code"], 6);
        assert!(j.get("details").is_none());
    }

    #[test]
    fn unreachable_agent_says_what_to_do() {
        let e = CniError::agent_unreachable(std::path::Path::new("/run/x.sock"), &"connection refused");
        assert_eq!(e.code(), 11);
        let msg = e.to_string();
        assert!(
            msg.contains("/run/x.sock") && msg.contains("start sinew-agent"),
            "{msg}"
        );
        assert_eq!(e.details(), "connection refused");
    }
}
