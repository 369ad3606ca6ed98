//! `SinewIdentity`: a cluster-wide security identity, named by its number.
//!
//! Agents create one with a deterministic name (the number) when they
//! meet a new label set; a create that conflicts is read back, so two
//! nodes never hold two numbers for one set. Only the operator deletes
//! them (GC, [`crate`] users: `sinew-operator`'s `identity_gc`).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The labels an identity stands for. Immutable: a number means one label
/// set for as long as it exists.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sinew.io",
    version = "v1alpha1",
    doc = "A cluster-wide security identity: a number (the name) for a set of security labels.",
    kind = "SinewIdentity",
    shortname = "sid",
    category = "sinew",
    derive = "PartialEq",
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self == oldSelf",
    "message": "an identity's labels are immutable; allocate a new identity instead"
}]))]
#[serde(rename_all = "camelCase")]
pub struct SinewIdentitySpec {
    /// The security-relevant labels (pod labels, `sinew.io/namespace`,
    /// `sinew.io/serviceaccount`, `sinew.io/ns.*`).
    #[serde(default)]
    #[schemars(schema_with = "crate::policy::label_map_schema")]
    pub security_labels: BTreeMap<String, String>,
}

/// The first number of pod identities; below are reserved ones.
pub const MIN_POD_IDENTITY: u32 = 256;
/// Pod identities stay below this (node-local CIDR identities start here).
pub const MAX_POD_IDENTITY: u32 = 0x00ff_ffff;

impl SinewIdentity {
    /// The identity number, from the name; `None` when the name is not one.
    pub fn number(&self) -> Option<u32> {
        self.metadata.name.as_deref().and_then(|n| n.parse().ok())
    }
}
