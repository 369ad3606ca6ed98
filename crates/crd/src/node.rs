//! `SinewNode`: Sinew's record of a Node, named after it. The operator
//! creates one for every Node: the pod CIDRs it allocated from the cluster
//! pool, or the Node's own `spec.podCIDRs` when Kubernetes allocates. The
//! agent reads them, and publishes what other nodes need from it in the
//! status (its WireGuard public key, or its IPsec epoch and SPIs) once the
//! record exists.

// Several `printcolumn(...)` entries read to clippy as one attribute repeated.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The node's allocation.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sinew.io",
    version = "v1alpha1",
    doc = "Sinew's record of a Node: its pod CIDRs from the cluster pool, and conditions.",
    kind = "SinewNode",
    shortname = "sn",
    category = "sinew",
    derive = "PartialEq",
    status = "SinewNodeStatus",
    printcolumn(name = "PodCIDRs", type_ = "string", json_path = ".spec.podCIDRs"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SinewNodeSpec {
    /// One pod CIDR per family, IPv4 first. Set once: a node keeps its
    /// CIDRs until it is deleted.
    #[serde(default, rename = "podCIDRs")]
    #[schemars(schema_with = "pod_cidrs_schema")]
    pub pod_cidrs: Vec<String>,
}

fn pod_cidrs_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 2,
        "items": {"type": "string", "maxLength": 64, "pattern": r"^([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*)/[0-9]{1,3}$"},
        "x-kubernetes-list-type": "atomic",
        "x-kubernetes-validations": [{
            "rule": "size(oldSelf) == 0 || self == oldSelf",
            "message": "a node's pod CIDRs are set once; delete the SinewNode (or the Node) to release them"
        }]
    })
}

/// What the operator and the agent report about the node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SinewNodeStatus {
    /// The node's WireGuard public key (base64 of 32 bytes), published by
    /// its agent with `--encryption wireguard`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"))]
    pub wireguard_public_key: Option<String>,
    /// The epoch the node's outbound IPsec SAs were derived with,
    /// published by its agent with `--encryption ipsec`: peers derive the
    /// keys they receive with from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "ipsec_epoch_schema")]
    pub ipsec_epoch: Option<i64>,
    /// The cluster-key SPIs whose inbound SAs the node has installed: a
    /// peer sends with a key only once the node lists its SPI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "ipsec_spis_schema")]
    pub ipsec_spis: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub conditions: Vec<NodeCondition>,
}

/// Epochs are positive and below 2^63 (agents make them so; the API keeps
/// integers as int64). The maximum is stored as a float in a CRD, so the
/// int64 format is what holds the upper bound exactly.
fn ipsec_epoch_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "integer",
        "format": "int64",
        "minimum": 1,
        "maximum": i64::MAX,
        "nullable": true
    })
}

/// SPIs 1 to 255 are reserved (RFC 4303 §2.1); a handful are active at
/// once (the newest key, and older ones during a rotation's grace period).
fn ipsec_spis_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 64,
        "items": {"type": "integer", "format": "int64", "minimum": 256, "maximum": u32::MAX},
        "x-kubernetes-list-type": "atomic"
    })
}

/// A condition in the Kubernetes shape (`type`, `status`, `reason`,
/// `message`, `lastTransitionTime`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeCondition {
    /// `PodCIDRAllocated` (operator), `AgentReady` (agent).
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 64))]
    pub type_: String,
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    /// CamelCase reason (`Allocated`, `PoolExhausted`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(regex(pattern = r"^([A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?)?$"), length(max = 1024))]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 32768))]
    pub message: String,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
}

/// The condition type the operator sets.
pub const POD_CIDR_ALLOCATED: &str = "PodCIDRAllocated";
