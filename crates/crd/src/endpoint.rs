//! `SinewEndpoint`: what a node publishes about one of its pods, so that
//! every node's ipcache knows every pod's address and identity.
//!
//! The facts are the `status` the owning node's agent reports (as in the
//! local backend's files); the spec is empty and reserved.

// Several `printcolumn(...)` entries read to clippy as one attribute repeated.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Reserved; the endpoint's facts are its status.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sinew.io",
    version = "v1alpha1",
    doc = "An endpoint (pod) as its node publishes it: address, identity and named ports.",
    kind = "SinewEndpoint",
    shortname = "sep",
    category = "sinew",
    namespaced,
    derive = "PartialEq",
    status = "SinewEndpointStatus",
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(name = "IPv4", type_ = "string", json_path = ".status.ipv4"),
    printcolumn(name = "Identity", type_ = "integer", json_path = ".status.identity")
)]
#[serde(deny_unknown_fields)]
pub struct SinewEndpointSpec {}

/// The endpoint as its node publishes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SinewEndpointStatus {
    /// The node the pod runs on.
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
    /// The pod's address.
    #[schemars(regex(pattern = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$"))]
    pub ipv4: String,
    /// The pod's identity number.
    #[schemars(range(min = 1, max = 16777215))]
    pub identity: u32,
    /// The pod's container ports by name, for policies that name ports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub named_ports: BTreeMap<String, NamedPort>,
}

/// One named container port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedPort {
    /// TCP (the default), UDP or SCTP.
    #[serde(default = "tcp")]
    #[schemars(extend("enum" = ["TCP", "UDP", "SCTP"]))]
    pub protocol: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

fn tcp() -> String {
    "TCP".into()
}
