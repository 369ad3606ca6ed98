//! Tracing: the verdict for one flow, computed only from a [`Resolved`],
//! the same data the datapath gets, so that `sinew policy trace` shows what
//! the datapath does rather than what the policies were meant to do.

use std::fmt;

use crate::identity::Reserved;
use crate::model::{Direction, Proto};
use crate::resolve::{Action, Entry, Peer, Resolved, RuleRef};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No policy selecting the endpoint isolates this direction.
    NotIsolated,
    AllowedBy(Vec<RuleRef>),
    /// Deny rules win over any allow.
    DeniedBy(Vec<RuleRef>),
    /// The direction is isolated and no rule allows the flow.
    NoRuleMatched,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub verdict: Verdict,
    pub reason: Reason,
    /// One line for people, naming each deciding rule.
    pub explanation: String,
}

fn entry_matches(e: &Entry, flow: &Flow) -> bool {
    let (direction, proto, port) = (flow.direction, flow.proto, flow.port);
    e.direction == direction
        && match e.peer {
            Peer::Any => true,
            Peer::Identity(id) => id == flow.peer,
            Peer::Cidr(class) => flow.class == Some(class),
        }
        && e.proto.is_none_or(|p| p == proto)
        && e.ports.is_none_or(|(lo, hi)| lo <= port && port <= hi)
}

struct Flow {
    direction: Direction,
    peer: u32,
    class: Option<u32>,
    proto: Proto,
    port: u16,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        write!(f, "{} {word} identity {}", self.direction, self.peer)?;
        if let Some(r) = Reserved::from_id(self.peer) {
            write!(f, " ({r})")?;
        }
        if let Some(c) = self.class {
            write!(f, " at an address of CIDR class {c}")?;
        }
        match self.proto {
            Proto::Icmp => write!(f, " ICMP type {}", self.port),
            p => write!(f, " {p}/{}", self.port),
        }
    }
}

fn list(rules: &[RuleRef]) -> String {
    rules.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// The verdict for a flow of `proto` to or from `port` (the ICMP type for
/// ICMP) between the endpoint and a peer with identity `peer_identity`
/// whose address has CIDR class `peer_class` ([`crate::cidr_class`];
/// `None` when no named prefix contains it, or when the address is not
/// known, and then no CIDR rule can match). Deny wins over allow.
pub fn trace(
    resolved: &Resolved,
    direction: Direction,
    peer_identity: u32,
    peer_class: Option<u32>,
    proto: Proto,
    port: u16,
) -> Trace {
    let flow = Flow {
        direction,
        peer: peer_identity,
        class: peer_class,
        proto,
        port,
    };
    let mut allow = Vec::new();
    let mut deny = Vec::new();
    for e in resolved.entries.iter().filter(|e| entry_matches(e, &flow)) {
        match e.action {
            Action::Allow => allow.extend(e.rules.iter().cloned()),
            Action::Deny => deny.extend(e.rules.iter().cloned()),
        }
    }
    for v in [&mut allow, &mut deny] {
        v.sort();
        v.dedup();
    }
    let (verdict, reason, explanation) = if !deny.is_empty() {
        let text = format!("{flow}: denied by {}", list(&deny));
        (Verdict::Denied, Reason::DeniedBy(deny), text)
    } else if !resolved.enforced(direction) {
        let text = format!("{flow}: allowed: no policy selecting this endpoint isolates {direction}");
        (Verdict::Allowed, Reason::NotIsolated, text)
    } else if !allow.is_empty() {
        let text = format!("{flow}: allowed by {}", list(&allow));
        (Verdict::Allowed, Reason::AllowedBy(allow), text)
    } else {
        let text = format!("{flow}: denied: {direction} is isolated and no rule allows this flow");
        (Verdict::Denied, Reason::NoRuleMatched, text)
    };
    Trace {
        verdict,
        reason,
        explanation,
    }
}
