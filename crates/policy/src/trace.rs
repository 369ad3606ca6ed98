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

/// One HTTP request (or gRPC call) to trace, as given on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    /// The request target as sent (`/a/../b?x=1`); normalised before it is
    /// matched, as the proxy does.
    pub target: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl HttpRequest {
    /// A gRPC call: `POST /pkg.Service/Method` with a gRPC content type.
    /// `method` is `pkg.Service/Method` (a leading `/` is accepted).
    pub fn grpc(method: &str) -> HttpRequest {
        HttpRequest {
            method: "POST".into(),
            target: format!("/{}", method.trim_start_matches('/')),
            host: None,
            headers: vec![("content-type".into(), "application/grpc".into())],
        }
    }
}

impl fmt::Display for HttpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.target)?;
        if let Some(h) = &self.host {
            write!(f, " host {h}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L7Reason {
    /// The kernel drops the connection (L3/L4): no request is ever seen.
    L4Denied,
    /// The connection is allowed and not redirected: no L7 rule applies,
    /// or a rule without L7 rules opens the port to this peer.
    NotRedirected,
    /// The request matches this rule (`... ingress[0].toPorts[0].rules.http[1]`).
    AllowedBy(String),
    /// The connection goes to the proxy and no L7 rule for this peer
    /// matches: the client gets 403 (gRPC: PERMISSION_DENIED).
    NoRuleMatched,
    /// The proxy refuses the request target itself (400).
    BadTarget(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Trace {
    /// The L3/L4 verdict for the connection (TCP to the port).
    pub l4: Trace,
    /// The datapath hands the connection to the proxy.
    pub redirected: bool,
    pub verdict: Verdict,
    pub reason: L7Reason,
    /// The normalised path the rules judged (and the upstream would get).
    pub path: Option<String>,
    /// One line for people: the L3/L4 explanation, then the L7 verdict.
    pub explanation: String,
}

/// The verdict for an HTTP request (or gRPC call) on a TCP connection to
/// or from `port`: first the L3/L4 verdict ([`trace()`]), then whether the
/// datapath redirects the connection to the proxy, then the proxy's
/// verdict, from the rule sets the proxy compiles
/// ([`Resolved::l7_rule_sets`]) and the same matcher ([`sinew_l7`]).
pub fn trace_l7(
    resolved: &Resolved,
    direction: Direction,
    peer_identity: u32,
    peer_class: Option<u32>,
    port: u16,
    request: &HttpRequest,
) -> L7Trace {
    let l4 = trace(resolved, direction, peer_identity, peer_class, Proto::Tcp, port);
    let done = |l4: Trace, redirected, verdict, reason, path, text: String| L7Trace {
        explanation: format!("{}; {text}", l4.explanation),
        l4,
        redirected,
        verdict,
        reason,
        path,
    };
    if l4.verdict == Verdict::Denied {
        return done(
            l4,
            false,
            Verdict::Denied,
            L7Reason::L4Denied,
            None,
            format!("{request}: never reaches L7"),
        );
    }
    let entry = resolved.datapath_entry(direction, peer_identity, peer_class, Proto::Tcp, port);
    if !entry.is_some_and(|e| e.redirects()) {
        return done(
            l4,
            false,
            Verdict::Allowed,
            L7Reason::NotRedirected,
            None,
            format!("{request}: not redirected to the proxy (no L7 rules, or a rule without L7 rules opens the port to this peer)"),
        );
    }
    let target = match sinew_l7::normalize_target(&request.target) {
        Ok(t) => t,
        Err(e) => {
            return done(
                l4,
                true,
                Verdict::Denied,
                L7Reason::BadTarget(e.to_string()),
                None,
                format!("{request}: redirected to the proxy, which refuses the target with 400: {e}"),
            )
        }
    };
    let sets = resolved.l7_rule_sets(direction, port);
    let n = sets.len();
    let compiled = match sinew_l7::CompiledRules::new(sets) {
        Ok(c) => c,
        // Rules are validated at parse time; this is a bug if it happens.
        Err(e) => {
            return done(
                l4,
                true,
                Verdict::Denied,
                L7Reason::BadTarget(e.to_string()),
                Some(target.path),
                format!("{request}: the L7 rules do not compile: {e}"),
            )
        }
    };
    let req = sinew_l7::Request {
        method: &request.method,
        path: &target.path,
        host: request.host.as_deref().or(target.authority.as_deref()),
        headers: &request.headers,
    };
    let peer = sinew_l7::PeerId {
        identity: peer_identity,
        cidr_class: peer_class,
    };
    let shown = if target.path == request.target.split('?').next().unwrap_or_default() {
        String::new()
    } else {
        format!(" (judged and forwarded as {})", target.path)
    };
    match compiled.check(peer, &req) {
        sinew_l7::Verdict::Allowed(m) => {
            let rule = compiled.describe(m);
            let text = format!("{request}{shown}: redirected to the proxy, allowed by {rule}");
            done(
                l4,
                true,
                Verdict::Allowed,
                L7Reason::AllowedBy(rule),
                Some(target.path),
                text,
            )
        }
        sinew_l7::Verdict::Denied => {
            let text = format!(
                "{request}{shown}: redirected to the proxy, denied (403): no L7 rule for this peer matches ({n} rule set{} on {direction} port {port})",
                if n == 1 { "" } else { "s" }
            );
            done(
                l4,
                true,
                Verdict::Denied,
                L7Reason::NoRuleMatched,
                Some(target.path),
                text,
            )
        }
    }
}
