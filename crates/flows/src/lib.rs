//! Flows as the user sees them: the observer's API types (`observer_v1`)
//! rendered as rows, summaries and JSON ([`render`]), and the meaning of a
//! GetFlows filter ([`filter`]). Pure functions over the protos and the
//! ABI's enums, so the agent (which filters) and the `sinew` CLI (which
//! renders and checks arguments before asking) agree without the CLI
//! linking the datapath.
#![deny(unsafe_code)]

use sinew_proto::observer_v1 as pb;

pub mod filter;
pub mod render;

pub use filter::{check_label, check_namespace, check_pod, matches, selects, validate, FilterError};

/// IP protocol numbers the observer names.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

pub fn protocol_name(p: u8) -> String {
    match p {
        PROTO_ICMP => "ICMP".into(),
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        other => format!("IP({other})"),
    }
}

/// Parses "tcp", "UDP", "icmp", "sctp" or a number.
pub fn parse_protocol(s: &str) -> Option<u8> {
    match s.to_ascii_lowercase().as_str() {
        "icmp" => Some(PROTO_ICMP),
        "tcp" => Some(PROTO_TCP),
        "udp" => Some(PROTO_UDP),
        "sctp" => Some(PROTO_SCTP),
        n => n.parse().ok(),
    }
}

/// The name `sinew observe --type` and ServerStatus use.
pub fn event_type_name(t: pb::EventType) -> &'static str {
    match t {
        pb::EventType::Trace => "trace",
        pb::EventType::Drop => "drop",
        pb::EventType::PolicyVerdict => "policy-verdict",
        pb::EventType::L7 => "l7",
        pb::EventType::Unknown => "unknown",
    }
}

/// The wall clock in nanoseconds since the Unix epoch, 0 if it is before
/// the epoch.
pub fn now_unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
