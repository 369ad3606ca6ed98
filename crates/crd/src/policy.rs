//! `SinewNetworkPolicy` (namespaced) and `SinewClusterwideNetworkPolicy`
//! (cluster-scoped): one spec, two scopes.
//!
//! The field names and serde attributes are the ones `sinew-policy`
//! parses (it deserialises these very types), so the schema the API
//! server enforces and the parser the agent runs cannot drift apart. The
//! schema rejects what it can say statically (names, ranges, enums, the
//! fields a rule may combine); `sinew-policy` keeps the full validation,
//! with messages that name the field and say what to write.

use std::collections::BTreeMap;
use std::fmt;

use kube::CustomResource;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// CEL rules on the spec that span fields.
const NO_L7_IN_DENY: &str = "(!has(self.ingressDeny) || self.ingressDeny.all(r, !has(r.toPorts) || r.toPorts.all(p, !has(p.rules)))) && (!has(self.egressDeny) || self.egressDeny.all(r, !has(r.toPorts) || r.toPorts.all(p, !has(p.rules))))";

macro_rules! policy_spec {
    ($(#[$doc:meta])* $spec:ident, $kind:literal, $short:literal, $rootdoc:literal $(, $scope:ident)?) => {
        $(#[$doc])*
        #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[kube(
            group = "sinew.io",
            version = "v1alpha1",
            kind = $kind,
            doc = $rootdoc,
            shortname = $short,
            category = "sinew",
            derive = "PartialEq",
            printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
            $(, $scope)?
        )]
        #[schemars(extend("x-kubernetes-validations" = [{
            "rule": NO_L7_IN_DENY,
            "message": "L7 rules (toPorts[].rules) cannot deny: deny sections are L3/L4; allow the requests you want in ingress or egress instead"
        }]))]
        #[serde(deny_unknown_fields, rename_all = "camelCase")]
        pub struct $spec {
            /// The endpoints the policy applies to, by their identity labels
            /// (in a namespaced policy, only its namespace's endpoints).
            pub endpoint_selector: EndpointSelector,
            /// Allowed incoming traffic. Present (even empty): incoming
            /// traffic not allowed here is dropped.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(max = 128))]
            pub ingress: Option<Vec<IngressRule>>,
            /// Allowed outgoing traffic. Present (even empty): outgoing
            /// traffic not allowed here is dropped.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(max = 128))]
            pub egress: Option<Vec<EgressRule>>,
            /// Denied incoming traffic; a deny wins over every allow.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(max = 128))]
            pub ingress_deny: Option<Vec<IngressRule>>,
            /// Denied outgoing traffic; a deny wins over every allow.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(max = 128))]
            pub egress_deny: Option<Vec<EgressRule>>,
        }
    };
}

policy_spec!(
    /// A Sinew network policy of one namespace.
    SinewNetworkPolicySpec,
    "SinewNetworkPolicy",
    "snp",
    "Identity-based L3/L4 and L7 policy for the endpoints of one namespace.",
    namespaced
);
policy_spec!(
    /// A Sinew network policy for the whole cluster.
    SinewClusterwideNetworkPolicySpec,
    "SinewClusterwideNetworkPolicy",
    "scnp",
    "Identity-based L3/L4 and L7 policy for endpoints of every namespace."
);

impl From<SinewClusterwideNetworkPolicySpec> for SinewNetworkPolicySpec {
    fn from(s: SinewClusterwideNetworkPolicySpec) -> Self {
        SinewNetworkPolicySpec {
            endpoint_selector: s.endpoint_selector,
            ingress: s.ingress,
            egress: s.egress,
            ingress_deny: s.ingress_deny,
            egress_deny: s.egress_deny,
        }
    }
}

/// A label selector that rejects unknown fields: a misspelt `matchLabel`
/// would otherwise select everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "label_map_schema")]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub match_expressions: Option<Vec<SelectorRequirement>>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)",
    "message": "In and NotIn need values; Exists and DoesNotExist take none"
}]))]
#[serde(deny_unknown_fields)]
pub struct SelectorRequirement {
    #[schemars(schema_with = "label_key_schema")]
    pub key: String,
    #[schemars(extend("enum" = ["In", "NotIn", "Exists", "DoesNotExist"]))]
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(max = 63)))]
    pub values: Option<Vec<String>>,
}

/// Peers a rule names: at least one peer field, else any peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressRule {
    /// Endpoints by identity labels; in a namespaced policy, of its own
    /// namespace unless the selector names `sinew.io/namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub from_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "entities_schema")]
    pub from_entities: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDR", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "cidr_list_schema")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDRSet", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub from_cidr_set: Option<Vec<CidrSet>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub to_ports: Option<Vec<PortRule>>,
}

/// Peers an egress rule names: at least one peer field, else any peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub to_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "entities_schema")]
    pub to_entities: Option<Vec<String>>,
    #[serde(default, rename = "toCIDR", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "cidr_list_schema")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub to_cidr_set: Option<Vec<CidrSet>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub to_ports: Option<Vec<PortRule>>,
}

/// A CIDR with holes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CidrSet {
    #[schemars(schema_with = "cidr_schema")]
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "cidr_list_schema")]
    pub except: Option<Vec<String>>,
}

/// Ports (and ICMP types) of a rule, optionally with L7 rules for them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.rules) || (has(self.ports) && size(self.ports) > 0)",
        "message": "L7 rules need the TCP ports they apply to; list them in ports"
    },
    {
        "rule": "!has(self.rules) || !has(self.icmps) || size(self.icmps) == 0",
        "message": "L7 rules apply to TCP ports only; put ICMP types in their own toPorts entry"
    },
    {
        "rule": "!has(self.rules) || !has(self.ports) || self.ports.all(p, has(p.port) && !has(p.endPort) && (!has(p.protocol) || p.protocol in ['TCP', 'ANY']))",
        "message": "L7 rules apply to single TCP ports: give each port a number or name, no endPort, protocol TCP"
    }
]))]
#[serde(deny_unknown_fields)]
pub struct PortRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub ports: Option<Vec<PortProtocol>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub icmps: Option<Vec<IcmpType>>,
    /// HTTP and gRPC requests allowed on these ports (allow sections only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<sinew_l7::L7Rules>,
}

/// A port or range, with its protocol.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.endPort) || has(self.port)",
    "message": "endPort requires a numeric port"
}]))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortProtocol {
    /// A number (1-65535, also as a string) or a named container port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortValue>,
    /// The last port of a range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i64>,
    /// TCP, UDP, SCTP, ICMP or ANY (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["TCP", "UDP", "SCTP", "ICMP", "ANY"]))]
    pub protocol: Option<String>,
}

/// One ICMP type (ICMP and ICMPv6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IcmpType {
    #[serde(rename = "type")]
    #[schemars(range(min = 0, max = 255))]
    pub icmp_type: i64,
}

/// A port number or name as written (`80`, `"80"` or `http`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortValue {
    Num(i64),
    Name(String),
}

impl Serialize for PortValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortValue::Num(n) => s.serialize_i64(*n),
            PortValue::Name(n) => s.serialize_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or name")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortValue, E> {
                Ok(PortValue::Num(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortValue, E> {
                Ok(PortValue::Num(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortValue, E> {
                Ok(PortValue::Name(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for PortValue {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortValue".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // allOf, not anyOf: a range constrains only numbers and a pattern
        // only strings, so each applies to its own kind (with anyOf every
        // value would pass one branch). Names are IANA service names, as
        // Kubernetes applies them to container ports.
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "allOf": [
                {"minimum": 1, "maximum": 65535},
                {"maxLength": 15, "pattern": "^([0-9]{1,5}|[a-z0-9]([a-z0-9-]*[a-z0-9])?)$"}
            ]
        })
    }
}

/// Entities a rule may name.
pub const ENTITIES: [&str; 5] = ["world", "cluster", "host", "remote-node", "all"];

fn entities_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 5,
        "items": {"type": "string", "enum": ENTITIES}
    })
}

/// An IPv4 or IPv6 prefix; `sinew-policy` parses it (host bits are
/// ignored, as Kubernetes does).
const CIDR_PATTERN: &str = r"^([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*)/[0-9]{1,3}$";

fn cidr_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "maxLength": 64, "pattern": CIDR_PATTERN})
}

fn cidr_list_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 256,
        "items": {"type": "string", "maxLength": 64, "pattern": CIDR_PATTERN}
    })
}

/// A Kubernetes label key: an optional DNS prefix and a name.
pub(crate) const LABEL_KEY_PATTERN: &str =
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$";

fn label_key_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "minLength": 1, "maxLength": 317, "pattern": LABEL_KEY_PATTERN})
}

/// Label maps: values are bounded here; keys are checked by the consumers
/// (a CEL rule over every key would cost more than an API server's budget
/// allows for a map of unbounded keys).
pub(crate) fn label_map_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": 128,
        "additionalProperties": {"type": "string", "maxLength": 63}
    })
}
