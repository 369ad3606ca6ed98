//! Sinew's custom resources, defined once as Rust types: the agent, the
//! operator and the policy crate share them, and the CRD manifests in
//! `deploy/crds/` are generated from them (`sinew-operator crds`; a test
//! fails when the checked-in copy is stale).
//!
//! The schemas carry the validation an API server can do before anything
//! is stored (patterns, ranges, enums, CEL rules across fields); the
//! consumers still validate everything they read, since the local backend
//! has no API server. This crate holds types and schemas only: no I/O, no
//! client.
#![forbid(unsafe_code)]

pub mod endpoint;
pub mod identity;
pub mod node;
pub mod policy;

pub use endpoint::{NamedPort, SinewEndpoint, SinewEndpointSpec, SinewEndpointStatus};
pub use identity::{SinewIdentity, SinewIdentitySpec};
pub use node::{NodeCondition, SinewNode, SinewNodeSpec, SinewNodeStatus};
pub use policy::{
    CidrSet, EgressRule, EndpointSelector, IcmpType, IngressRule, PortProtocol, PortRule, PortValue,
    SelectorRequirement, SinewClusterwideNetworkPolicy, SinewClusterwideNetworkPolicySpec, SinewNetworkPolicy,
    SinewNetworkPolicySpec,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Sinew resource.
pub const GROUP: &str = "sinew.io";
/// Their version.
pub const VERSION: &str = "v1alpha1";
/// `GROUP/VERSION`.
pub const API_VERSION: &str = "sinew.io/v1alpha1";

/// Every Sinew CRD, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        SinewNetworkPolicy::crd(),
        SinewClusterwideNetworkPolicy::crd(),
        SinewIdentity::crd(),
        SinewEndpoint::crd(),
        SinewNode::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, as checked in at
/// `deploy/crds/sinew.io.yaml` and printed by `sinew-operator crds`.
pub fn crds_yaml() -> String {
    let mut out = String::from("# Generated from crates/crd (sinew-crd) by `sinew-operator crds`; do not edit.\n");
    for crd in crds() {
        out.push_str("---\n");
        // A CRD built from our own types always serialises.
        out.push_str(&serde_yaml::to_string(&crd).unwrap_or_default());
    }
    out
}
